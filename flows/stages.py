"""One Prefect flow per stage; each takes and returns only small JSON-friendly values."""

from __future__ import annotations

from typing import Any

from prefect import flow

from veiltrain.config import RunConfig
from veiltrain.contract import DatasetFacts, ModelFacts, TrainRun, UploadCounts
from veiltrain.schedule import steps_total
from veiltrain.tasks import stages as tasks


@flow(name="encrypt-dataset", log_prints=True)
def encrypt_dataset(config: RunConfig) -> DatasetFacts:
    """Owner: encode and split the training set into per-party shares (staged)."""
    return tasks.encrypt_dataset(config)


@flow(name="encrypt-model", log_prints=True)
def encrypt_model(config: RunConfig) -> ModelFacts:
    """Owner: share the model's initial parameters per party (staged)."""
    return tasks.encrypt_model(config)


@flow(name="upload", log_prints=True)
def upload(config: RunConfig) -> UploadCounts:
    """Owner: copy each party's shares to its own store, manifest last, verified."""
    return tasks.upload(config)


@flow(name="train", log_prints=True)
def train(config: RunConfig, count: int) -> TrainRun:
    """Parties and dealer: train on shares; each party writes only its own shares."""
    return tasks.train(config, steps_total(config.epochs, count, config.batch_size))


@flow(name="decrypt-and-report", log_prints=True)
def decrypt_and_report(config: RunConfig, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """Owner: reconstruct loss curve and model, evaluate, publish the report."""
    return tasks.decrypt_and_report(config, stage_seconds)
