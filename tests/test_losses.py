"""The log-sum-exp cross-entropy and the row maximum on shares, against plain torch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from crypten_world import one_party
from veiltrain import losses, lossterms

ROWS, CLASSES = 128, 10


@pytest.fixture(scope="module")
def crypten_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with one_party(tmp_path_factory.mktemp("crypten")) as crypten:
        yield crypten


def _batch(scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, CLASSES, generator=gen) * scale
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    return logits, labels


def _finished(terms: Any, rows: int) -> float:
    """The owner's side: decode the stored terms, take the log in floating point."""
    values = terms.get_plain_text().double().numpy()[None, :]
    return float(lossterms.finish(values, count=rows, batch_size=rows)[0])


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0, 10.0])
def test_cross_entropy_matches_torch_from_uncertain_to_confident(
    crypten_single: Any, scale: float
) -> None:
    logits, labels = _batch(scale, seed=int(scale * 100))
    target = torch.nn.functional.one_hot(labels, CLASSES).float()
    terms, grad = losses.cross_entropy(
        crypten_single.cryptensor(logits), crypten_single.cryptensor(target)
    )
    assert terms.size() == (1 + ROWS,)
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert abs(_finished(terms, ROWS) - float(expected)) < 0.005
    expected_grad = (logits.softmax(1) - target) / ROWS
    assert float((grad.get_plain_text() - expected_grad).abs().max()) * ROWS < 0.01
    # Stock CrypTen on the same confident batch is off by units, not thousandths.
    if scale == 10.0:
        stock = crypten_single.cryptensor(logits).cross_entropy(crypten_single.cryptensor(target))
        assert abs(float(stock.get_plain_text()) - float(expected)) > 0.5


@pytest.mark.parametrize("spread", [300.0, 3000.0])
def test_cross_entropy_stays_exact_for_logits_spread_past_exps_range(
    crypten_single: Any, spread: float
) -> None:
    """CrypTen's exp breaks below -256 (its (1 + x/256)^256 base turns negative); the floor at
    -EXP_FLOOR keeps the loss and the gradient torch's, however far apart the logits are."""
    logits, labels = _batch(1.0, seed=7)
    logits[:, 3] += spread  # class 3 far ahead of every other: z - max near -spread elsewhere
    logits[::2, 5] -= spread
    target = torch.nn.functional.one_hot(labels, CLASSES).float()
    terms, grad = losses.cross_entropy(
        crypten_single.cryptensor(logits), crypten_single.cryptensor(target)
    )
    expected = float(torch.nn.functional.cross_entropy(logits.double(), labels))
    assert abs(_finished(terms, ROWS) - expected) < 0.005
    expected_grad = (logits.softmax(1) - target) / ROWS
    assert float((grad.get_plain_text() - expected_grad).abs().max()) * ROWS < 0.01
    # Without the floor, CrypTen's exp of the same shifted logits is garbage.
    shifted = crypten_single.cryptensor(logits - logits.max(1, keepdim=True).values)
    assert float(shifted.exp().get_plain_text().abs().max()) > 2.0


def test_mse_matches_torch(crypten_single: Any) -> None:
    out, target = _batch(1.0, seed=3)[0], _batch(1.0, seed=4)[0]
    loss, grad = losses.value_and_grad(
        "mse", crypten_single.cryptensor(out), crypten_single.cryptensor(target)
    )
    assert loss.size() == (1,)
    assert abs(float(loss.get_plain_text()) - float(((out - target) ** 2).mean())) < 1e-3
    expected = 2 * (out - target) / out.numel()
    assert float((grad.get_plain_text() - expected).abs().max()) < 1e-4


def test_the_scaled_gradient_is_the_gradient_times_the_scale(crypten_single: Any) -> None:
    """losses.GRAD_SCALE: the trainer backpropagates 256 x the gradient, the integer product
    exact and taken before the division by N, so the gradient keeps 8 more bits."""
    scale = losses.GRAD_SCALE
    logits, labels = _batch(3.0, seed=8)
    target = torch.nn.functional.one_hot(labels, CLASSES).float()
    shares = crypten_single.cryptensor(logits), crypten_single.cryptensor(target)
    expected = (logits.softmax(1) - target) / ROWS
    plain, scaled = (losses.cross_entropy(*shares, s)[1].get_plain_text() for s in (1, scale))
    error, scaled_error = (plain - expected).abs(), (scaled / scale - expected).abs()
    assert float(scaled_error.max()) * ROWS < 0.01
    # The softmax's approximation dominates what is left; the rounding of the division is gone.
    assert float(scaled_error.mean()) < 0.6 * float(error.mean())
    out, want = _batch(1.0, seed=9)[0], _batch(1.0, seed=10)[0]
    expected = 2 * (out - want) / out.numel()
    shares = crypten_single.cryptensor(out), crypten_single.cryptensor(want)
    plain, scaled = (
        losses.value_and_grad("mse", *shares, s)[1].get_plain_text() for s in (1, scale)
    )
    assert float((plain - expected).abs().max()) > 2.0**-16  # a unit of rounding, unscaled
    assert float((scaled / scale - expected).abs().max()) < 2.0**-16 / 16


def test_row_max_handles_ties_and_flat_rows(crypten_single: Any) -> None:
    values = torch.randn(16, CLASSES, generator=torch.Generator().manual_seed(5)) * 4
    values[0, 3] = values[0, 7] = 30.0  # a tie at the top: one winner, not the sum of both
    values[1] = -2.5  # a flat row
    values[2, 0] = values[2, 9] = 12.0  # ties at both ends of the row
    got = losses.row_max(crypten_single.cryptensor(values)).get_plain_text().squeeze(1)
    torch.testing.assert_close(got, values.max(1).values, atol=1e-3, rtol=0)


def test_cross_entropy_gives_the_same_loss_for_shifted_logits(crypten_single: Any) -> None:
    logits, labels = _batch(2.0, seed=6)
    target = crypten_single.cryptensor(torch.nn.functional.one_hot(labels, CLASSES).float())
    base = losses.cross_entropy(crypten_single.cryptensor(logits), target)[0]
    shifted = losses.cross_entropy(crypten_single.cryptensor(logits + 25.0), target)[0]
    assert abs(_finished(base, ROWS) - _finished(shifted, ROWS)) < 0.001


def test_the_owner_finishes_short_batches_and_flags_wrapped_terms() -> None:
    # 10 records in batches of 4: steps of 4, 4 and 2; what lies beyond a short batch is padding.
    assert lossterms.batch_sizes(10, 4, 6) == [4, 4, 2, 4, 4, 2]
    values = np.array(
        [
            [0.5, 1.0, 2.0, 4.0, 8.0],
            [1.0, 1.0, 1.0, 0.0, -3.0],  # wrapped-around values: a finite loss all the same
            [0.2, 1.0, 2.0, 99.0, -5.0],
        ]
    )
    got = lossterms.finish(values, count=10, batch_size=4)
    assert got[0] == pytest.approx((0.5 + np.log(64.0)) / 4)
    assert got[1] == pytest.approx((1.0 + np.log(2.0**-16) + np.log(3.0)) / 4)
    assert got[2] == pytest.approx((0.2 + np.log(2.0)) / 2)
    assert lossterms.finish(np.array([[0.3], [0.2]]), count=10, batch_size=4).tolist() == [0.3, 0.2]
