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
    audit = [_audit_line(r["audit"])] if "audit" in r else []
    rollbacks = [_rollback_line(r["rollbacks"])] if r.get("rollbacks") else []
    return [
        f"veiltrain run {r['run_id']}: {r['parties']} parties, {r['epochs']} epochs, "
        f"{len(r['losses'])} steps{took}",
        f"test accuracy (trained on shares): {r['test_accuracy']:.2%}",
        f"plaintext shadow accuracy:         {r['plaintext_test_accuracy']:.2%}",
        f"largest loss gap vs plaintext:     {r['max_loss_gap']:.4f}",
        *_rounding(r),
        *_same_weights(r),
        f"final loss: {r['losses'][-1]:.4f} (plaintext {r['plaintext_losses'][-1]:.4f})",
        f"stages: {stages}",
        *_truncation(r),
        *audit,
        *rollbacks,
    ]


def _rounding(report: dict[str, Any]) -> list[str]:
    """How far plaintext training alone moves when its initial weights are rounded as shares."""
    if "plaintext_rounding_gap" not in report:  # reports written before it was measured
        return []
    return [
        f"plaintext vs itself, init rounded: {report['plaintext_rounding_gap']:.4f} "
        f"(weights rounded to 2^-{report['precision_bits']}: training's own sensitivity)"
    ]


def _same_weights(report: dict[str, Any]) -> list[str]:
    """The decrypted loss against plaintext's on the parties' own weights, where checked."""
    rows = report.get("same_weights_losses")
    if not rows:  # a model with dropout, or a report written before it was checked
        return []
    return [
        f"loss gap on the same weights:      {report['same_weights_gap']:.4f} "
        f"(first step of {len(rows)} epoch{'s' if len(rows) > 1 else ''}: the error of "
        "computing on shares)"
    ]


def _truncation(report: dict[str, Any]) -> list[str]:
    """'truncation: exact (auto: 0.014 share-wise wraps expected at local)'."""
    chosen = report.get("truncation")
    if chosen is None:  # reports written before it was a choice
        return []
    expected = chosen["expected_local_wraps"]
    why = (
        ""
        if expected is None
        else f" ({chosen['asked']}: {expected:.2g} share-wise wraps expected at local)"
    )
    return [f"truncation: {chosen['mode']}{why}"]


def _rollback_line(rollbacks: list[dict[str, Any]]) -> str:
    """'divergence watchdog: 1 rollback (epoch 1 -> lr 2); see report.json' (a retry after a
    lone bad step reads 'epoch 1 retried at lr 20')."""
    steps = ", ".join(
        f"epoch {r['epoch']} {'retried at' if r.get('retry') else '->'} lr {r['lr']:g}"
        for r in rollbacks
    )
    plural = "s" if len(rollbacks) > 1 else ""
    return f"divergence watchdog: {len(rollbacks)} rollback{plural} ({steps}); see report.json"


def _audit_line(stores: list[dict[str, Any]]) -> str:
    """'audit: 2 party stores clean', or how many findings in how many stores."""
    dirty = [s for s in stores if not s["clean"]]
    if not dirty:
        return f"audit: {len(stores)} party stores clean"
    findings = sum(len(s["findings"]) for s in dirty)
    unread = sum(1 for s in dirty if "error" in s)
    return (
        f"audit: {findings} findings in {len(dirty)} of {len(stores)} party stores"
        + (f" ({unread} could not be read)" if unread else "")
        + "; see report.json"
    )
