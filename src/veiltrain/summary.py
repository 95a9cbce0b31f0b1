"""The run summary, formatted once: the CLI prints it, the Prefect report artifact bullets it."""

from __future__ import annotations

from typing import Any


def summary_lines(report: dict[str, Any], seconds: float | None = None) -> list[str]:
    """A headline, then one line per result; plain text, no markup, labels aligned.

    `report` is what `report.build_report` returns; `seconds` is the whole run's wall time,
    left out of the headline when not given.
    """
    r = report
    took = "" if seconds is None else f" in {seconds:.0f} s"
    stages = ", ".join(f"{name} {s:.1f}s" for name, s in r["stage_seconds"].items())
    return [
        f"veiltrain run {r['run_id']}: {r['parties']} parties, {r['epochs']} epochs, "
        f"{len(r['losses'])} steps{took}",
        f"test accuracy (trained on shares): {r['test_accuracy']:.2%}",
        f"plaintext shadow accuracy:         {r['plaintext_test_accuracy']:.2%}",
        f"largest loss gap vs plaintext:     {r['max_loss_gap']:.4f}",
        f"final loss: {r['losses'][-1]:.4f} (plaintext {r['plaintext_losses'][-1]:.4f})",
        f"stages: {stages}",
    ]
