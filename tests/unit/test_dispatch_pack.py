"""Rows and their slot ids travel as one byte message in every dtype."""

import pytest
import torch

from cluster.parallel.dispatch import pack_rows, unpack_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 7])
def test_pack_round_trip(dtype: torch.dtype, n: int) -> None:
    rows = torch.randn(n, 12).to(dtype)
    slots = torch.arange(n, dtype=torch.long) * 1_000_003
    packed = pack_rows(rows, slots)
    assert packed.dtype == torch.uint8 and packed.shape == (n, 12 * rows.element_size() + 8)
    r, s = unpack_rows(packed, 12, dtype)
    assert torch.equal(r, rows) and torch.equal(s, slots)
