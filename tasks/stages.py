"""Prefect tasks: each wraps one library call; retries are declared for transient I/O only."""

from __future__ import annotations

import base64
import math
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from veiltrain import launch, owner, report
from veiltrain.config import RunConfig
from veiltrain.errors import StoreError
from veiltrain.progress import TrainingProgress

_TRANSIENT = (StoreError, TimeoutError, ConnectionError)


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry store hiccups and timeouts; never retry bad input or integrity failures."""
    return isinstance(state.result(raise_on_failure=False), _TRANSIENT)


IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 5, 15],
    "retry_condition_fn": transient_only,
}


@task(name="split-dataset", **IO_RETRIES)
def split_dataset(cfg: RunConfig) -> dict[str, Any]:
    """Encode, split and stage the training set; the test split stays with the owner."""
    return owner.encrypt_dataset(cfg)


@task(name="split-model", **IO_RETRIES)
def split_model(cfg: RunConfig) -> dict[str, Any]:
    """Share the initial parameters per party."""
    return owner.encrypt_model(cfg)


@task(name="upload-shares", **IO_RETRIES)
def upload_shares(cfg: RunConfig) -> dict[str, Any]:
    """Copy staged shares to each party's store; the manifest goes last."""
    return owner.upload(cfg)


@task(name="train-parties")
def train_parties(cfg: RunConfig, total_steps: int) -> dict[str, Any]:
    """Run every party and the dealer; no retries here: a rerun resumes from checkpoints."""
    artifact: UUID = create_progress_artifact(  # type: ignore[assignment]  # sync in a task
        0.0, key=_key("progress"), description=f"training run {cfg.run_id} on shares"
    )
    last = [0.0]

    def publish(fraction: float) -> None:
        if time.monotonic() - last[0] > 2 or fraction >= 1:  # keep API calls rare
            update_progress_artifact(artifact, progress=round(100 * fraction, 1))
            last[0] = time.monotonic()

    with TrainingProgress(total_steps, publish) as bar:
        return launch.run_local(cfg.stores(), owner.train_job(cfg), bar, logdir=f"{cfg.out}/logs")


@task(name="decrypt-report")
def decrypt_report(cfg: RunConfig, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """Reconstruct on the owner, evaluate, compare with plaintext, publish artifacts."""
    result = report.build_report(cfg, stage_seconds)
    _publish(cfg, result)
    return result


def _key(what: str) -> str:
    # Stable keys: the UI lists each key's versions, one per run (description names the run).
    return f"veiltrain-{what}"


def _publish(cfg: RunConfig, result: dict[str, Any]) -> None:
    rows = [
        {"step": i + 1, "decrypted_loss": round(a, 5), "plaintext_loss": round(b, 5)}
        for i, (a, b) in enumerate(zip(result["losses"], result["plaintext_losses"], strict=True))
    ]
    create_table_artifact(rows, key=_key("losses"), description=f"loss curve, run {cfg.run_id}")
    png = base64.b64encode(Path(cfg.out, "loss.png").read_bytes()).decode()
    create_markdown_artifact(
        _markdown(result, png),
        key=_key("report"),
        description=f"veiltrain report, run {cfg.run_id}",
    )


def _markdown(r: dict[str, Any], png_b64: str) -> str:
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items())
    return "\n".join(
        [
            f"# veiltrain run `{r['run_id']}`",
            f"- parties: {r['parties']}, epochs: {r['epochs']}, steps: {len(r['losses'])}",
            f"- test accuracy (trained on shares): **{r['test_accuracy']:.2%}**",
            f"- plaintext shadow accuracy: {r['plaintext_test_accuracy']:.2%}",
            f"- largest loss gap (decrypted vs plaintext): {r['max_loss_gap']:.4f}",
            f"- final loss: {r['losses'][-1]:.4f} (plaintext {r['plaintext_losses'][-1]:.4f})",
            f"- stage seconds: {seconds}",
            "",
            f"![loss curves](data:image/png;base64,{png_b64})",
        ]
    )


def steps_total(cfg: RunConfig, count: int) -> int:
    """Training steps a run takes."""
    return cfg.epochs * math.ceil(count / cfg.batch_size)
