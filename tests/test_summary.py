"""The run summary is formatted once, for the CLI and for the report artifact."""

from __future__ import annotations

from typing import Any

from veiltrain import cli
from veiltrain.schedule import steps_total
from veiltrain.summary import summary_lines

REPORT: dict[str, Any] = {
    "run_id": "run-1234",
    "parties": 2,
    "epochs": 3,
    "losses": [2.3, 1.0, 0.296],
    "plaintext_losses": [2.3, 0.9, 0.2604],
    "test_accuracy": 0.9443,
    "plaintext_test_accuracy": 0.9443,
    "max_loss_gap": 0.037,
    "stage_seconds": {"encrypt_dataset": 2.5, "train": 85.24},
}


def test_summary_lines_headline_then_one_line_per_result() -> None:
    lines = summary_lines(REPORT)
    assert lines[0] == "veiltrain run run-1234: 2 parties, 3 epochs, 3 steps"
    assert lines[1:] == [
        "test accuracy (trained on shares): 94.43%",
        "plaintext shadow accuracy:         94.43%",
        "largest loss gap vs plaintext:     0.0370",
        "final loss: 0.2960 (plaintext 0.2604)",
        "stages: encrypt_dataset 2.5s, train 85.2s",
    ]
    assert summary_lines(REPORT, 108.6)[0].endswith("3 steps in 109 s")


def test_the_rounding_gap_follows_the_loss_gap_when_measured() -> None:
    report = {**REPORT, "plaintext_rounding_gap": 0.2114, "precision_bits": 16}
    lines = summary_lines(report)
    assert lines[3:5] == [
        "largest loss gap vs plaintext:     0.0370",
        "plaintext vs itself, init rounded: 0.2114 "
        "(weights rounded to 2^-16: training's own sensitivity)",
    ]


def test_cli_prints_the_same_lines_indented() -> None:
    headline, *facts = summary_lines(REPORT, 109.0)
    assert cli._summary(REPORT, 109.0).splitlines() == [headline, *(f"  {f}" for f in facts)]


def test_steps_total_counts_the_short_last_batch() -> None:
    assert steps_total(epochs=2, count=150, batch_size=32) == 10
    assert steps_total(epochs=3, count=1437, batch_size=64) == 69
    assert steps_total(epochs=1, count=64, batch_size=64) == 1


def test_the_rounded_shadow_starts_on_the_fixed_point_grid() -> None:
    import torch

    from veiltrain.report import largest_gap, round_to_fixed_point

    state = {"w": torch.randn(1000), "steps": torch.arange(3)}
    rounded = round_to_fixed_point(state, 16)
    assert torch.equal(rounded["steps"], state["steps"])  # integer buffers untouched
    assert torch.equal(rounded["w"] * 2**16, torch.round(rounded["w"] * 2**16))
    assert 0 < (rounded["w"] - state["w"]).abs().max() <= 2**-17
    assert largest_gap([1.0, 2.0], [1.5, 1.0]) == 1.0 and largest_gap([], []) == 0.0


def test_the_same_weights_gap_follows_the_rounding_gap_when_checked() -> None:
    rows = [{"epoch": e, "step": 3 * e - 2, "decrypted": 1.0, "plaintext": 1.0} for e in (1, 2)]
    report = {**REPORT, "same_weights_losses": rows, "same_weights_gap": 0.0026}
    assert summary_lines(report)[4] == (
        "loss gap on the same weights:      0.0026 "
        "(first step of 2 epochs: the error of computing on shares)"
    )
    # A model with dropout is not checked (None): no line rather than a misleading one.
    unchecked = {**REPORT, "same_weights_losses": None, "same_weights_gap": None}
    assert summary_lines(unchecked) == summary_lines(REPORT)


def test_checked_epochs_spread_from_first_to_last() -> None:
    from veiltrain.report import checked_epochs

    assert checked_epochs(3) == [1, 2, 3]
    assert checked_epochs(8) == list(range(1, 9))
    assert checked_epochs(100) == [1, 15, 29, 43, 58, 72, 86, 100]
    assert checked_epochs(9, most=3) == [1, 5, 9]
