"""veiltrain.ringmath: int64 products equal torch's bit for bit, whatever the layout."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from veiltrain import ringkernels, ringmath

SHAPES = [((16, 512), (512, 144)), ((3, 5), (5, 7)), ((2, 4, 64), (64, 80)), ((64,), (64, 32))]


@pytest.mark.parametrize(("left", "right"), SHAPES)
def test_matmul_wraps_exactly_as_torch(
    left: tuple[int, ...], right: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(len(left) * 100 + left[-1])
    x = torch.randint(-(2**63), 2**63 - 1, left, dtype=torch.int64, generator=gen)
    y = torch.randint(-(2**63), 2**63 - 1, right, dtype=torch.int64, generator=gen)
    for column_major in (True, False):  # whichever layout this CPU's timing picks
        monkeypatch.setattr(ringmath, "_column_major_wins", lambda c=column_major: c)
        assert torch.equal(ringmath.matmul(x, y), torch.matmul(x, y))
        assert torch.equal(ringmath.matmul(x, y.t().contiguous().t()), torch.matmul(x, y))


def test_the_layout_is_timed_once_a_process() -> None:
    first = ringmath._column_major_wins()
    assert ringmath._column_major_wins() is first
    assert ringmath._column_major_wins.cache_info().misses == 1


def test_other_products_are_torchs_own() -> None:
    assert ringmath.product("conv2d") is ringmath.conv2d
    assert ringmath.product("conv_transpose2d") is ringmath.conv_transpose2d
    assert ringmath.product("matmul") is ringmath.matmul
    assert ringmath.product("mul") is torch.mul and ringmath.product("conv1d") is torch.conv1d


@pytest.fixture(params=["ring kernels", "torch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each convolution test runs through veiltrain's C loop and, with it switched off, torch.
    Where the CPU lacks the vector loop, the C loop still runs (its plain version)."""
    on = request.param == "ring kernels"
    if on and not ringkernels.built():
        pytest.fail("veiltrain._ringkernels is not built (make venv builds it)")
    monkeypatch.setattr(ringkernels, "available", lambda: on)
    return on


def _words(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=gen)


# (input C, H, W), (C_out, kh, kw), stride, padding, dilation: small maps take the patches
# product, the last two (8x8 and more positions) torch's own.
CONVS = [
    ((64, 1, 1), (32, 3, 3), 1, 1, 1),
    ((16, 2, 3), (8, 3, 3), 1, 1, 1),
    ((16, 4, 4), (8, 3, 3), 2, 1, 1),
    ((8, 5, 5), (4, 3, 3), 2, 0, 1),
    ((8, 5, 4), (4, 2, 3), (1, 2), (0, 1), (2, 1)),
    ((16, 2, 2), (8, 1, 1), 1, 0, 1),
    ((4, 8, 8), (4, 3, 3), 1, 1, 1),
    ((3, 10, 9), (4, 3, 3), 1, 1, 1),
]


@pytest.mark.parametrize(("image", "kernel", "stride", "padding", "dilation"), CONVS)
def test_convolutions_wrap_exactly_as_torch(
    image: tuple[int, int, int],
    kernel: tuple[int, int, int],
    stride: Any,
    padding: Any,
    dilation: Any,
    kernels: bool,
) -> None:
    x = _words(3, *image, seed=1)
    w = _words(kernel[0], image[0], *kernel[1:], seed=2)
    out = torch.conv2d(x, w, None, stride, padding, dilation)
    assert torch.equal(ringmath.conv2d(x, w, None, stride, padding, dilation), out)
    # The input gradient's shape: conv_transpose2d back to the image, with output padding.
    g = _words(*out.shape, seed=3)
    wt = _words(kernel[0], image[0], *kernel[1:], seed=4)
    for extra in (0, 1):
        args = (None, stride, padding, extra, 1, dilation)
        try:
            expected = torch.conv_transpose2d(g, wt, *args)
        except RuntimeError:  # output padding must be smaller than stride or dilation
            continue
        assert torch.equal(ringmath.conv_transpose2d(g, wt, *args), expected), extra


@pytest.mark.parametrize(
    ("a", "b"),
    [((64, 8, 16, 16),) * 2, ((8, 1, 1), (64, 8, 16, 16)), ((), (3,)), ((1, 5), (4, 1))],
)
def test_broadcast_shape_is_torchs(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    expected = torch.broadcast_shapes(a, b)  # type: ignore[no-untyped-call]
    assert ringmath.broadcast_shape(a, b) == expected == ringmath.broadcast_shape(b, a)


def test_shapes_that_do_not_broadcast_are_refused_as_torch_does() -> None:
    with pytest.raises(RuntimeError, match="do not broadcast"):
        ringmath.broadcast_shape((4, 3), (2, 3))


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"), [(1, 1, 1), (2, 1, 1), (1, 0, 2), (2, 0, 1), (1, 2, 1)]
)
def test_the_kernel_gradient_wraps_exactly(
    stride: int, padding: int, dilation: int, kernels: bool
) -> None:
    gen = torch.Generator().manual_seed(stride * 100 + padding * 10 + dilation)
    x = torch.randint(-(2**63), 2**63 - 1, (2, 3, 7, 7), dtype=torch.int64, generator=gen)
    size = (7 + 2 * padding - dilation * 2 - 1) // stride + 1
    g = torch.randint(-(2**63), 2**63 - 1, (2, 4, size, size), dtype=torch.int64, generator=gen)
    ours = ringmath.conv2d_weight(g, x, (3, 3), padding, stride, dilation)
    # Tap by tap with int64 einsum: sums mod 2^64 wrap the same whatever their order.
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    span = stride * (size - 1) + 1
    taps = [
        torch.einsum(
            "noyx,ncyx->oc",
            g,
            padded[
                :,
                :,
                i * dilation : i * dilation + span : stride,
                j * dilation : j * dilation + span : stride,
            ],
        )
        for i in range(3)
        for j in range(3)
    ]
    assert torch.equal(ours, torch.stack(taps, dim=-1).reshape(4, 3, 3, 3))
    # On small integers it is torch's own kernel gradient.
    small_x, small_g = x % 7 - 3, g % 7 - 3
    reference = torch.nn.grad.conv2d_weight(
        small_x.double(), (4, 3, 3, 3), small_g.double(), stride, padding, dilation
    )
    assert torch.equal(
        ringmath.conv2d_weight(small_g, small_x, 3, padding, stride, dilation), reference.long()
    )


class _Wrapped:
    """Stands in for CrypTen's CUDALongTensor: a share that is no torch.Tensor, with `tensor()`."""

    def __init__(self, data: torch.Tensor) -> None:
        self._data = data

    def tensor(self) -> torch.Tensor:
        return self._data

    @property
    def shape(self) -> torch.Size:
        return self._data.shape


WIDE = {
    "ResNet18's widest": ((1, 512, 4, 4), (8, 512, 3, 3), {"padding": 1}),
    "strided, dilated": ((2, 6, 9, 8), (4, 6, 3, 2), {"stride": 2, "dilation": (1, 2)}),
    "grouped": ((2, 8, 5, 5), (8, 2, 3, 3), {"groups": 4, "padding": 1}),
}


@pytest.mark.parametrize("case", WIDE.values(), ids=WIDE)
def test_limb_convolutions_wrap_exactly_as_torch(case: Any) -> None:
    """The path a GPU's shares take (16-bit limbs in float64) is torch's int64 result to the
    word, at 4608 terms per output too, where CrypTen's 22-bit limbs pass 2^53."""
    shape_x, shape_w, kwargs = case
    gen = torch.Generator().manual_seed(shape_x[1])
    x = torch.randint(-(2**63), 2**63 - 1, shape_x, dtype=torch.int64, generator=gen)
    w = torch.randint(-(2**63), 2**63 - 1, shape_w, dtype=torch.int64, generator=gen)
    out = ringmath.conv2d(_Wrapped(x), _Wrapped(w), **kwargs)
    assert isinstance(out, _Wrapped)  # rewrapped as it came, as CrypTen expects
    assert torch.equal(out.tensor(), torch.conv2d(x, w, **kwargs))
    g = torch.randint(-(2**63), 2**63 - 1, out.shape, dtype=torch.int64, generator=gen)
    # conv2d's own kernel transposes its output back to the input's channels (its gradient)
    back = ringmath.conv_transpose2d(_Wrapped(g), w, **kwargs)
    assert torch.equal(back.tensor(), torch.conv_transpose2d(g, w, **kwargs))


def test_a_limb_product_past_exact_float64_sums_is_refused() -> None:
    x = torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="at most"):
        ringmath.limb_product(torch.matmul, x, x, terms=1 << 21)


@pytest.mark.parametrize("divisor", [1, 2, 3, 1000, 2**16, 2**40, 2**62])
def test_truncation_rounds_toward_zero_as_torchs_division(divisor: int) -> None:
    edges = [-(2**63), -(2**63) + 1, -divisor - 1, -divisor, -divisor + 1, -1, 0, 1]
    edges += [divisor - 1, divisor, divisor + 1, 2**63 - 1]
    words = torch.cat([torch.tensor(edges, dtype=torch.int64), _words(10_000, seed=divisor % 97)])
    expected = words.div(divisor, rounding_mode="trunc")
    out = ringmath.trunc_div_(words, divisor)
    assert out is words  # in place, as the div_ it replaces
    assert torch.equal(out, expected)


def test_two_party_truncation_wraps_about_x_over_2_64_of_the_time() -> None:
    """The premise of bench_truncation's estimate (and of the README's ResNet18 note): each
    party truncating its own share is exact to 1 unless the shares' sum overflows, which
    happens for about |x| / 2^64 of uniform share pairs, and then the result is 2^48 off."""
    samples, divisor = 1 << 22, 2**16
    x = torch.full((samples,), 1 << 56, dtype=torch.int64)
    x[::2] = -x[::2]
    share0 = _words(samples, seed=11)
    share1 = x - share0
    total = ringmath.trunc_div_(share0, divisor) + ringmath.trunc_div_(share1, divisor)
    error = (total - x.div(divisor, rounding_mode="trunc")).abs()
    wrapped = error > 1
    expected = samples * 2.0**-8  # |x| / 2^64 = 2^-8: 16384 of them, Poisson sd 128
    assert abs(int(wrapped.sum()) - expected) < 5 * 128
    assert torch.all(error[wrapped] >= 2**48 - 1)
