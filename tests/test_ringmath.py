"""veiltrain.ringmath: int64 products equal torch's bit for bit, whatever the layout."""

from __future__ import annotations

import pytest
import torch

from veiltrain import ringmath

SHAPES = [((16, 512), (512, 144)), ((3, 5), (5, 7)), ((2, 4, 64), (64, 80)), ((64,), (64, 32))]


@pytest.mark.parametrize(("left", "right"), SHAPES)
def test_matmul_wraps_exactly_as_torch(left: tuple[int, ...], right: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(left) * 100 + left[-1])
    x = torch.randint(-(2**63), 2**63 - 1, left, dtype=torch.int64, generator=gen)
    y = torch.randint(-(2**63), 2**63 - 1, right, dtype=torch.int64, generator=gen)
    assert torch.equal(ringmath.matmul(x, y), torch.matmul(x, y))
    assert torch.equal(ringmath.matmul(x, y.t().contiguous().t()), torch.matmul(x, y))


def test_other_products_are_torchs_own() -> None:
    assert ringmath.product("conv2d") is torch.conv2d
    assert ringmath.product("matmul") is ringmath.matmul
