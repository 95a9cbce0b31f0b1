"""veiltrain.ringkernels: the C loop's products equal torch's word for word, and it reads only
inside its operands."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veiltrain import ringkernels, ringmath


def _words(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=gen)


def _reference(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: torch.Tensor) -> Any:
    gathered = x.reshape(-1)[rows[:, None] + cols[None, :]]  # (m, k)
    return torch.matmul(gathered, b)  # int64 matmul wraps mod 2^64


def test_the_extension_is_built() -> None:
    assert ringkernels.built(), "veiltrain._ringkernels is missing: run make venv"
    assert ringkernels.describe()["built"] is True


@pytest.mark.parametrize("vector", [True, False])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 24, 31, 32, 33, 70])
def test_the_gathered_product_wraps_as_torch(n: int, vector: bool) -> None:
    """Every band width (1-4 groups of 8 columns, partial last groups, more than one band) and
    row counts that leave remainders after each block height (12, 8, 6, 4)."""
    x = _words(500, seed=n)
    rows = torch.randint(0, 200, (29,), generator=torch.Generator().manual_seed(1))
    cols = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(2))
    b = _words(13, n, seed=3)
    got = ringkernels.gathered_product(x, rows, cols, b, vector=vector)
    assert torch.equal(got, _reference(x, rows, cols, b))


def test_the_vector_and_plain_loops_agree() -> None:
    x, b = _words(4096, seed=4), _words(64, 20, seed=5)
    rows, cols = torch.arange(0, 4000, 61), torch.arange(64)
    plain = ringkernels.gathered_product(x, rows, cols, b, vector=False)
    assert torch.equal(ringkernels.gathered_product(x, rows, cols, b), plain)


@pytest.mark.parametrize(
    ("rows", "cols", "problem"),
    [([0, 10], [0, 90], IndexError), ([-1, 0], [0, 1], IndexError), ([1], [99], IndexError)],
)
def test_offsets_outside_the_operand_are_refused(rows: Any, cols: Any, problem: Any) -> None:
    x, b = _words(100, seed=6), _words(len(cols), 3, seed=7)
    with pytest.raises(problem, match="outside the 100 words"):
        ringkernels.gathered_product(x, torch.tensor(rows), torch.tensor(cols), b)


def test_operands_of_the_wrong_kind_are_refused() -> None:
    x, rows, cols = _words(100, seed=8), torch.arange(3), torch.arange(2)
    with pytest.raises(ValueError, match="int64"):
        ringkernels.gathered_product(x.double(), rows, cols, _words(2, 3, seed=9))
    with pytest.raises(ValueError, match="rows must be"):
        ringkernels.gathered_product(x, rows.int(), cols, _words(2, 3, seed=9))
    with pytest.raises(ValueError, match="b has 5 rows for 2 cols"):
        ringkernels.gathered_product(x, rows, cols, _words(5, 3, seed=9))


def test_empty_products_are_zero() -> None:
    x = _words(10, seed=10)
    out = ringkernels.gathered_product(x, torch.arange(4), torch.arange(0), _words(0, 3, seed=11))
    assert torch.equal(out, torch.zeros(4, 3, dtype=torch.int64))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 5),
    out_channels=st.integers(1, 33),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    extra=st.tuples(st.integers(0, 5), st.integers(0, 5)),
)
def test_convolutions_and_their_gradients_are_torchs(
    batch: int,
    channels: int,
    out_channels: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    extra: tuple[int, int],
) -> None:
    """Through ringmath with every shape routed to the C loop (one to 33 columns: partial
    vectors, one or more bands), against torch's int64 convolutions and, for the kernel
    gradient, ringmath's patches product with the loop off."""
    with pytest.MonkeyPatch.context() as routed:
        routed.setattr(ringkernels, "COLUMNS", (1, 64))
        routed.setattr(ringkernels, "MIN_TERMS", 1)
        h, w = (d * (k - 1) + 1 + e for d, k, e in zip(dilation, kernel, extra, strict=True))
        x = _words(batch, channels, h, w, seed=12)
        weight = _words(out_channels, channels, *kernel, seed=13)
        out = torch.conv2d(x, weight, None, stride, padding, dilation)
        assert torch.equal(ringmath.conv2d(x, weight, None, stride, padding, dilation), out)
        g = _words(*out.shape, seed=14)
        ours = ringmath.conv2d_weight(g, x, kernel, padding, stride, dilation)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ringkernels, "available", lambda: False)
            assert torch.equal(
                ours, ringmath.conv2d_weight(g, x, kernel, padding, stride, dilation)
            )
        # The input gradient at stride 1 (the loop's transposed case), back to x's channels.
        g1 = _words(*torch.conv2d(x, weight, None, 1, padding, dilation).shape, seed=15)
        expected = torch.conv_transpose2d(g1, weight, None, 1, padding, 0, 1, dilation)
        assert torch.equal(
            ringmath.conv_transpose2d(g1, weight, None, 1, padding, 0, 1, dilation), expected
        )


def test_ringmath_routes_the_shapes_where_the_loop_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = ringkernels.gathered_product

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ringkernels, "available", lambda: True)
    monkeypatch.setattr(ringkernels, "gathered_product", counted)
    low, high = ringkernels.COLUMNS
    x = _words(2, 4, 6, 6, seed=16)  # 4 channels by 3x3 taps: 36 terms
    ringmath.conv2d(x, _words(high, 4, 3, 3, seed=17), None, 1, 1)
    ringmath.conv2d_weight(_words(2, low, 6, 6, seed=18), x, (3, 3), 1, 1)
    ringmath.conv_transpose2d(
        _words(2, 8, 6, 6, seed=19), _words(8, low, 3, 3, seed=20), None, 1, 1
    )
    assert len(calls) == 3
    ringmath.conv2d(x, _words(high + 1, 4, 3, 3, seed=21), None, 1, 1)  # too many channels
    ringmath.conv2d(x, _words(low - 1, 4, 3, 3, seed=22), None, 1, 1)  # too few
    ringmath.conv2d(x, _words(low, 4, 1, 1, seed=23), None, 1, 0)  # 4 terms
    ringmath.conv_transpose2d(_words(2, 8, 3, 3, seed=24), _words(8, 8, 3, 3, seed=25), None, 2, 1)
    assert len(calls) == 3
