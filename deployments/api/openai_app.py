"""The HTTP app of one ingress replica: OpenAI's /v1/chat/completions, /v1/completions,
/v1/responses and /v1/models, vLLM's /tokenize and /detokenize, /health, and the operator
routes under /admin, all over that replica's Frontend. Errors use OpenAI's shape; the pool that
served a request is in the `x-q3serve-pool` header."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.api.admin import add_admin_routes
from deployments.api.http import REQUEST_CODES, documented, error, error_response
from deployments.api.openai_chat import add_chat_route
from deployments.api.openai_completions import add_completions_route
from deployments.api.openai_models import DetokenizeRequest, TokenizeRequest
from deployments.api.responses import add_responses_routes
from deployments.frontend import Frontend, ModelNotFound, RequestError, Unauthenticated

GUARDED = ("/v1/", "/tokenize", "/detokenize", "/admin/")
# The generation routes, by their `route` tag in q3serve_requests_total.
COUNTED = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}


def build_openai_app(frontend: Frontend) -> FastAPI:
    """The routes, closed over this replica's Frontend."""
    app = FastAPI(title="q3serve", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path in COUNTED:
            frontend.count_refused(COUNTED[request.url.path], 400)
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            return error(400, f"body: {first.get('msg')} at position {first['loc'][-1]}", "body")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (a body that is not UTF-8, an unknown path) in OpenAI's shape too."""
        return error(exc.status_code, str(exc.detail), "body" if exc.status_code == 400 else None,
                     "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    app.add_middleware(Guard, frontend=frontend)
    add_admin_routes(app, frontend)
    add_chat_route(app, frontend)
    add_completions_route(app, frontend)
    add_responses_routes(app, frontend)
    add_model_routes(app, frontend)
    without_422(app)
    return app


class Guard:
    """API keys and body size for /v1 (and the other GUARDED paths); /health stays open (and Ray's
    metrics port too). A plain ASGI middleware, not `@app.middleware("http")`: Starlette's
    BaseHTTPMiddleware passes every chunk of a streamed response through a memory stream and an
    extra task, which at one chunk per token was a measurable part of the ingress's CPU."""

    def __init__(self, app: ASGIApp, frontend: Frontend) -> None:
        self.app, self.frontend = app, frontend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            path = request.url.path
            refusal = self.refusal(request) if path.startswith(GUARDED) else None
            if refusal is not None:
                if path in COUNTED:  # a refused generation request is counted, as gRPC's are
                    self.frontend.count_refused(COUNTED[path], refusal.status_code)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> JSONResponse | None:
        try:
            self.frontend.authorize(request.headers.get("authorization"))
        except Unauthenticated as exc:
            return error_response(exc)
        size = request.headers.get("content-length")
        limit = self.frontend.cfg.limits.max_request_bytes
        if size is not None and size.isdigit() and int(size) > limit:
            return error(413, f"body: {size} bytes exceed the limit of {limit}", "body")
        return None


def without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route that validates input; this app answers those with a
    400 in OpenAI's shape (`_invalid` above), so the schema drops it: it says what is served."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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

    @app.get("/health", responses={503: {"description": "A pool has no ready replica, or the app is draining"}})
    async def health() -> JSONResponse:
        ready = await frontend.router.ready()
        ok = bool(ready) and all(ready.values()) and not frontend.draining
        return JSONResponse({"pools": ready, "draining": frontend.draining}, status_code=200 if ok else 503)

    @app.get("/v1/models", responses=documented(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": frontend.model_name, "object": "model", "created": frontend.created, "owned_by": "q3serve",
             "root": frontend.model_path, "parent": None, "max_model_len": frontend.max_model_len}
        ]}

    @app.post("/tokenize", responses=documented(*REQUEST_CODES))
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

    @app.post("/detokenize", responses=documented(*REQUEST_CODES))
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

    @app.get("/tokenizer_info", responses=documented(401))
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's: the tokenizer's configuration (tokenizer_config.json as loaded: special tokens,
        chat_template, model_max_length, added tokens...) without its file paths, plus
        `tokenizer_class`; lm-eval's remote tokenizer reads eos/bos/pad_token and chat_template."""
        return tokenizer_config(frontend.tokenizer)
