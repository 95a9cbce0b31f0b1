"""veiltrain.chains, veiltrain.pooling and the kernel-gradient triple between real parties."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from test_mpc import PARTY_TIMEOUT_S, PRECISION_BITS, _report, _run
from veiltrain import chains, sharing


def test_the_chains_budget_their_triples() -> None:
    assert chains.exp_count(8) == 8  # one squaring per iteration
    assert chains.inv_sqrt_count(8, 6) == 8 + 18  # the guess's exp, 3 products a Newton step


def _encoded(values: np.ndarray) -> np.ndarray:
    return np.rint(values * 2.0**PRECISION_BITS).astype(np.int64)


def _parties(tmp_path: Path, mode: str, **encoded: np.ndarray) -> Callable[[str], np.ndarray]:
    """Two parties and the dealer run `mode` on shares of `encoded`; the words of each output."""
    shares = {name: sharing.split_full(words, 2) for name, words in encoded.items()}
    for rank in range(2):
        np.savez(tmp_path / f"in_{rank}.npz", **{k: v[rank] for k, v in shares.items()})
    finished, _ = _run([0, 1, 2], 2, tmp_path, PARTY_TIMEOUT_S, 120, mode=mode)
    assert all(f.returncode == 0 for f in finished), _report(finished)
    out = [np.load(tmp_path / f"out_{rank}.npz") for rank in range(2)]
    return lambda key: sharing.reconstruct([o[key] for o in out])


@pytest.mark.slow
def test_parties_compute_exp_and_inv_sqrt_as_crypten_does(tmp_path: Path) -> None:
    exponents = np.linspace(-12.0, 2.0, 60).reshape(6, 10)  # softmax's range and a little more
    variances = np.logspace(-2, 2, 60).reshape(6, 10)  # BatchNorm's
    words = _parties(tmp_path, "chains", a=_encoded(exponents), b=_encoded(variances))

    def value(key: str) -> np.ndarray:
        return sharing.decode(words(key), PRECISION_BITS)

    # Relative to max(1, e^x): below 1 the fixed point's 2^-16 steps are what is left.
    scale = np.maximum(np.exp(exponents), 1.0)
    exp_error = np.abs(value("exp") - np.exp(exponents)) / scale
    stock_exp_error = np.abs(value("stock_exp") - np.exp(exponents)) / scale
    assert exp_error.max() < 0.01, exp_error.max()
    # The same approximation, up to each run's random truncations (a unit of 2^-16 a product,
    # through 8 squarings): over 12 runs of either side, before and after the shifts of
    # 2026-12-05, the max error moved within 0.0069-0.0083, so two runs differ by up to 0.0015
    # (a 1e-3 margin failed once in `make test`).
    assert exp_error.max() <= stock_exp_error.max() + 3e-3
    ideal = 1 / np.sqrt(variances)
    error = np.abs(value("inv_sqrt") / ideal - 1)
    assert error.max() < 0.01, error.max()
    assert error.max() <= np.abs(value("stock_inv_sqrt") / ideal - 1).max() + 1e-3


@pytest.mark.slow
def test_parties_max_pool_by_tournament_as_crypten_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 8, 8))
    x[0, 0, :2, :2] = 0.25  # one tied window
    g = rng.standard_normal((2, 3, 4, 4))
    encoded = [_encoded(x), _encoded(g)]
    words = _parties(tmp_path, "pooling", a=encoded[0], g=encoded[1])

    windows = encoded[0].reshape(2, 3, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5)
    assert np.array_equal(words("out"), windows.max((-2, -1)))  # exact: selection only
    assert np.array_equal(words("out"), words("stock_out"))
    hot = words("hot")  # one-hots at scale 1
    assert set(np.unique(hot)) <= {0, 1} and np.all(hot.sum((-2, -1)) == 1)
    assert np.array_equal(hot[0, 0, 0, 0], [[1, 0], [0, 0]])  # the first of a tie, as torch
    first = windows.reshape(2, 3, 4, 4, 4).argmax(-1)  # numpy's argmax: the first maximum too
    assert np.array_equal(hot.reshape(2, 3, 4, 4, 4).argmax(-1), first)
    routed = np.where(hot == 1, encoded[1][..., None, None], 0)  # g to each window's winner
    expected = routed.transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 8, 8)
    assert np.array_equal(words("grad"), expected)  # the backward as CrypTen's, words exact


@pytest.mark.slow
def test_parties_take_the_kernel_gradient_in_one_product_of_g_and_x(tmp_path: Path) -> None:
    # The triple masks x itself (the dealer cuts the patches of its mask): the same gradient as
    # a matmul with the patches of x's shares, and torch's within fixed-point error.
    import torch

    rng = np.random.default_rng(11)
    x, g = rng.standard_normal((2, 3, 7, 7)), rng.standard_normal((2, 4, 4, 4))
    words = _parties(tmp_path, "kernel-grad", x=_encoded(x), g=_encoded(g))
    expected = torch.nn.grad.conv2d_weight(
        torch.from_numpy(x), (4, 3, 3, 3), torch.from_numpy(g), stride=2, padding=1
    ).numpy()
    for key in ("triple", "patches"):
        got = sharing.decode(words(key), PRECISION_BITS)
        assert np.abs(got - expected).max() < 2e-3, key
