"""The HTTP app of one ingress replica: OpenAI's /v1/chat/completions, /v1/completions,
/v1/responses and /v1/models, vLLM's /tokenize and /detokenize, /health, and the operator
routes under /admin, all over that replica's Frontend. Errors use OpenAI's shape; the pool that
served a request is in the `x-q3serve-pool` header."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from deployments.api.admin import add_admin_routes
from deployments.api.http import error, error_response
from deployments.api.openai_chat import add_chat_route
from deployments.api.openai_completions import add_completions_route
from deployments.api.openai_models import DetokenizeRequest, TokenizeRequest
from deployments.api.responses import add_responses_routes
from deployments.frontend import Frontend, ModelNotFound, RequestError, Unauthenticated

GUARDED = ("/v1/", "/tokenize", "/detokenize", "/admin/")


def build_openai_app(frontend: Frontend) -> FastAPI:
    """The routes, closed over this replica's Frontend."""
    app = FastAPI(title="q3serve", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

    @app.middleware("http")
    async def _guard(request: Request, call_next):  # noqa: ANN001, ANN202
        """API keys and body size for /v1; /health stays open (and Ray's metrics port too)."""
        if request.url.path.startswith(GUARDED):
            try:
                frontend.authorize(request.headers.get("authorization"))
            except Unauthenticated as exc:
                return error_response(exc)
            size = request.headers.get("content-length")
            limit = frontend.cfg.limits.max_request_bytes
            if size is not None and size.isdigit() and int(size) > limit:
                return error(413, f"body: {size} bytes exceed the limit of {limit}", "body")
        return await call_next(request)

    add_admin_routes(app, frontend)
    add_chat_route(app, frontend)
    add_completions_route(app, frontend)
    add_responses_routes(app, frontend)
    add_model_routes(app, frontend)
    return app


def add_model_routes(app: FastAPI, frontend: Frontend) -> None:
    """What serves no request of its own: /health, /v1/models (with vLLM's `root` and
    `max_model_len`), /tokenize, /detokenize, /tokenizer_info."""

    def plain(value: Any) -> Any:
        """JSON-ready: AddedTokens as their text (as vLLM does), containers element by element."""
        if hasattr(value, "content"):
            return value.content
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)

    def tokenizer_config(tokenizer: Any) -> dict[str, Any]:
        paths = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")
        config = {k: plain(v) for k, v in tokenizer.init_kwargs.items() if k not in paths}
        for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
            config[name] = getattr(tokenizer, name)
        config["chat_template"] = tokenizer.chat_template
        config["tokenizer_class"] = type(tokenizer).__name__
        return config

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await frontend.router.ready()
        ok = bool(ready) and all(ready.values()) and not frontend.draining
        return JSONResponse({"pools": ready, "draining": frontend.draining}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": frontend.model_name, "object": "model", "created": frontend.created, "owned_by": "q3serve",
             "root": frontend.model_path, "parent": None, "max_model_len": frontend.max_model_len}
        ]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Any:
        try:
            if body.model is not None:
                frontend.check_model(body.model)
            if (body.prompt is None) == (body.messages is None):
                raise RequestError("prompt", "give exactly one of prompt and messages")
            if body.messages is not None:
                messages = [m.model_dump(exclude_none=True) for m in body.messages]
                _, ids = frontend.chat_prompt(messages, body.explicit_thinking(), param="messages")
            else:
                ids = frontend.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            return {"count": len(ids), "max_model_len": frontend.max_model_len, "tokens": ids,
                    "token_strs": frontend.tokenizer.convert_ids_to_tokens(ids)}
        except (RequestError, ModelNotFound) as exc:
            return error_response(exc)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Any:
        try:
            if body.model is not None:
                frontend.check_model(body.model)
            vocab = len(frontend.tokenizer)
            bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError("tokens", f"token id {bad} is outside the vocabulary [0, {vocab})")
            return {"prompt": frontend.tokenizer.decode(body.tokens)}
        except (RequestError, ModelNotFound) as exc:
            return error_response(exc)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's: the tokenizer's configuration (tokenizer_config.json as loaded: special tokens,
        chat_template, model_max_length, added tokens...) without its file paths, plus
        `tokenizer_class`; lm-eval's remote tokenizer reads eos/bos/pad_token and chat_template."""
        return tokenizer_config(frontend.tokenizer)
