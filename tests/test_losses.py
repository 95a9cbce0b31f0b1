"""The log-sum-exp cross-entropy and the row maximum on shares, against plain torch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from crypten_world import one_party
from veiltrain import losses

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


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0, 10.0])
def test_cross_entropy_matches_torch_from_uncertain_to_confident(
    crypten_single: Any, scale: float
) -> None:
    logits, labels = _batch(scale, seed=int(scale * 100))
    target = torch.nn.functional.one_hot(labels, CLASSES).float()
    loss, grad = losses.cross_entropy(
        crypten_single.cryptensor(logits), crypten_single.cryptensor(target)
    )
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert abs(float(loss.get_plain_text()) - float(expected)) < 0.01
    expected_grad = (logits.softmax(1) - target) / ROWS
    assert float((grad.get_plain_text() - expected_grad).abs().max()) * ROWS < 0.01
    # Stock CrypTen on the same confident batch is off by units, not hundredths.
    if scale == 10.0:
        stock = crypten_single.cryptensor(logits).cross_entropy(crypten_single.cryptensor(target))
        assert abs(float(stock.get_plain_text()) - float(expected)) > 0.5


def test_mse_matches_torch(crypten_single: Any) -> None:
    out, target = _batch(1.0, seed=3)[0], _batch(1.0, seed=4)[0]
    loss, grad = losses.value_and_grad(
        "mse", crypten_single.cryptensor(out), crypten_single.cryptensor(target)
    )
    assert abs(float(loss.get_plain_text()) - float(((out - target) ** 2).mean())) < 1e-3
    expected = 2 * (out - target) / out.numel()
    assert float((grad.get_plain_text() - expected).abs().max()) < 1e-4


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
    assert abs(float(base.get_plain_text()) - float(shifted.get_plain_text())) < 0.005
