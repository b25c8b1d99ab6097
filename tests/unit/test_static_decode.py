"""The static decode step (cluster/model/graphs.py) against today's eager path, on the CPU: the
same logits and tokens over many random steps, static buffers that never move, padding rows that
touch neither the KV cache nor the expert counters, and no host-synchronising op in a decode
step (forward and sampling) but the one read of the sampled ids. With the Triton kernels (under
the interpreter) switched on, the same again: the kernels in the model agree with the twins."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cluster.config import ModelConfig, SamplingParams
from cluster.engine.plan import PlanEntry, StepPlan
from cluster.kernels import gpu as triton_kernels
from cluster.model.graphs import batch_buckets
from cluster.model.qwen3_moe import SparseMoe
from cluster.model.runner import ModelRunner
from cluster.model.weights import load_model
from tests.helpers.runner import LogitsTap

BLOCK = 4
BLOCKS = 64
MAX_LEN = 64


def _runner(path: Path, static: bool, max_batch: int = 12) -> ModelRunner:
    cfg = ModelConfig.from_pretrained(path)
    return ModelRunner(load_model(path, cfg, torch.float32), cfg, num_blocks=BLOCKS, block_size=BLOCK,
                       max_model_len=MAX_LEN, dtype=torch.float32, static_decode=static, max_batch=max_batch)


def _params(rng: random.Random, vocab: int, kind: int | None = None) -> SamplingParams:
    """One of every kind the sampler has: greedy, temperature, top-k, top-p alone (which may
    reach past the candidates), min-p, penalties, logit bias, logprobs; seeded when random."""
    kind = rng.randrange(8) if kind is None else kind % 8
    seed = rng.randrange(1000)
    return [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.9, seed=seed),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=seed, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=1.5, top_p=0.999, seed=seed),
        SamplingParams(temperature=1.0, min_p=0.2, seed=seed),
        SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0, logit_bias={rng.randrange(vocab): 100.0}, logprobs=True),
        SamplingParams(temperature=0.8, top_k=3, seed=seed),
    ][kind]


class _Seq:
    def __init__(self, rid: str, prompt: list[int], blocks: list[int], params: SamplingParams) -> None:
        self.rid, self.tokens, self.blocks, self.params = rid, list(prompt), blocks, params
        self.prompt_len = len(prompt)
        self.mask = None

    def entry(self) -> PlanEntry:
        p = self.params
        out = self.tokens[self.prompt_len:] if p.penalized else None
        prompt = self.tokens[: self.prompt_len] if p.penalized else None
        return PlanEntry(self.rid, [self.tokens[-1]], len(self.tokens) - 1, self.blocks, p, out, prompt,
                         token_bitmask=self.mask)


def _setup(rng: random.Random, vocab: int, n: int, every_kind: bool = False) -> tuple[list[_Seq], StepPlan]:
    seqs, plans, free = [], [], list(range(BLOCKS))
    rng.shuffle(free)
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 9))]
        seq = _Seq(f"r{i}", prompt, [free.pop() for _ in range(MAX_LEN // BLOCK // 4)],
                   _params(rng, vocab, i if every_kind else None))
        if rng.random() < 0.3 or (every_kind and i == 1):  # a structured-output row: every third token allowed
            words = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
            allowed = torch.zeros(words.numel() * 32, dtype=torch.bool)
            allowed[: vocab : 3] = True
            seq.mask = (allowed.view(-1, 32).int() << torch.arange(32)).sum(1).int()
        seqs.append(seq)
        plans.append(PlanEntry(seq.rid, prompt[:-1], 0, seq.blocks, None))
    return seqs, StepPlan(sorted((e for e in plans if e.token_ids), key=lambda e: len(e.token_ids) > 1))  # single tokens first


def _usage(runner: ModelRunner) -> torch.Tensor:
    return torch.stack([m.usage for m in runner.model.modules() if isinstance(m, SparseMoe)])


def _addresses(runner: ModelRunner) -> dict[str, int]:
    assert runner.static is not None
    return {name: runner.static.buf.device(name).data_ptr() for name in runner.static.buf.specs}


def _compare_steps(moe_checkpoint: Path, steps: int, seed: int, kernels: bool = False) -> None:
    """Eager runs the PyTorch paths (the twins); static runs with the Triton kernels if asked."""
    eager, static = _runner(moe_checkpoint, False), _runner(moe_checkpoint, True)
    eager_logits, static_logits = LogitsTap(eager), LogitsTap(static)
    vocab = eager.cfg.vocab_size
    rng = random.Random(seed)
    seqs, prefill = _setup(rng, vocab, 10)
    eager.execute(prefill)
    with triton_kernels.use(kernels, on_cpu=kernels):
        static.execute(prefill)  # prefills run eagerly in both
    where = _addresses(static)
    for step in range(steps):
        batch = rng.sample(seqs, rng.randrange(1, len(seqs) + 1))
        batch = [s for s in batch if len(s.tokens) <= len(s.blocks) * BLOCK]
        if not batch:
            break
        plan = StepPlan([s.entry() for s in batch])
        want = {x.request_id: x for x in eager.execute(plan)}
        with triton_kernels.use(kernels, on_cpu=kernels):
            got = {x.request_id: x for x in static.execute(plan)}
        assert static_logits.last is not None and eager_logits.last is not None
        torch.testing.assert_close(static_logits.last, eager_logits.last, rtol=1e-5, atol=1e-5)
        for s in batch:
            w, g = want[s.rid], got[s.rid]
            assert g.token == w.token, (step, s.params)
            if s.params.logprobs:
                assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
                assert [t for t, _ in g.top_logprobs or []] == [t for t, _ in w.top_logprobs or []]
            s.tokens.append(w.token)
        assert _addresses(static) == where, "the static buffers moved"
    used = sorted(b for s in seqs for b in s.blocks)
    for a, b in zip(eager.model.layers, static.model.layers):  # every block a sequence owns, the same KV
        torch.testing.assert_close(b.self_attn.kv_cache[used], a.self_attn.kv_cache[used], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_usage(static), _usage(eager), rtol=0, atol=1e-6)


def test_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


def test_static_decode_matches_the_eager_path(moe_checkpoint: Path) -> None:
    """Random batches (so most fill a bucket with padding rows) of every sampling kind: same
    logits, same tokens and logprobs, same KV in every owned block and the same expert counts
    (padding rows counted nothing), and the static buffers never moved."""
    _compare_steps(moe_checkpoint, steps=24, seed=0)


def test_static_decode_with_the_triton_kernels_matches_the_eager_path(moe_checkpoint: Path) -> None:
    """The model's kernel path (fused norms, q/k-norm + RoPE + cache write, paged decode
    attention, grouped MoE with its usage count), run by Triton's interpreter on the CPU."""
    with triton_kernels.use(True, on_cpu=True), torch.inference_mode():
        assert triton_kernels.for_tensor(torch.ones(1)) is not None  # Triton imports, the kernels are on
    _compare_steps(moe_checkpoint, steps=6, seed=1, kernels=True)


def test_padding_rows_leave_the_cache_and_the_counters_untouched(moe_checkpoint: Path) -> None:
    static = _runner(moe_checkpoint, True)
    assert static.static is not None
    rng = random.Random(3)
    seqs, prefill = _setup(rng, static.cfg.vocab_size, 3)
    for s in seqs:
        s.params = SamplingParams(temperature=0)
    static.execute(prefill)
    before = [layer.self_attn.kv_cache.clone() for layer in static.model.layers]
    usage = _usage(static).clone()
    plan = StepPlan([s.entry() for s in seqs])
    assert static.static.bucket(3) == 4  # one padding row
    static.execute(plan)
    written = {s.blocks[(len(s.tokens) - 1) // BLOCK] * BLOCK + (len(s.tokens) - 1) % BLOCK for s in seqs}
    scratch = static.static.scratch_block
    for old, layer in zip(before, static.model.layers):
        new = layer.self_attn.kv_cache
        changed = (new != old).flatten(2).any(-1).nonzero().tolist()
        slots = {b * BLOCK + o for b, o in changed if b != scratch}
        assert slots == written  # only the real rows' slots, and the padding row's scratch
    k = static.cfg.num_experts_per_tok
    added = _usage(static) - usage
    assert added[:, 0].sum().item() == pytest.approx(len(seqs) * k * len(added))  # 3 rows x k per layer, not 4


SYNCING = {
    "aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::bincount",
    "aten::unique_dim", "aten::_unique2", "aten::unique_consecutive", "aten::is_nonzero", "aten::equal",
    "aten::repeat_interleave.Tensor", "aten::allclose",
}


class NoHostSync(TorchDispatchMode):
    """Fails on every op that reads the device to the host, or whose output size depends on
    device values (on a GPU each waits for the stream): .item(), bool(), nonzero, boolean
    indexing, bincount, unique, repeat_interleave by a tensor; and `.tolist()` (which reads a
    CPU tensor without dispatching) but on the tensors in `allowed` (what read_to_host returned)."""

    allowed: set[int] = set()

    def __enter__(self):  # noqa: ANN204
        self._tolist = torch.Tensor.tolist
        real = self._tolist

        def tolist(t: torch.Tensor):  # noqa: ANN202
            if t.data_ptr() not in NoHostSync.allowed:
                raise AssertionError("host read (tolist) in a decode step")
            return real(t)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func._schema.name + (f".{func._overloadname}" if func._overloadname == "Tensor" else "")
        if func._schema.name in SYNCING or name in SYNCING:
            raise AssertionError(f"host sync in a decode step: {func}")
        if func._schema.name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise AssertionError(f"boolean indexing in a decode step: {func}")
        return func(*args, **(kwargs or {}))


def test_the_sync_check_catches_a_sync() -> None:
    x = torch.ones(4)
    for bad in (lambda: x.sum().item(), lambda: x[x > 0], lambda: x.nonzero(), lambda: bool(x.any()), lambda: x.tolist()):
        with pytest.raises(AssertionError), NoHostSync():
            bad()


@pytest.mark.parametrize("kernels", [False, True], ids=["twins", "triton"])
def test_a_decode_step_has_no_host_sync(moe_checkpoint: Path, kernels: bool) -> None:
    """Forward and sampling of every kind (top-p alone included, whose nucleus may need the full
    vocabulary), under the check; the sampled ids are read after it (the one read: on a GPU one
    copy into pinned memory)."""
    static = _runner(moe_checkpoint, True)
    rng = random.Random(5)
    seqs, prefill = _setup(rng, static.cfg.vocab_size, 8, every_kind=True)
    static.execute(prefill)
    import cluster.model.sampler as sampler

    reads = []
    real = sampler.read_to_host

    def read(x: torch.Tensor) -> torch.Tensor:
        reads.append(x.shape)
        with torch.utils._python_dispatch._disable_current_modes():
            out = real(x).long() if x.dtype == torch.long else real(x).clone()
        NoHostSync.allowed.add(out.data_ptr())
        return out

    sampler.read_to_host = read
    try:
        with triton_kernels.use(kernels, on_cpu=kernels):
            for _ in range(3):
                plan = StepPlan([s.entry() for s in seqs])
                with NoHostSync():
                    got = static.execute(plan)
                assert [x.request_id for x in got] == [s.rid for s in seqs]
                for s, x in zip(seqs, got):
                    s.tokens.append(x.token)
    finally:
        sampler.read_to_host = real
    assert len(reads) == 3  # one read per step


def test_the_engine_on_the_static_step_generates_what_the_eager_engine_does(moe_checkpoint: Path, monkeypatch) -> None:
    """The whole engine (continuous batching, preemption under a small KV pool, finished
    requests, seeded sampling) with its pure-decode steps on the static buffers (`static_decode`,
    what CUDA graphs replay) gives the eager engine's tokens."""
    from cluster import LLM
    from cluster.model.graphs import StaticDecode

    runs = []
    real = StaticDecode.run
    monkeypatch.setattr(StaticDecode, "run", lambda self, plan: runs.append(len(plan.entries)) or real(self, plan))
    prompts = [[(i * 13 + t) % 500 for t in range(3 + i % 7)] for i in range(14)]
    params = [SamplingParams(max_tokens=12, temperature=0) if i % 3 == 0 else
              SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=i) if i % 3 == 1 else
              SamplingParams(max_tokens=12, temperature=1.0, top_k=7, seed=i, logprobs=True) for i in range(14)]
    kw = dict(dtype="float32", num_kv_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=32)
    eager = LLM(moe_checkpoint, **kw)
    want = eager.generate(prompts, params)
    assert not runs
    static = LLM(moe_checkpoint, static_decode=True, **kw)
    got = static.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert len(runs) > 10 and set(runs) - {6}  # decode steps of several batch sizes took the static step
    assert sum(s.num_preemptions for s in static.core.shards) > 0  # the small pool preempted
    for llm in (eager, static):
        llm.shutdown()


def test_static_decode_is_refused_where_it_cannot_run() -> None:
    from cluster.config import EngineConfig, ParallelConfig

    with pytest.raises(ValueError, match="static_decode"):
        EngineConfig(static_decode=True).static_on(ParallelConfig(attention_shards=2, expert_groups=2))
    with pytest.raises(ValueError, match="static_decode"):
        EngineConfig(static_decode=False, cuda_graphs=True).static_on(ParallelConfig(device="cuda"))
    assert EngineConfig(static_decode=True).static_on(ParallelConfig())
    assert not EngineConfig().static_on(ParallelConfig())
