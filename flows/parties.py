"""Deployment mode, the training stage: one party per cluster pool, the dealer on the owner's.

Kept apart from the owner stages so that a party's flow run imports no torch: three of these
start at once, and their start-up is the dispatch latency.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger

from veiltrain import launch
from veiltrain.contract import TrainJob


@flow(name="dealer")
def dealer(world_size: int, rendezvous: str, job: dict[str, Any]) -> dict[str, Any]:
    """Owner's domain: the dealer of multiplication triples for this run's parties."""
    train_job = TrainJob.from_json(json.dumps(job))
    progress = _log_progress("dealer")
    launch.run_one(world_size, world_size, "", train_job, rendezvous, on_event=progress)
    return {"role": "dealer"}


@flow(name="party")
def party(
    rank: int, world_size: int, rendezvous: str, job: dict[str, Any], store: str
) -> dict[str, Any]:
    """Party i, in its own trust domain, with only its own store keys: train on shares."""
    train_job = TrainJob.from_json(json.dumps(job))
    progress = _log_progress(f"party {rank}")
    launch.run_one(rank, world_size, store, train_job, rendezvous, on_event=progress)
    return {"role": f"party {rank}"}


def _log_progress(who: str) -> launch.ProgressFn:
    logger = get_run_logger()

    def on_event(event: dict[str, Any]) -> None:
        # Counts only (epochs, checkpoints): never a value, and rare enough for the API.
        if event.get("event") in ("start", "checkpoint", "done"):
            fields = {k: v for k, v in event.items() if k not in ("party", "pid")}
            logger.info("%s: %s", who, fields)

    return on_event
