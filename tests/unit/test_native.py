"""Native CPU kernels (cluster/native) against their PyTorch twins, and the PyTorch expert paths
against a plain per-token reference. The engine-level checks against transformers run with the
kernels on (test_logits_vs_hf, test_batching_vs_hf) and off (test_logits_vs_hf)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster import native
from cluster.model.attention import AttentionMetadata, decode_attention
from cluster.model.experts import LocalExperts, use_padded
from cluster.model.layers import rms_norm


@pytest.fixture(scope="module")
def kernels():
    k = native.kernels()
    # This machine kind has a C++ compiler: a kernel that fails to build is a failure here, not
    # a silent fallback.
    assert k is not None, "native kernels did not build"
    return k


class _Cfg:
    def __init__(self, experts: int, hidden: int, inter: int) -> None:
        self.num_experts, self.hidden_size, self.moe_intermediate_size = experts, hidden, inter


def _experts(e: int, h: int, i: int, dtype: torch.dtype, seed: int = 0) -> LocalExperts:
    g = torch.Generator().manual_seed(seed)
    m = LocalExperts(_Cfg(e, h, i))
    with torch.no_grad():
        m.w_gate_up.copy_(torch.randn(e, h, 2 * i, generator=g) * h**-0.5)
        m.w_down.copy_(torch.randn(e, i, h, generator=g) * i**-0.5)
    return m.to(dtype).requires_grad_(False)


def _routing(t: int, e: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids [t, k] and their softmax weights, as a router gives them."""
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(seed))
    weights, ids = logits.softmax(-1).topk(k, dim=-1)
    return ids, weights


def _naive(m: LocalExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One token and one expert at a time, in float64."""
    wgu, wd = m.w_gate_up.double(), m.w_down.double()
    inter = wd.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = x[t].double() @ wgu[e]
            out[t] += float(weights[t, j]) * ((F.silu(gu[:inter]) * gu[inter:]) @ wd[e])
    return out


# (rows, in, out, bias): decode and prefill sizes, a router gate narrower than one 32-column
# block, sizes that leave partial blocks and partial 8-row groups.
LINEAR_CASES = [(1, 64, 96, False), (16, 64, 256, True), (64, 256, 16, False), (300, 48, 70, True), (7, 40, 33, True)]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[f"m{c[0]}-k{c[1]}-n{c[2]}{'-bias' if c[3] else ''}" for c in LINEAR_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_linear_kernel_matches_torch(kernels, case: tuple, dtype: torch.dtype) -> None:
    m, k, n, bias = case
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)  # the hub's [out, in]
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    got = kernels.linear(x, w.t().contiguous(), b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output
    assert (got.double() - exact).abs().max().item() < tol * exact.abs().max().item()
    # Leading dimensions are kept, as F.linear keeps them.
    assert kernels.linear(x.view(1, m, k), w.t().contiguous(), b).shape == (1, m, n)


NORM_CASES = [((1, 256), (256,)), ((64, 6, 64), (6, 64)), ((300, 40), (40,)), ((3, 5, 2, 16), (2, 16))]


@pytest.mark.parametrize("m", range(1, 18))
@torch.inference_mode()
def test_linear_kernel_every_row_remainder(kernels, m: int) -> None:
    """Rows go in blocks of 8 (AVX-512 builds) or 6 (AVX2): every remainder of both, and a
    partial column block (n = 40), give F.linear's result."""
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 24, generator=g), torch.randn(40, 24, generator=g)
    exact = F.linear(x.double(), w.double())
    got = kernels.linear(x, w.t().contiguous(), None)
    assert (got.double() - exact).abs().max().item() < 1e-5 * exact.abs().max().item()


@pytest.mark.parametrize("case", NORM_CASES, ids=[f"x{'x'.join(map(str, c[0]))}-w{'x'.join(map(str, c[1]))}" for c in NORM_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_rms_norm_kernel_matches_torch(kernels, monkeypatch, case: tuple, dtype: torch.dtype) -> None:
    shape, wshape = case
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = torch.randn(wshape, generator=g).to(dtype)
    got = kernels.rms_norm(x, w, 1e-6)
    monkeypatch.setenv("Q3SERVE_NATIVE", "0")
    ref = rms_norm(x, w, 1e-6)  # the PyTorch order of operations
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    else:  # same roundings in the same order: equal but for rare one-ulp ties from the float sum
        assert (got != ref).float().mean().item() < 1e-3
        assert (got.float() - ref.float()).abs().max().item() <= 2 ** -6 * ref.float().abs().max().item()


# (tokens, experts, top-k, hidden, inter): decode sizes, a single token, every expert busy,
# experts left idle, sizes that are not multiples of the kernel's 32-column blocks.
MOE_CASES = [
    (1, 16, 4, 64, 32), (2, 8, 2, 64, 32), (5, 4, 2, 48, 40), (16, 16, 4, 64, 32),
    (64, 16, 4, 96, 64), (3, 64, 8, 32, 16), (40, 4, 1, 40, 24), (200, 8, 2, 32, 32),
]


@pytest.mark.parametrize("case", MOE_CASES, ids=[f"t{c[0]}-e{c[1]}-k{c[2]}-h{c[3]}-i{c[4]}" for c in MOE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_moe_kernel_matches_torch(kernels, case: tuple[int, ...], dtype: torch.dtype) -> None:
    t, e, k, h, i = case
    m = _experts(e, h, i, dtype)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids, weights = _routing(t, e, k)
    weights = weights.to(dtype)
    got = kernels.moe_experts(x, ids, weights, m.w_gate_up, m.w_down)
    ref = m.forward_torch(x, ids, weights)
    exact = _naive(m, x, ids, weights)
    assert got.dtype == dtype and got.shape == x.shape
    scale = exact.abs().max().item()
    if dtype == torch.float32:
        assert (got.double() - exact).abs().max().item() < 1e-5 * scale
        assert (ref.double() - exact).abs().max().item() < 1e-5 * scale
    else:  # bf16: the kernel is no further from the exact result than the PyTorch path
        err_got = (got.double() - exact).abs().max().item()
        err_ref = (ref.double() - exact).abs().max().item()
        assert err_got <= max(2 * err_ref, 0.02 * scale), (err_got, err_ref)


@torch.inference_mode()
def test_torch_expert_paths_match_naive() -> None:
    """Each of LocalExperts' PyTorch paths (one token, padded batched matmul, sorted per-expert
    matmuls) against the per-token reference; the cases are checked to take each path."""
    m = _experts(8, 32, 16, torch.float32)
    seen = set()
    for t, k in [(1, 2), (6, 2), (20, 2), (400, 2), (3, 1)]:
        x = torch.randn(t, 32, generator=torch.Generator().manual_seed(t))
        ids, weights = _routing(t, 8, k, seed=t)
        counts = torch.bincount(ids.flatten(), minlength=8).tolist()
        seen.add("single" if t == 1 else "padded" if use_padded(counts, t * k) else "sorted")
        got = m.forward_torch(x, ids, weights)
        assert (got.double() - _naive(m, x, ids, weights)).abs().max().item() < 1e-5
    assert seen == {"single", "padded", "sorted"}


def _paged_case(seqs: int, heads: int, kv_heads: int, dim: int, block: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 5 * block, (seqs,), generator=g)
    lens[0] = 1  # a sequence at its first token
    width = int((lens.max() + block - 1) // block)
    num_blocks = seqs * width + 3
    cache = torch.randn(num_blocks, block, 2 * kv_heads, dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: seqs * width].view(seqs, width)  # scattered blocks
    q = torch.randn(seqs, heads, dim, generator=g).to(dtype)
    pad = torch.arange(width * block) >= lens[:, None]
    mask = torch.zeros(pad.shape, dtype=dtype).masked_fill_(pad, float("-inf"))[:, None, None, :]
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), cos=torch.empty(0), sin=torch.empty(0), num_decodes=seqs,
        decode_block_tables=tables, decode_lens=lens, decode_mask=mask,
    )
    return q, cache, meta


ATTN_CASES = [(7, 4, 2, 64, 16), (3, 8, 1, 128, 8), (5, 4, 4, 32, 4), (2, 6, 3, 16, 16)]


@pytest.mark.parametrize("case", ATTN_CASES, ids=[f"s{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-b{c[4]}" for c in ATTN_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_decode_attention_kernel_matches_torch(kernels, monkeypatch, case: tuple[int, ...], dtype: torch.dtype) -> None:
    q, cache, meta = _paged_case(*case, dtype=dtype)
    got = kernels.paged_decode_attention(q, cache, meta.decode_block_tables, meta.decode_lens, q.shape[-1] ** -0.5)
    monkeypatch.setenv("Q3SERVE_NATIVE", "0")
    ref = decode_attention(q, cache, meta)  # gather + SDPA
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - ref.float()).abs().max().item() < tol * ref.float().abs().max().item()


@torch.inference_mode()
def test_kernels_do_not_depend_on_thread_count(kernels) -> None:
    m = _experts(16, 64, 32, torch.float32)
    x = torch.randn(24, 64)
    ids, weights = _routing(24, 16, 4)
    q, cache, meta = _paged_case(9, 4, 2, 64, 16, torch.float32)
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        try:
            results.append((
                kernels.moe_experts(x, ids, weights, m.w_gate_up, m.w_down),
                kernels.paged_decode_attention(q, cache, meta.decode_block_tables, meta.decode_lens, 0.125),
            ))
        finally:
            torch.set_num_threads(threads)
    for moe, attn in results[1:]:
        assert torch.equal(moe, results[0][0]) and torch.equal(attn, results[0][1])


@torch.inference_mode()
def test_kernels_take_empty_batches(kernels) -> None:
    """An attention shard with no sequences still runs every layer (its expert exchange needs
    it): zero rows in, zero rows out."""
    m = _experts(4, 32, 16, torch.float32)
    x = torch.empty(0, 32)
    assert kernels.linear(x, torch.randn(32, 48)).shape == (0, 48)
    assert kernels.moe_experts(x, torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2), m.w_gate_up, m.w_down).shape == (0, 32)


def test_kernels_reject_bad_input(kernels) -> None:
    m = _experts(4, 32, 16, torch.float32)
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="expert id 4 outside"):
        kernels.moe_experts(x, torch.tensor([[0, 4], [1, 2]]), torch.ones(2, 2), m.w_gate_up, m.w_down)
    with pytest.raises(RuntimeError, match="do not match"):
        kernels.linear(x, torch.randn(31, 8))
    with pytest.raises(RuntimeError, match="rows do not cycle"):
        kernels.rms_norm(torch.randn(5, 16), torch.ones(2, 16), 1e-6)
    with pytest.raises(RuntimeError, match="w_gate_up"):
        kernels.moe_experts(x, torch.tensor([[0, 1]] * 2), torch.ones(2, 2), m.w_down, m.w_down)
    q, cache, meta = _paged_case(2, 4, 2, 32, 8, torch.float32)
    with pytest.raises(RuntimeError, match="context length"):
        kernels.paged_decode_attention(q, cache, meta.decode_block_tables, meta.decode_lens + 1000, 1.0)
    with pytest.raises(RuntimeError, match="block id"):
        kernels.paged_decode_attention(q, cache, meta.decode_block_tables + 10_000, meta.decode_lens, 1.0)


def test_native_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv("Q3SERVE_NATIVE", "0")
    assert native.kernels() is None
    monkeypatch.setenv("Q3SERVE_NATIVE", "1")
    assert native.kernels() is not None


def test_build_directory_is_per_cpu(tmp_path, monkeypatch) -> None:
    """-march=native builds are tied to the CPU they were made on."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = native.build_directory()
    assert native.cpu_tag() in here.name and here.parent == tmp_path
    monkeypatch.setattr(native, "cpu_tag", lambda: "othercpu00")
    assert native.build_directory() != here


def test_stale_build_lock_is_cleared(tmp_path, monkeypatch) -> None:
    """A build killed midway leaves torch's lock file, which later builds would wait on forever."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = native.build_directory()
    lock = directory / "lock"
    lock.touch()
    native._clear_stale_lock(directory)
    assert lock.exists(), "a fresh lock belongs to a build in progress"
    old = time.time() - 3600
    os.utime(lock, (old, old))
    native._clear_stale_lock(directory)
    assert not lock.exists()


@torch.inference_mode()
def test_sync_free_grouped_experts_match_naive() -> None:
    """The GPU path that reads no counts to the host (device-side offsets, torch's grouped
    matmul, which also runs on the CPU): against the per-token reference, with experts that get
    no rows; on the CPU it is never chosen (the probe says so) but computes the same."""
    from cluster.model.experts import grouped_mm_available

    m = _experts(8, 32, 16, torch.float32)
    for t, k in [(1, 2), (6, 2), (40, 2), (3, 1)]:
        x = torch.randn(t, 32, generator=torch.Generator().manual_seed(t))
        ids, weights = _routing(t, 8, k, seed=t)
        got = m.forward_grouped(x, ids, weights)
        assert (got.double() - _naive(m, x, ids, weights)).abs().max().item() < 1e-5
    assert not grouped_mm_available("cpu", torch.float32)
