"""The whole DAG as one parent flow; in this inline mode every stage runs as a subflow."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from veiltrain import progress
from veiltrain.config import RunConfig, preflight
from veiltrain.flows import stages

P = ParamSpec("P")
R = TypeVar("R")


def _timed(
    seconds: dict[str, float], name: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> R:
    progress.entered(name)
    started = time.monotonic()
    result = fn(*args, **kwargs)
    seconds[name] = round(time.monotonic() - started, 3)
    return result


def _with_run_id(config: RunConfig) -> RunConfig:
    # A retried flow run keeps its id, so its stages find the same stores and checkpoints.
    if config.run_id:
        return config.resolved()
    run_id = f"run-{str(flow_run.id or 'local')[:8]}"
    return config.model_copy(update={"run_id": run_id}).resolved()


@flow(name="veiltrain-pipeline", log_prints=True)
def pipeline(config: RunConfig) -> dict[str, Any]:
    """encrypt_dataset + encrypt_model -> upload -> train -> decrypt_and_report."""
    cfg = _with_run_id(config)
    preflight(cfg)
    get_run_logger().info("run %s: %d parties, stores %s", cfg.run_id, cfg.parties, cfg.stores())
    seconds: dict[str, float] = {}
    dataset = _timed(seconds, "encrypt_dataset", stages.encrypt_dataset, cfg)
    _timed(seconds, "encrypt_model", stages.encrypt_model, cfg)
    _timed(seconds, "upload", stages.upload, cfg)
    _timed(seconds, "train", stages.train, cfg, dataset.count)
    return _timed(seconds, "decrypt_and_report", stages.decrypt_and_report, cfg, seconds)
