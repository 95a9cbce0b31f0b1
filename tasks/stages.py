"""Prefect tasks: each wraps one library call; retries are declared for transient I/O only."""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from veiltrain import launch, owner, report, watchdog
from veiltrain.config import RunConfig
from veiltrain.contract import DatasetFacts, ModelFacts, TrainJob, TrainRun, UploadCounts
from veiltrain.errors import VeiltrainError, is_transient
from veiltrain.progress import TrainingProgress
from veiltrain.summary import summary_lines


class ExpectedErrors(logging.Filter):
    """Prefect logs a failed task or flow run at ERROR with its whole stack, and again in every
    flow above it. A VeiltrainError is expected: its message already says what and what to do.
    So it is logged once, as one line where it happened, and its stack only at DEBUG.

    A logging filter on Prefect's run loggers is the mechanism Prefect's own logging.yml offers
    for this; catching the error in each task instead would still leave the flow engines'
    "Encountered exception" records with their stacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass every record but an expected error's: that one is re-emitted in one line."""
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, VeiltrainError) or record.levelno <= logging.DEBUG:
            return True
        logger = logging.getLogger(record.name)
        stack = logging.makeLogRecord(
            {**record.__dict__, "levelno": logging.DEBUG, "levelname": "DEBUG"}
        )
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if not getattr(exc, "_veiltrain_logged", False):
            exc._veiltrain_logged = True  # type: ignore[attr-defined]
            logger.handle(record)  # passes this filter now: it has no exception any more
        if logger.isEnabledFor(logging.DEBUG):
            stack.msg, stack.args = "stack of the error above: %r", (exc,)
            logger.handle(stack)
        return False


def quiet_expected_errors() -> None:
    """Install ExpectedErrors on Prefect's task and flow run loggers (idempotent)."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedErrors) for f in logger.filters):
            logger.addFilter(ExpectedErrors())


# Every process that runs these tasks (inline CLI, deployed workers) imports this module.
quiet_expected_errors()


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry an unreachable or slow store only: a missing object, a denied credential, bad input
    and integrity failures fail at once (a retry would fail the same way)."""
    return is_transient(state.result(raise_on_failure=False))


IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 5, 15],
    "retry_condition_fn": transient_only,
}


@task(name="encrypt-dataset", **IO_RETRIES)
def encrypt_dataset(cfg: RunConfig) -> DatasetFacts:
    """Encode, split and stage the training set; the test split stays with the owner."""
    return owner.encrypt_dataset(cfg)


@task(name="encrypt-model", **IO_RETRIES)
def encrypt_model(cfg: RunConfig) -> ModelFacts:
    """Share the initial parameters per party."""
    return owner.encrypt_model(cfg)


@task(name="upload", **IO_RETRIES)
def upload(cfg: RunConfig) -> UploadCounts:
    """Copy staged shares to each party's store; the manifest goes last."""
    return owner.upload(cfg)


@task(name="train")
def train(cfg: RunConfig, total_steps: int) -> TrainRun:
    """Run every party and the dealer; no retries here: a rerun resumes from checkpoints."""
    artifact: UUID = create_progress_artifact(  # type: ignore[assignment]  # sync in a task
        0.0, key=_key("progress"), description=f"training run {cfg.run_id} on shares"
    )
    last = [0.0]

    def publish(fraction: float) -> None:
        if time.monotonic() - last[0] > 2 or fraction >= 1:  # keep API calls rare
            update_progress_artifact(artifact, progress=round(100 * fraction, 1))
            last[0] = time.monotonic()

    def run_parties(job: TrainJob) -> TrainRun:
        return launch.run_local(cfg.stores(), job, bar, logdir=f"{cfg.out}/logs")

    # The watchdog decrypts the loss curve after training and, if it diverged, rolls back and
    # reruns the parties with a lower learning rate (veiltrain.watchdog).
    with TrainingProgress(total_steps, publish) as bar:
        return watchdog.supervise(
            cfg, owner.train_job(cfg), run_parties, notify=get_run_logger().warning
        )


# Never persisted: the report holds owner settings (data location, seed) and the result store
# is shared with every pool in deployment mode.
@task(name="decrypt-and-report", persist_result=False)
def decrypt_and_report(
    cfg: RunConfig, stage_seconds: dict[str, float], publish_metrics: bool = True
) -> dict[str, Any]:
    """Reconstruct on the owner, evaluate, compare with plaintext, publish artifacts.

    The artifacts (decrypted loss curve, accuracy) are readable by every worker of the Prefect
    server; publish_metrics=False keeps them in the owner's report only.
    """
    result = report.build_report(cfg, stage_seconds)
    if publish_metrics:
        _publish(cfg, result)
    else:
        create_markdown_artifact(
            f"# veiltrain run {cfg.run_id}\n\nCompleted; the decrypted results are in the "
            "owner's report only (metrics publishing is off).",
            key=_key("report"),
            description=f"veiltrain report, run {cfg.run_id}",
        )
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
    create_table_artifact(
        result.get("reveals", []),
        key=_key("reveals"),
        description=f"reveal ledger, run {cfg.run_id}: every value the owner reconstructed",
    )
    png = base64.b64encode(Path(cfg.out, "loss.png").read_bytes()).decode()
    create_markdown_artifact(
        _markdown(result, png),
        key=_key("report"),
        description=f"veiltrain report, run {cfg.run_id}",
    )


def _markdown(result: dict[str, Any], png_b64: str) -> str:
    headline, *facts = summary_lines(result)
    bullets = [f"- {fact}" for fact in facts]
    image = f"![loss curves](data:image/png;base64,{png_b64})"
    return "\n".join([f"# {headline}", *bullets, "", image])
