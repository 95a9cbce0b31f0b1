"""One Prefect flow per stage; each takes and returns only JSON-friendly values."""

from __future__ import annotations

from typing import Any

from prefect import flow

from veiltrain.config import RunConfig
from veiltrain.tasks import stages


@flow(name="encrypt-dataset", log_prints=True)
def encrypt_dataset(config: RunConfig) -> dict[str, Any]:
    """Owner: encode and split the training set into per-party shares (staged)."""
    result: dict[str, Any] = stages.split_dataset(config)
    return result


@flow(name="encrypt-model", log_prints=True)
def encrypt_model(config: RunConfig) -> dict[str, Any]:
    """Owner: share the model's initial parameters per party (staged)."""
    result: dict[str, Any] = stages.split_model(config)
    return result


@flow(name="upload", log_prints=True)
def upload(config: RunConfig) -> dict[str, Any]:
    """Owner: copy each party's shares to its own store, manifest last, verified."""
    result: dict[str, Any] = stages.upload_shares(config)
    return result


@flow(name="train", log_prints=True)
def train(config: RunConfig, count: int) -> dict[str, Any]:
    """Parties and dealer: train on shares; each party writes only its own shares."""
    result: dict[str, Any] = stages.train_parties(config, stages.steps_total(config, count))
    return result


@flow(name="decrypt-and-report", log_prints=True)
def decrypt_and_report(config: RunConfig, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """Owner: reconstruct loss curve and model, evaluate, publish the report."""
    result: dict[str, Any] = stages.decrypt_report(config, stage_seconds)
    return result
