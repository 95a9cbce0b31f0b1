"""Deployment mode: one flow per deployment; the pipeline dispatches each stage to its pool.

Flow parameters are readable by every worker of the server (so by each cluster's operators):
they carry only public values. Owner stages get a run id and read the run's settings from the
owner's private folder (veiltrain.ownerhome); parties get the public TrainJob and their store.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from veiltrain import owner, ownerhome
from veiltrain.config import RunConfig
from veiltrain.tasks import dispatch
from veiltrain.tasks import stages as tasks

PIPELINE = "veiltrain-deployed/pipeline"


# ------------------------------------------------------------------ owner stages (pool: owner)


@flow(name="encrypt-dataset")
def encrypt_dataset(run_id: str) -> dict[str, Any]:
    """Owner: encode and split the training set into per-party shares (staged)."""
    return tasks.encrypt_dataset(ownerhome.load_run(run_id)).model_dump(mode="json")


@flow(name="encrypt-model")
def encrypt_model(run_id: str) -> dict[str, Any]:
    """Owner: share the model's initial parameters per party (staged)."""
    return tasks.encrypt_model(ownerhome.load_run(run_id)).model_dump(mode="json")


@flow(name="upload")
def upload(run_id: str) -> dict[str, Any]:
    """Owner: copy each party's shares to its own bucket, manifest last, verified."""
    return tasks.upload(ownerhome.load_run(run_id)).model_dump(mode="json")


@flow(name="decrypt-and-report")
def decrypt_and_report(
    run_id: str, stage_seconds: dict[str, float], publish_metrics: bool = True
) -> dict[str, Any]:
    """Owner: reconstruct loss curve and model; the report stays in the owner's folder."""
    cfg = ownerhome.load_run(run_id)
    report = tasks.decrypt_and_report(cfg, stage_seconds, publish_metrics)
    return {"run_id": run_id, "steps": len(report["losses"])}


# ------------------------------------------------------------------- the DAG (pool: owner)


def _run_config(run_id: str, profile: str) -> RunConfig:
    """A triggered run's saved settings, or a scheduled run's: the profile, as a new run."""
    if run_id:
        return ownerhome.load_run(run_id)
    # Stable across Retry (same flow run): the scheduled time and the flow run's id.
    when = flow_run.scheduled_start_time.strftime("%Y%m%d-%H%M%S")
    new_id = f"{when}-{str(flow_run.id)[:6]}"
    cfg = ownerhome.for_run(ownerhome.load_profile(profile), new_id, ownerhome.home())
    ownerhome.save_run(cfg)
    return cfg


def _timed(seconds: dict[str, float], name: str, started: float) -> None:
    seconds[name] = round(time.monotonic() - started, 3)


@flow(name="veiltrain-deployed", log_prints=True)
def pipeline(run_id: str = "", profile: str = "default", publish_metrics: bool = True) -> str:
    """encrypt_dataset -> encrypt_model -> upload -> train (parties + dealer) -> report.

    run_id names settings the owner saved (`veiltrain run --deployed`); without it (a
    scheduled run) the named profile is trained on the data source's current contents.
    """
    cfg = _run_config(run_id, profile)
    get_run_logger().info("run %s: %d parties", cfg.run_id, cfg.parties)
    seconds: dict[str, float] = {}
    for stage in ("encrypt-dataset", "encrypt-model", "upload"):
        started = time.monotonic()
        dispatch.dispatch(f"{stage}/{stage}", {"run_id": cfg.run_id})
        _timed(seconds, stage.replace("-", "_"), started)
    started = time.monotonic()
    dispatch.train(owner.train_job(cfg), cfg.stores())
    _timed(seconds, "train", started)
    params = {"run_id": cfg.run_id, "stage_seconds": seconds, "publish_metrics": publish_metrics}
    dispatch.dispatch("decrypt-and-report/decrypt-and-report", params)
    return cfg.run_id
