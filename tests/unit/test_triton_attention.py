"""The Triton attention-side kernels (cluster/kernels/gpu/attention.py, norm_rope.py) against their
PyTorch twins, in Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), on ragged
shapes: lengths across block edges, more splits than blocks, junk block-table entries, G = 1, 2, 4."""

from __future__ import annotations

import ast
import inspect
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cluster.kernels.gpu.attention as kernel_mod
import cluster.kernels.gpu.norm_rope as norm_mod
from cluster.model import attention as twin_attn
from cluster.model import layers as twin_layers

BLOCK = 16


@pytest.fixture(autouse=True)
def _no_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """The twins are the PyTorch forms, not the native CPU kernels (nor their compile)."""
    monkeypatch.setenv("Q3SERVE_NATIVE", "0")


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)


def _decode_case(lens: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
                 width: int | None = None, seed: int = 0):
    """A cache with each sequence's blocks scattered (shuffled ids); table entries past a
    sequence's blocks point at other sequences' blocks (junk that must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK) for n in lens]
    width = width or max(need)
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.empty(len(lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used: used + n].to(torch.int32)
        tables[i, n:] = perm[torch.randint(0, num_blocks, (width - n,), generator=g)].to(torch.int32)
        used += n
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    cache = torch.randn(num_blocks, BLOCK, 2 * kv_heads, dim, generator=g).to(dtype)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int32)


def _check_decode(q, cache, tables, lens, num_splits=None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    out = kernel_mod.paged_decode_attention(q, cache, tables, lens, scale, num_splits=num_splits)
    ref = twin_attn.decode_attention_torch(q.float(), cache.float(), tables, lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **_tol(q.dtype))
    return out


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (4, 2, 32), (8, 2, 16)])
def test_decode_ragged_batch(heads: int, kv_heads: int, dim: int) -> None:
    """G = 1, 2, 4; lengths 1, across block edges, and a full 3-block sequence, in one batch."""
    q, cache, tables, lens = _decode_case([1, 15, 16, 17, 33, 48], heads, kv_heads, dim, torch.float32)
    _check_decode(q, cache, tables, lens)                # the host's split choice (here W = 3)
    _check_decode(q, cache, tables, lens, num_splits=1)  # no merge: stage 1 writes the output


def test_decode_more_splits_than_blocks() -> None:
    """8 splits over 1..2-block sequences: most splits are empty (lse = -inf) and weigh nothing."""
    q, cache, tables, lens = _decode_case([2, 17, 32], 4, 2, 16, torch.float32)
    _check_decode(q, cache, tables, lens, num_splits=8)
    _check_decode(q, cache, tables, lens, num_splits=3)  # uneven: 2 blocks over 3 splits


def test_decode_wide_table_splits() -> None:
    """A table much wider than the sequences (as in a captured step): splits follow each length."""
    q, cache, tables, lens = _decode_case([5, 70, 100], 8, 2, 32, torch.float32, width=10, seed=1)
    _check_decode(q, cache, tables, lens, num_splits=4)
    _check_decode(q, cache, tables, lens)


def test_decode_junk_entries_ignored() -> None:
    """Rewriting the table past each sequence's blocks (and the cache those point to) changes nothing."""
    q, cache, tables, lens = _decode_case([3, 20], 4, 2, 16, torch.float32, width=4)
    before = _check_decode(q, cache, tables, lens, num_splits=4)
    junk = tables.clone()
    junk[0, 1:] = tables[1, 0]  # sequence 0 uses one block; point the rest at sequence 1's
    junk[1, 2:] = tables[0, 0]
    after = kernel_mod.paged_decode_attention(q, cache, junk, lens, 16 ** -0.5, num_splits=4)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_decode_float16() -> None:
    q, cache, tables, lens = _decode_case([1, 17, 40], 8, 2, 32, torch.float16, seed=2)
    _check_decode(q, cache, tables, lens, num_splits=2)


def test_choose_num_splits_is_static() -> None:
    """More splits when B*KVH is small, one when the batch fills the GPU; never past W or the cap."""
    cpu = torch.device("cpu")
    assert kernel_mod.choose_num_splits(1, 4, 2048, cpu) == kernel_mod._MAX_SPLITS
    assert kernel_mod.choose_num_splits(1, 4, 3, cpu) == 3
    assert kernel_mod.choose_num_splits(256, 4, 2048, cpu) == 1
    assert 1 < kernel_mod.choose_num_splits(8, 4, 2048, cpu) < kernel_mod._MAX_SPLITS


class _NoHostReads(TorchDispatchMode):
    """Raises on the ops that read a device tensor's values back to the host."""
    banned = (torch.ops.aten._local_scalar_dense, torch.ops.aten.item, torch.ops.aten.nonzero,
              torch.ops.aten.masked_select)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.banned:
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def test_decode_never_reads_to_host() -> None:
    """The whole call (wrapper and interpreted kernels) runs under a mode that fails any host read
    of tensor values, so it can be captured in a CUDA graph."""
    q, cache, tables, lens = _decode_case([3, 20], 4, 2, 16, torch.float32)
    with _NoHostReads():
        out = kernel_mod.paged_decode_attention(q, cache, tables, lens, 0.25)
    ref = twin_attn.decode_attention_torch(q, cache, tables, lens, 0.25)
    torch.testing.assert_close(out, ref, **_tol(torch.float32))


def test_wrapper_source_has_no_host_reads() -> None:
    """A static guard too (the interpreter's own tensor handling could hide a wrapper's read on
    GPU): the host-side functions call no .item/.tolist/.cpu/.numpy and take no max/nonzero."""
    banned = {"item", "tolist", "cpu", "numpy", "nonzero", "max", "masked_select"}
    for fn in (kernel_mod.paged_decode_attention, kernel_mod.choose_num_splits):
        tree = ast.parse(inspect.getsource(fn))
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not calls & banned, calls & banned


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 48, generator=g).to(dtype)  # N = 48: a padded row
    res = torch.randn(5, 48, generator=g).to(dtype)
    w = (torch.rand(48, generator=g) + 0.5).to(dtype)
    normed, new_res = norm_mod.add_rms_norm(x, res, w, 1e-6)
    ref_normed, ref_res = twin_layers.add_rms_norm(x, res, w, 1e-6)
    assert normed.dtype == ref_normed.dtype and new_res.dtype == dtype
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)  # the add rounds as torch's does
    torch.testing.assert_close(normed, ref_normed, **_tol(dtype))


def _rope(dim: int, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = SimpleNamespace(head_dim=dim, rope_theta=10000.0, rope_scaling=None)  # what rope_tables reads
    cos, sin = twin_layers.rope_tables(cfg, 64)
    pos = torch.tensor([0, 5, 17, 63, 30, 1, 9][:tokens])
    return cos[pos][:, None].to(dtype), sin[pos][:, None].to(dtype)


@pytest.mark.parametrize("dtype,heads,kv_heads,dim,slot_dtype",
                         [(torch.float32, 4, 2, 16, torch.int64), (torch.float32, 8, 2, 32, torch.int32),
                          (torch.float32, 4, 4, 16, torch.int32), (torch.float16, 8, 2, 32, torch.int64)])
def test_qk_norm_rope_cache(dtype, heads, kv_heads, dim, slot_dtype) -> None:
    """Returned q and the cache: written slots hold the twin's k/v, every other slot the sentinel."""
    g = torch.Generator().manual_seed(4)
    tokens = 7
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=g).to(dtype)
    w = (torch.rand(heads + kv_heads, dim, generator=g) + 0.5).to(dtype)
    cos, sin = _rope(dim, tokens, dtype)
    slots = torch.tensor([3, 16, 17, 40, 0, 31, 5], dtype=slot_dtype)  # across blocks, unordered
    cache = torch.full((4, BLOCK, 2 * kv_heads, dim), 7.0, dtype=dtype)
    ref_cache = cache.clone()
    q = norm_mod.qk_norm_rope_cache(qkv, w, 1e-6, cos, sin, slots, cache, heads)
    ref_q = twin_attn.qk_norm_rope_cache(qkv, w, 1e-6, cos, sin, slots, ref_cache, heads)
    assert q.dtype == dtype and q.shape == (tokens, heads, dim)
    torch.testing.assert_close(q, ref_q, **_tol(dtype))
    torch.testing.assert_close(cache, ref_cache, **_tol(dtype))
    flat = cache.view(-1, 2 * kv_heads, dim)
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots.long()] = False
    assert (flat[untouched] == 7.0).all()
    torch.testing.assert_close(flat[slots.long(), kv_heads:], qkv[:, heads + kv_heads:], rtol=0, atol=0)


def test_qk_norm_rope_cache_padding_slot() -> None:
    """A negative slot (a padding token of a captured batch) still returns its q but writes nothing."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(3, 8, 16, generator=g)
    w = torch.rand(6, 16, generator=g) + 0.5
    cos, sin = _rope(16, 3, torch.float32)
    cache = torch.full((2, BLOCK, 4, 16), 7.0)
    q = norm_mod.qk_norm_rope_cache(qkv, w, 1e-6, cos, sin, torch.tensor([4, -1, 9]), cache, 4)
    ref_cache = torch.full_like(cache, 7.0)
    ref_q = twin_attn.qk_norm_rope_cache(qkv[[0, 2]], w, 1e-6, cos[[0, 2]], sin[[0, 2]], torch.tensor([4, 9]), ref_cache, 4)
    torch.testing.assert_close(q[[0, 2]], ref_q, **_tol(torch.float32))
    torch.testing.assert_close(cache, ref_cache, **_tol(torch.float32))
