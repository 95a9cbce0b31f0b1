"""veiltrain.chains between real parties: exp and inverse square root as CrypTen's, faster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_mpc import PARTY_TIMEOUT_S, PRECISION_BITS, _report, _run
from veiltrain import chains, sharing


def test_the_chains_budget_their_triples() -> None:
    assert chains.exp_count(8) == 8  # one squaring per iteration
    assert chains.inv_sqrt_count(8, 6) == 8 + 18  # the guess's exp, 3 products a Newton step


@pytest.mark.slow
def test_parties_compute_exp_and_inv_sqrt_as_crypten_does(tmp_path: Path) -> None:
    exponents = np.linspace(-12.0, 2.0, 60).reshape(6, 10)  # softmax's range and a little more
    variances = np.logspace(-2, 2, 60).reshape(6, 10)  # BatchNorm's
    encoded = [np.rint(v * 2.0**PRECISION_BITS).astype(np.int64) for v in (exponents, variances)]
    shares = [sharing.split_full(e, 2) for e in encoded]
    for rank in range(2):
        np.savez(tmp_path / f"in_{rank}.npz", a=shares[0][rank], b=shares[1][rank])
    finished, _ = _run([0, 1, 2], 2, tmp_path, PARTY_TIMEOUT_S, 120, mode="chains")
    assert all(f.returncode == 0 for f in finished), _report(finished)
    out = [np.load(tmp_path / f"out_{rank}.npz") for rank in range(2)]

    def value(key: str) -> np.ndarray:
        return sharing.decode(sharing.reconstruct([o[key] for o in out]), PRECISION_BITS)

    # Relative to max(1, e^x): below 1 the fixed point's 2^-16 steps are what is left.
    scale = np.maximum(np.exp(exponents), 1.0)
    exp_error = np.abs(value("exp") - np.exp(exponents)) / scale
    stock_exp_error = np.abs(value("stock_exp") - np.exp(exponents)) / scale
    assert exp_error.max() < 0.01, exp_error.max()
    assert exp_error.max() <= stock_exp_error.max() + 1e-3  # the same approximation
    ideal = 1 / np.sqrt(variances)
    error = np.abs(value("inv_sqrt") / ideal - 1)
    assert error.max() < 0.01, error.max()
    assert error.max() <= np.abs(value("stock_inv_sqrt") / ideal - 1).max() + 1e-3
