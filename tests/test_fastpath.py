"""veiltrain.fastpath's binary operators give exactly CrypTen's results, broadcasting included."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from crypten_world import one_party
from veiltrain import fastpath


@pytest.fixture(scope="module")
def crypten_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with one_party(tmp_path_factory.mktemp("crypten")) as crypten:
        fastpath.uninstall()  # start from CrypTen's own operators; each test installs its own
        yield crypten
        fastpath.uninstall()


def _words(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**62), 2**62, shape, generator=gen, dtype=torch.int64)


def _both(fn: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """fn's share with CrypTen's operators, then with veiltrain's."""
    fastpath.uninstall()
    stock = fn().share.clone()
    fastpath.install()
    try:
        return stock, fn().share.clone()
    finally:
        fastpath.uninstall()


def _shared(crypten: Any, value: torch.Tensor) -> Any:
    from crypten.mpc.primitives.binary import BinarySharedTensor

    return BinarySharedTensor(value, src=0)


CASES = {
    "same shape": ((4, 5), (4, 5)),
    "x broadcast": ((1, 5), (4, 5)),
    "y broadcast": ((4, 5), (1, 5)),
}


@pytest.mark.parametrize("shapes", CASES.values(), ids=CASES)
@pytest.mark.parametrize("op", ["xor", "and"])
def test_shared_operands_match_crypten(crypten_single: Any, shapes: Any, op: str) -> None:
    x = _shared(crypten_single, _words(*shapes[0], seed=1))
    y = _shared(crypten_single, _words(*shapes[1], seed=2))
    stock, fast = _both(lambda: x ^ y if op == "xor" else x & y)
    assert torch.equal(stock, fast) and fast.shape == (4, 5)
    assert torch.equal(x.share, _words(*shapes[0], seed=1))  # the operand is left as it was


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("public", ["int", "tensor", "broadcast tensor"])
@pytest.mark.parametrize("op", ["xor", "and"])
def test_public_operands_match_crypten_on_every_rank(
    crypten_single: Any, monkeypatch: pytest.MonkeyPatch, rank: int, public: str, op: str
) -> None:
    from crypten.mpc.primitives.binary import BinarySharedTensor

    x = _shared(crypten_single, _words(1, 5, seed=3))
    y: Any = {
        "int": 0x0F0F,
        "tensor": _words(1, 5, seed=4),
        "broadcast tensor": _words(3, 5, seed=5),
    }[public]
    monkeypatch.setattr(BinarySharedTensor, "rank", property(lambda self: rank))
    stock, fast = _both(lambda: x ^ y if op == "xor" else x & y)
    assert torch.equal(stock, fast)


def test_a_comparison_circuit_gives_the_same_bits(crypten_single: Any) -> None:
    values = (torch.arange(1000) - 499.5) / 10  # no zero: its sign is not well defined
    encrypted = crypten_single.cryptensor(values)
    stock, fast = _both(encrypted._ltz)
    assert torch.equal(stock, fast)
    assert torch.equal(fast, (values < 0).long())


def test_install_is_idempotent_and_uninstall_restores_crypten(crypten_single: Any) -> None:
    from crypten.mpc.primitives.binary import BinarySharedTensor

    original = BinarySharedTensor.__xor__
    fastpath.install()
    fastpath.install()
    assert BinarySharedTensor.__xor__ is fastpath._xor
    fastpath.uninstall()
    assert BinarySharedTensor.__xor__ is original


PRODUCTS = {
    "mul": ("mul", (6, 5), (6, 5), {}),
    "mul broadcast": ("mul", (1, 5), (6, 5), {}),
    "matmul": ("matmul", (6, 5), (5, 3), {}),
    "conv2d": ("conv2d", (2, 3, 7, 7), (4, 3, 3, 3), {"stride": 2, "padding": 1}),
    "conv1d": ("conv1d", (2, 3, 9), (4, 3, 3), {"dilation": 2}),
    "conv_transpose2d": ("conv_transpose2d", (2, 4, 5, 5), (4, 3, 3, 3), {"stride": 2}),
}


@pytest.mark.parametrize("name", PRODUCTS)
def test_beaver_products_match_crypten(crypten_single: Any, name: str) -> None:
    op, shape_x, shape_y, kwargs = PRODUCTS[name]
    gen = torch.Generator().manual_seed(11)
    plain_x, plain_y = torch.randn(shape_x, generator=gen), torch.randn(shape_y, generator=gen)
    x, y = crypten_single.cryptensor(plain_x), crypten_single.cryptensor(plain_y)
    stock, fast = _both(lambda: getattr(x, op)(y, **kwargs))
    assert torch.equal(stock, fast)  # the same product, bit for bit
    expected = getattr(torch, op)(plain_x, plain_y, **kwargs)
    assert torch.allclose(fast.double() / 2**16, expected.double(), atol=1e-2)


def test_a_product_by_bits_keeps_the_fixed_point_scale_as_crypten_does(crypten_single: Any) -> None:
    # (x > 0) is shared at scale 1: the product is not truncated, in either order of operands.
    values = torch.linspace(-3, 3, 12)
    x = crypten_single.cryptensor(values)
    bits = x > 0
    for product in (lambda: x * bits, lambda: bits * x):
        stock, fast = _both(product)
        assert torch.equal(stock, fast)
        assert torch.allclose(fast.double() / 2**16, (values * (values > 0)).double(), atol=1e-4)


CONVS = {
    "plain": ((4, 3, 8, 8), (5, 3, 3, 3), {}),
    "padded, strided": ((3, 2, 9, 9), (4, 2, 3, 3), {"stride": 2, "padding": 1}),
    "dilated, non-square": ((2, 3, 10, 9), (2, 3, 3, 2), {"dilation": 2, "padding": (1, 0)}),
    "1x1": ((4, 6, 5, 5), (3, 6, 1, 1), {}),
}


@pytest.mark.parametrize("case", CONVS.values(), ids=CONVS)
def test_conv2d_gradients_match_crypten_and_torch(crypten_single: Any, case: Any) -> None:
    shape_x, shape_w, kwargs = case
    gen = torch.Generator().manual_seed(12)
    plain_x, plain_w = torch.randn(shape_x, generator=gen), torch.randn(shape_w, generator=gen)
    plain_g = torch.randn(torch.conv2d(plain_x, plain_w, **kwargs).shape, generator=gen)

    def grads() -> tuple[Any, Any]:
        x = crypten_single.cryptensor(plain_x, requires_grad=True)
        w = crypten_single.cryptensor(plain_w, requires_grad=True)
        x.conv2d(w, **kwargs).backward(crypten_single.cryptensor(plain_g))
        return x.grad, w.grad

    fastpath.uninstall()
    stock = [g.share.clone() for g in grads()]
    fastpath.install()
    try:
        fast = [g.share.clone() for g in grads()]
    finally:
        fastpath.uninstall()
    assert torch.equal(stock[0], fast[0])  # the input gradient is CrypTen's own
    # CrypTen truncates each sample's kernel gradient, then sums; one matmul truncates once:
    # the two differ by at most one unit in the last place per sample.
    assert int((stock[1] - fast[1]).abs().max()) <= shape_x[0]
    x, w = plain_x.clone().requires_grad_(), plain_w.clone().requires_grad_()
    torch.conv2d(x, w, **kwargs).backward(plain_g)
    assert torch.allclose(fast[1].double() / 2**16, w.grad.double(), atol=1e-2)
    assert torch.allclose(fast[0].double() / 2**16, x.grad.double(), atol=1e-2)


def _input_grads(
    crypten: Any, plain_x: torch.Tensor, plain_g: torch.Tensor, forward: Callable[[Any], Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """x's gradient through `forward` for gradient g, with CrypTen's operators, then veiltrain's."""

    def grad() -> Any:
        x = crypten.cryptensor(plain_x, requires_grad=True)
        forward(x).backward(crypten.cryptensor(plain_g))
        return x.grad

    return _both(grad)


AVG_POOLS = {
    "2x2": ((2, 3, 8, 8), {"kernel_size": 2}),
    "3x3 stride 2 padded": ((2, 4, 9, 7), {"kernel_size": 3, "stride": 2, "padding": 1}),
    "global": ((3, 5, 4, 4), {"kernel_size": 4}),
}


@pytest.mark.parametrize("case", AVG_POOLS.values(), ids=AVG_POOLS)
def test_avg_pool_gradient_is_crypten_word_for_word(crypten_single: Any, case: Any) -> None:
    """One kernel over N C maps (a GPU's CUDALongTensor takes no groups) is CrypTen's depthwise
    transposed convolution to the word, and torch's gradient within fixed-point error."""
    shape, kwargs = case
    gen = torch.Generator().manual_seed(14)
    plain_x = torch.randn(shape, generator=gen)
    plain_g = torch.randn(torch.nn.functional.avg_pool2d(plain_x, **kwargs).shape, generator=gen)
    stock, fast = _input_grads(crypten_single, plain_x, plain_g, lambda x: x.avg_pool2d(**kwargs))
    assert torch.equal(stock, fast)
    x = plain_x.clone().requires_grad_()
    torch.nn.functional.avg_pool2d(x, **kwargs).backward(plain_g)
    assert torch.allclose(fast.double() / 2**16, x.grad.double(), atol=1e-3)


@pytest.mark.parametrize("kwargs", [{}, {"dim": 1}, {"dim": 0, "keepdim": True}])
def test_sum_gradient_is_crypten_word_for_word(crypten_single: Any, kwargs: Any) -> None:
    gen = torch.Generator().manual_seed(15)
    plain_x = torch.randn(3, 4, generator=gen)
    plain_g = torch.randn(plain_x.sum(**kwargs).shape, generator=gen)
    stock, fast = _input_grads(crypten_single, plain_x, plain_g, lambda x: x.sum(**kwargs))
    assert torch.equal(stock, fast)


def test_a_conv_on_the_data_skips_the_input_gradient(
    crypten_single: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crypten.mpc import MPCTensor

    gen = torch.Generator().manual_seed(13)
    plain_x, plain_w = (
        torch.randn(2, 3, 6, 6, generator=gen),
        torch.randn(4, 3, 3, 3, generator=gen),
    )
    transposed: list[int] = []
    original = MPCTensor.conv_transpose2d

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        transposed.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MPCTensor, "conv_transpose2d", counted)
    fastpath.install()
    try:
        x = crypten_single.cryptensor(plain_x)  # data: no gradient wanted
        w = crypten_single.cryptensor(plain_w, requires_grad=True)
        x.conv2d(w).backward(crypten_single.cryptensor(torch.ones(2, 4, 4, 4)))
    finally:
        fastpath.uninstall()
    assert not transposed and x.grad is None
    w_plain = plain_w.clone().requires_grad_()
    torch.conv2d(plain_x, w_plain).backward(torch.ones(2, 4, 4, 4))
    assert torch.allclose(w.grad.get_plain_text(), w_plain.grad, atol=1e-2)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients_match_crypten_and_torch(crypten_single: Any, training: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    plain_x = torch.randn(8, 3, 4, 4, generator=gen) * 2 + 1
    plain_w, plain_b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    plain_g = torch.randn(8, 3, 4, 4, generator=gen)
    mean, var = plain_x.mean((0, 2, 3)), plain_x.var((0, 2, 3))

    def gradients() -> list[torch.Tensor]:
        x, w, b = (
            crypten_single.cryptensor(t, requires_grad=True) for t in (plain_x, plain_w, plain_b)
        )
        stats = {} if training else {"running_mean": mean, "running_var": var}
        out = x.batchnorm(w, b, training=training, **stats)
        out.backward(crypten_single.cryptensor(plain_g))
        return [t.grad.get_plain_text() for t in (x, w, b)]

    fastpath.uninstall()
    stock = gradients()
    fastpath.install()
    try:
        fast = gradients()
    finally:
        fastpath.uninstall()
    x, w, b = (t.clone().requires_grad_() for t in (plain_x, plain_w, plain_b))
    args = (None, None) if training else (mean, var)
    torch.nn.functional.batch_norm(x, *args, w, b, training=training).backward(plain_g)
    for ours, theirs, reference in zip(fast, stock, (x.grad, w.grad, b.grad), strict=True):
        assert torch.allclose(ours, reference, atol=0.02), (ours - reference).abs().max()
        assert (ours - reference).abs().max() <= (theirs - reference).abs().max() + 2e-3


def test_batchnorm_keeps_torchs_statistics(crypten_single: Any) -> None:
    # 8 values a channel: the biased and unbiased variances are 8/7 apart.
    gen = torch.Generator().manual_seed(6)
    plain_x = torch.randn(8, 3, 1, 1, generator=gen) * 2 + 1
    plain_w, plain_b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)

    def forward() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, w, b = (crypten_single.cryptensor(t) for t in (plain_x, plain_w, plain_b))
        mean = crypten_single.cryptensor(torch.zeros(3))
        var = crypten_single.cryptensor(torch.ones(3))
        out = x.batchnorm(w, b, training=True, running_mean=mean, running_var=var)
        return out.get_plain_text(), mean.get_plain_text(), var.get_plain_text()

    fastpath.uninstall()
    stock_var = forward()[2]
    fastpath.install()
    try:
        out, running_mean, running_var = forward()
    finally:
        fastpath.uninstall()
    mean, var = torch.zeros(3), torch.ones(3)
    reference = torch.nn.functional.batch_norm(plain_x, mean, var, plain_w, plain_b, training=True)
    assert (out - reference).abs().max() < 0.01
    assert torch.allclose(running_mean, mean, atol=1e-3)
    assert torch.allclose(running_var, var, atol=1e-3)  # torch's: unbiased, momentum 0.1
    assert (stock_var - var).abs().max() > 0.02  # CrypTen's: the biased variance


POOLS = {
    "2x2": {"kernel_size": 2},
    "3x3 stride 2 padded": {"kernel_size": 3, "stride": 2, "padding": 1},
    "1x1": {"kernel_size": 1},
}


@pytest.mark.parametrize("case", POOLS.values(), ids=POOLS.keys())
def test_max_pooling_by_tournament_matches_crypten(crypten_single: Any, case: Any) -> None:
    gen = torch.Generator().manual_seed(8)
    plain = torch.randn(2, 3, 6, 6, generator=gen)
    plain[0, 0, :2, :2] = 0.5  # a tied window: the first maximum takes the gradient
    grad = torch.randn(torch.nn.functional.max_pool2d(plain, **case).shape, generator=gen)

    def pooled() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = crypten_single.cryptensor(plain, requires_grad=True)
        out, hot = x.max_pool2d(**case, return_indices=True)
        out.backward(crypten_single.cryptensor(grad))
        return out.get_plain_text(), hot.get_plain_text(), x.grad.get_plain_text()

    fastpath.uninstall()
    stock = pooled()
    fastpath.install()
    try:
        fast = pooled()
    finally:
        fastpath.uninstall()
    x = plain.clone().requires_grad_()
    torch.nn.functional.max_pool2d(x, **case).backward(grad)
    expected = torch.nn.functional.max_pool2d(plain, **case)
    assert torch.allclose(fast[0], expected, atol=2**-15)
    assert torch.equal(fast[0], stock[0])  # the same words: selection needs no truncation
    assert torch.equal(fast[1].sum((-2, -1)), torch.ones_like(fast[0]))  # exactly one hot
    assert torch.allclose(fast[2], x.grad, atol=1e-3)  # torch also routes ties to the first
