"""The synchronous heart of an engine: admit requests, step the scheduler and the model, turn
sampled tokens into outputs (stop checks, detokenization). `Engine` drives it from a thread,
`LLM` from the caller's loop."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster import native
from cluster.config import EngineConfig, ModelConfig, ParallelConfig, SamplingParams, parse_dtype
from cluster.engine.detokenizer import Detokenizer
from cluster.engine.executor import Executor, LocalExecutor
from cluster.engine.kv_cache import BlockManager
from cluster.engine.plan import plan_from_batch
from cluster.engine.scheduler import Scheduler
from cluster.engine.sequence import Sequence
from cluster.engine.thinking import ThinkingBudget, ThinkingState
from cluster.engine.tokenizer import STOP_THINKING, THINK_END, THINK_START, load_tokenizer


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative text and ids, plus the delta since the last."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


@dataclass
class _Request:
    seq: Sequence
    detok: Detokenizer
    thinking: ThinkingState
    shard: int = 0


class EngineCore:
    def __init__(
        self, model: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
        config: EngineConfig | None = None, parallel: ParallelConfig | None = None,
    ) -> None:
        self.model_path = Path(model)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        self.config = config or EngineConfig()
        self.parallel = parallel or ParallelConfig(device=device)
        self.dtype = parse_dtype(self.model_config.torch_dtype if dtype == "auto" else dtype)
        self.tokenizer = load_tokenizer(self.model_path)
        num_blocks = self.config.kv_blocks(self.model_config, self.dtype)
        capacity = num_blocks * self.config.block_size
        self.max_model_len = self.config.max_model_len or min(self.model_config.max_position_embeddings, capacity)
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len: {self.max_model_len} tokens do not fit the KV pool of {capacity} tokens; "
                "raise kv_cache_memory_gb / num_kv_blocks or lower max_model_len"
            )
        self.thinking = self._thinking_budget()
        eos = self.model_config.eos_token_ids or (self.tokenizer.eos_token_id,)
        self.eos_token_ids = frozenset(int(t) for t in eos if t is not None)
        torch.manual_seed(self.config.seed)
        self.executor = self._build_executor(num_blocks)
        # One scheduler and block manager per attention shard: each shard owns its sequences' KV.
        self.shards = [
            Scheduler(self.config, BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching))
            for _ in range(self.executor.num_shards)
        ]
        self.requests: dict[str, _Request] = {}
        self._forget: list[list[str]] = [[] for _ in self.shards]
        self.num_computed_tokens = 0   # tokens run through the model since start (prefill + decode)
        self.num_generated_tokens = 0
        self.num_steps = 0
        self._ids = itertools.count()

    def _thinking_budget(self) -> ThinkingBudget | None:
        """Qwen3's thinking tokens, when this model's vocabulary has them."""
        stop = self.tokenizer.encode(STOP_THINKING, add_special_tokens=False)
        if max(THINK_START, THINK_END, *stop) >= self.model_config.vocab_size:
            return None
        return ThinkingBudget(THINK_START, THINK_END, stop)

    def _build_executor(self, num_blocks: int) -> Executor:
        p = self.parallel
        args = (self.model_path, self.model_config, self.dtype, p.device, num_blocks, self.config.block_size, self.max_model_len)
        if p.attention_shards == 1 and p.expert_groups == 1 and not p.use_ray:
            return LocalExecutor(*args)
        native.prepare(p.device)  # built here once, so that the instance's actors only load it
        from cluster.parallel.instance import RayExecutor  # Ray is imported only when used

        return RayExecutor(*args, parallel=p)

    @property
    def scheduler(self) -> Scheduler:
        """The first shard's scheduler (the only one in a single-process engine)."""
        return self.shards[0]

    @property
    def blocks(self) -> BlockManager:
        return self.shards[0].blocks

    @property
    def runner(self):  # noqa: ANN201 - the local executor's ModelRunner, for tests and profiling
        return self.executor.runner  # type: ignore[attr-defined]

    # -- admission -------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> _Request:
        """Tokenizes and validates; raises ValueError naming the field. Touches no engine state,
        so callers on other threads may use it."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt: must not be empty")
        if not isinstance(params, SamplingParams):
            raise TypeError("sampling_params: expected cluster.SamplingParams")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
        thinking = ThinkingState()
        if params.thinking_budget is not None:
            if self.thinking is None:
                raise ValueError("thinking_budget: this model's vocabulary has no <think> / </think> tokens")
            thinking = ThinkingState.from_prompt(ids, self.thinking.start, self.thinking.end)
            if thinking.inside and params.thinking_budget == 0:  # nothing may be thought: close it now
                ids = ids + self.thinking.stop_ids
                thinking = ThinkingState(done=True)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens leave no room to generate within max_model_len={self.max_model_len}"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(rid, ids, params)
        return _Request(seq, Detokenizer(self.tokenizer, ids, params), thinking)

    def add(self, req: _Request) -> None:
        rid = req.seq.request_id
        if rid in self.requests:
            raise ValueError(f"request_id: {rid!r} is already running")
        # Data parallel over sequences: the shard with the fewest sequences takes the new one.
        req.shard = min(range(len(self.shards)), key=lambda i: len(self.shards[i].running) + len(self.shards[i].waiting))
        self.requests[rid] = req
        self.shards[req.shard].add(req.seq)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        req = self.make_request(prompt, params, request_id)
        self.add(req)
        return req.seq.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.seq.finish("abort")
        self._release(req)
        return self._output(req, [], "")

    def _release(self, req: _Request) -> None:
        self.shards[req.shard].finish(req.seq)
        self._forget[req.shard].append(req.seq.request_id)

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.shards)

    # -- stepping --------------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One scheduler + model step. Returns an output per request that got tokens, or with
        `final_only` (offline generation) only for requests that finished."""
        batches = [s.schedule() for s in self.shards]
        if not any(b.entries for b in batches):
            return []
        bs = self.config.block_size
        plans = [plan_from_batch(b, bs, self._forget[i]) for i, b in enumerate(batches)]
        self._forget = [[] for _ in self.shards]
        results = [r for shard in self.executor.execute(plans) for r in shard]
        self.num_steps += 1
        for i, batch in enumerate(batches):
            for seq, n in batch.entries:
                seq.num_computed_tokens += n
                self.num_computed_tokens += n
                self.shards[i].blocks.commit(seq)
        now = time.monotonic()
        outputs = []
        for r in results:
            req = self.requests[r.request_id]
            seq = req.seq
            if seq.first_token_time is None:
                seq.first_token_time = now
            tokens = [r.token]
            delta = self._append(req, r.token, r.logprob)
            if self.thinking is not None and seq.params.thinking_budget is not None:
                for forced in self.thinking.after_token(req.thinking, r.token, seq.params.thinking_budget):
                    if seq.finished:
                        break
                    tokens.append(forced)
                    delta += self._append(req, forced, 0.0)  # forced: probability 1 by construction
            if seq.finished:
                self._release(req)
                del self.requests[seq.request_id]
            elif final_only:
                continue
            outputs.append(self._output(req, tokens, delta))
        return outputs

    def _append(self, req: _Request, token: int, logprob: float | None) -> str:
        """Adds one output token: stop checks, then the text it makes safe to emit."""
        seq = req.seq
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        self.num_generated_tokens += 1
        self._check_stop(seq, token)
        delta = req.detok.step(token, seq.finished)
        if req.detok.stopped is not None and not seq.finished:
            seq.finish("stop", req.detok.stopped)
        return delta

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop")
        elif token in p.stop_token_ids:
            seq.finish("stop", token)
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    def _output(self, req: _Request, delta_ids: list[int], delta_text: str) -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,  # a fresh slice: later tokens never show up in it
            text=req.detok.text[: req.detok.emitted],
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            logprobs=list(seq.logprobs) if seq.params.logprobs else None,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def expert_counts(self) -> torch.Tensor:
        """[layers, experts] tokens routed to each expert since start, summed over shards."""
        return self.executor.expert_counts()

    def shutdown(self) -> None:
        self.executor.shutdown()
