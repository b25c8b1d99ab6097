"""The synchronous heart of an engine: admit requests, step the scheduler and the model, turn
sampled tokens into outputs (stop checks, detokenization). `Engine` drives it from a thread,
`LLM` from the caller's loop."""

from __future__ import annotations


import itertools
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cluster.config import EngineConfig, ModelConfig, ParallelConfig, RequestError, SamplingParams, parse_dtype
from cluster.engine.detokenizer import Detokenizer
from cluster.engine.executor import build_executor, size_kv_cache
from cluster.engine.kv_cache import BlockManager
from cluster.engine.plan import StepPlan
from cluster.engine.scheduler import Scheduler, plan_from_batch, profile_plan
from cluster.engine.sequence import Sequence
from cluster.engine.structured import Constraint, GrammarCompiler
from cluster.engine.thinking import ThinkingBudget, ThinkingState, prompt_closes_thinking
from cluster.engine.tokenizer import STOP_THINKING, THINK_END, THINK_START, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What a step did for one request. The deltas (new ids, text, logprobs) and running counts
    are always set; the cumulative fields (`prompt_token_ids`, `token_ids`, `text`, `logprobs`)
    only on the final output, so that streaming a long answer costs the same per token however
    long it already is."""

    request_id: str
    delta_token_ids: list[int]
    delta_text: str
    delta_logprobs: list[float] | None = None  # when the request asked for logprobs
    delta_top_logprobs: list[list[tuple[int, float]]] | None = None  # when it asked for top_logprobs
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_reasoning_tokens: int = 0    # output tokens of the <think> part, tags included
    num_cached_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None  # final output only
    token_ids: list[int] | None = None         # final output only: every output id
    text: str | None = None                    # final output only: the whole text
    logprobs: list[float] | None = None        # final output only, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None  # final output only, when asked for
    # When asked for (params.prompt_logprobs): per prompt token its logprob (None for the first,
    # which nothing predicts) and alternatives; on the request's first output and its final one.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None

    def absorb(self, later: "RequestOutput") -> None:
        """Takes in the next output of the same request, as if both steps had been one."""
        self.delta_token_ids = self.delta_token_ids + later.delta_token_ids
        self.delta_text += later.delta_text
        if later.delta_logprobs is not None:
            self.delta_logprobs = (self.delta_logprobs or []) + later.delta_logprobs
        if later.delta_top_logprobs is not None:
            self.delta_top_logprobs = (self.delta_top_logprobs or []) + later.delta_top_logprobs
        for name in ("num_prompt_tokens", "num_output_tokens", "num_reasoning_tokens", "num_cached_tokens",
                     "finished", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids", "text", "logprobs",
                     "top_logprobs"):
            setattr(self, name, getattr(later, name))
        for name in ("prompt_logprobs", "prompt_top_logprobs"):  # set on the first output: keep it
            if getattr(later, name) is not None:
                setattr(self, name, getattr(later, name))


@dataclass
class _Request:
    seq: Sequence
    detok: Detokenizer
    thinking: ThinkingState
    shard: int = 0
    constraint: Constraint | None = None  # structured output


class EngineCore:
    def __init__(
        self, model: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
        config: EngineConfig | None = None, parallel: ParallelConfig | None = None,
    ) -> None:
        self.model_path = Path(model)
        self.config = config or EngineConfig()
        self.model_config = replace(
            ModelConfig.from_pretrained(self.model_path), fp8_weights=self.config.fp8_weights
        )
        if self.config.fp8_weights == "keep" and self.model_config.fp8_block is None:
            raise ValueError("fp8_weights: 'keep' needs an FP8 checkpoint (config.json has no quantization_config)")
        self.parallel = parallel or ParallelConfig(device=device)
        self.dtype = parse_dtype(self.model_config.torch_dtype if dtype == "auto" else dtype)
        self.tokenizer = load_tokenizer(self.model_path)
        util = self.config.gpu_memory_utilization
        if util is not None and self.parallel.device != "cuda":
            raise ValueError(f"gpu_memory_utilization: sizes the KV cache on CUDA devices, not {self.parallel.device}; "
                             "set kv_cache_memory_gb there")
        if util is None:
            num_blocks = self.config.kv_blocks(self.model_config, self.dtype)
            capacity = num_blocks * self.config.block_size
            self.max_model_len = self.config.max_model_len or min(self.model_config.max_position_embeddings, capacity)
            self._check_fits(capacity)
        else:  # the executor starts with a KV cache just big enough for the profile step
            profile = profile_plan(self.config, self.model_config)
            num_blocks = sum(len(e.block_table) for e in profile.entries)
            self.max_model_len = self.config.max_model_len or self.model_config.max_position_embeddings
        self.thinking = self._thinking_budget()
        eos = self.model_config.eos_token_ids or (self.tokenizer.eos_token_id,)
        self.eos_token_ids = frozenset(int(t) for t in eos if t is not None)
        torch.manual_seed(self.config.seed)
        self._grammar_compiler: GrammarCompiler | None = None
        self.grammar_s = 0.0  # seconds filling structured outputs' bitmasks (the engine benchmark reads it)
        self._grammar_lock = threading.Lock()
        graphs = self.config.graphs_on(self.parallel)
        self.executor = build_executor(
            self.model_path, self.model_config, self.dtype, self.parallel, num_blocks, self.config.block_size,
            self.max_model_len, cuda_graphs=graphs, max_graph_batch=self.config.graph_batch,
            static_decode=self.config.static_on(self.parallel),
        )
        if util is not None:
            try:
                num_blocks = self._size_kv_cache(util, profile, num_blocks)
                self._check_fits(num_blocks * self.config.block_size)
            except BaseException:
                self.executor.shutdown()
                raise
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

    def _check_fits(self, capacity: int) -> None:
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len: {self.max_model_len} tokens do not fit the KV pool of {capacity} tokens; "
                "raise kv_cache_memory_gb / num_kv_blocks / gpu_memory_utilization or lower max_model_len"
            )

    def _size_kv_cache(self, utilization: float, profile: StepPlan, profile_blocks: int) -> int:
        """Runs the largest step the scheduler can make (max_num_batched_tokens over up to
        max_num_seqs sampled rows) on every shard, then gives each shard's KV cache what
        `gpu_memory_utilization` leaves on its device (the smallest, so that all shards match)."""
        block_bytes = self.model_config.kv_bytes_per_token(self.dtype) * self.config.block_size
        num_blocks = size_kv_cache(self.executor, utilization, profile, profile_blocks, block_bytes)
        log.info("KV cache: %d blocks of %d tokens per shard (gpu_memory_utilization %.2f)", num_blocks,
                 self.config.block_size, utilization)
        return num_blocks

    def _thinking_budget(self) -> ThinkingBudget | None:
        """Qwen3's thinking tokens, when this model's vocabulary has them."""
        stop = self.tokenizer.encode(STOP_THINKING, add_special_tokens=False)
        if max(THINK_START, THINK_END, *stop) >= self.model_config.vocab_size:
            return None
        return ThinkingBudget(THINK_START, THINK_END, stop)

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
            raise RequestError("prompt", "must not be empty")
        if not isinstance(params, SamplingParams):
            raise TypeError("sampling_params: expected cluster.SamplingParams")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in params.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError("logit_bias", f"token id {bad} is outside the vocabulary [0, {vocab})")
        thinking = ThinkingState()
        if params.thinking_budget is not None and self.thinking is None:
            raise RequestError("thinking_budget", "this model's vocabulary has no <think> / </think> tokens")
        if self.thinking is not None:
            thinking = ThinkingState.from_prompt(ids, self.thinking.start, self.thinking.end)
            if thinking.inside and params.thinking_budget == 0:  # nothing may be thought: close it now
                ids = ids + self.thinking.stop_ids
                thinking = ThinkingState(done=True)
        constraint = None
        if params.structured_output is not None:
            so = params.structured_output
            state = "active"
            t = self.thinking
            if so.after_think and t is not None and not prompt_closes_thinking(ids, t.start, t.end):
                state = "waiting" if thinking.inside else "pending"
            constraint = self._grammars().constraint(so, state)
        if len(ids) >= self.max_model_len:
            raise RequestError(
                "prompt", f"{len(ids)} tokens leave no room to generate within max_model_len={self.max_model_len}"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(rid, ids, params)
        return _Request(seq, Detokenizer(self.tokenizer, ids, params), thinking, constraint=constraint)

    def _grammars(self) -> GrammarCompiler:
        """The engine's grammar compiler, made on the first structured request (building
        xgrammar's view of the vocabulary takes about a second)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                                         sorted(self.eos_token_ids))
            return self._grammar_compiler

    def add(self, req: _Request) -> None:
        rid = req.seq.request_id
        if rid in self.requests:
            raise RequestError("request_id", f"{rid!r} is already running")
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
        started = time.perf_counter()
        for plan in plans:  # structured outputs: the tokens each constrained row may take
            for e in plan.entries:
                c = self.requests[e.request_id].constraint if e.params is not None else None
                if c is not None and c.state != "waiting":
                    e.token_bitmask = c.bitmask(self.thinking.start if c.state == "pending" else None)
        self.grammar_s += time.perf_counter() - started
        self._forget = [[] for _ in self.shards]
        results = [r for shard in self.executor.execute(plans) for r in shard]
        self.num_steps += 1
        for shard, batch in zip(self.shards, batches):
            self.num_computed_tokens += shard.advance(batch)
        outputs = []
        for r in results:
            req = self.requests[r.request_id]
            seq = req.seq
            if r.prompt_logprobs is not None and r.prompt_start == len(seq.prompt_logprobs) + 1:  # not a recompute
                seq.prompt_logprobs += r.prompt_logprobs
                seq.prompt_top_logprobs += r.prompt_top_logprobs or []
            if r.token is None:
                continue
            if seq.params.max_tokens == 0:  # the prompt only: its last position's token is not kept
                seq.finish("length")
                tokens, delta, forced = [], "", []
            else:
                tokens = [r.token]
                delta = self._append(req, r.token, r.logprob, r.top_logprobs)
                forced = self.thinking.after_token(req.thinking, r.token, seq.params.thinking_budget) if self.thinking else []
            for f in forced:
                if seq.finished:
                    break
                tokens.append(f)
                # forced: probability 1 by construction
                delta += self._append(req, f, 0.0 if seq.params.logprobs else None,
                                      [(f, 0.0)] if seq.params.top_logprobs else None, forced=True)
                self.thinking.after_token(req.thinking, f, seq.params.thinking_budget)
            if seq.finished:
                self._release(req)
                del self.requests[seq.request_id]
            elif final_only:
                continue
            outputs.append(self._output(req, tokens, delta))
        return outputs

    def _append(self, req: _Request, token: int, logprob: float | None,
                top: list[tuple[int, float]] | None = None, forced: bool = False) -> str:
        """Adds one output token: stop checks, then the text it makes safe to emit. A forced token
        (the thinking budget's stop text, ending "</think>\n\n") is not the answer's: a structured
        output's grammar starts after it."""
        seq = req.seq
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if top is not None:
            seq.top_logprobs.append(top)
        self.num_generated_tokens += 1
        self._check_stop(seq, token)
        if (c := req.constraint) is not None and not seq.finished:
            started = time.perf_counter()
            self._advance(c, seq, token, forced)
            self.grammar_s += time.perf_counter() - started
        delta = req.detok.step(token, seq.finished)
        if req.detok.stopped is not None and not seq.finished:
            seq.finish("stop", req.detok.stopped)
        return delta

    def _advance(self, c: Constraint, seq: Sequence, token: int, forced: bool) -> None:
        """A structured output's matcher after an output token (see _append)."""
        if c.state == "pending":  # the answer's first token: reasoning opens, or the answer starts
            c.state = "waiting" if token == self.thinking.start else "active"  # type: ignore[union-attr]
        if c.state == "waiting":
            if token == self.thinking.end:  # type: ignore[union-attr]
                c.state = "active"
        elif not forced and (not c.accept(token) or c.done):  # complete (its stop token) or refused
            seq.finish("stop")

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop")
        elif token in p.stop_token_ids:
            seq.finish("stop", token)
        elif (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    def _output(self, req: _Request, delta_ids: list[int], delta_text: str) -> RequestOutput:
        seq = req.seq
        logprobs = seq.params.logprobs
        out = RequestOutput(
            request_id=seq.request_id,
            delta_token_ids=delta_ids,
            delta_text=delta_text,
            delta_logprobs=(seq.logprobs[len(seq.logprobs) - len(delta_ids):] if delta_ids else []) if logprobs else None,
            delta_top_logprobs=(seq.top_logprobs[len(seq.top_logprobs) - len(delta_ids):] if delta_ids else [])
            if seq.params.top_logprobs else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_reasoning_tokens=req.thinking.reasoning_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        if seq.params.prompt_logprobs is not None and (seq.finished or seq.num_output_tokens == len(delta_ids)):
            out.prompt_logprobs = [None, *seq.prompt_logprobs]
            if seq.params.prompt_logprobs:
                out.prompt_top_logprobs = [None, *seq.prompt_top_logprobs]
        if seq.finished:
            out.prompt_token_ids = seq.prompt_token_ids
            out.token_ids = seq.output_token_ids
            out.text = req.detok.text
            out.logprobs = list(seq.logprobs) if logprobs else None
            out.top_logprobs = list(seq.top_logprobs) if seq.params.top_logprobs else None
        return out

    def expert_usage(self) -> torch.Tensor:
        """[2, layers, experts] since start, summed over shards: tokens routed to each expert and
        their summed routing weight."""
        return self.executor.expert_usage()

    def replan(self, placement: Any) -> dict:
        """A new expert placement for the instance (between steps: the caller's business)."""
        return self.executor.replan(placement)

    def shutdown(self) -> None:
        self.executor.shutdown()
