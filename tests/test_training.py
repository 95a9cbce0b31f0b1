"""Training on shares without Prefect: resume from checkpoints, and failures that name a party."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from veiltrain import launch, owner, report
from veiltrain.config import RunConfig, load_config
from veiltrain.contract import TrainJob
from veiltrain.errors import IntegrityError, PartyError
from veiltrain.store import Location

pytestmark = pytest.mark.slow


def _prepared(tmp_path: Path, **options: Any) -> tuple[RunConfig, TrainJob]:
    base = {"max_samples": 120, "batch_size": 32, "test_fraction": 0.25, "timeout_s": 60}
    cfg = load_config(**{**base, "out": str(tmp_path / "run"), **options}).resolved()
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    return cfg, owner.train_job(cfg)


def _train(cfg: RunConfig, job: TrainJob) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    launch.run_local(cfg.stores(), job, events.append)
    return events


def _starts(events: list[dict[str, Any]]) -> set[int]:
    return {e["epoch"] for e in events if e["event"] == "start"}


def test_rerun_resumes_from_newest_common_checkpoint_with_plaintext_parity(tmp_path: Path) -> None:
    cfg, job = _prepared(tmp_path, epochs=3)
    assert _starts(_train(cfg, replace(job, epochs=1))) == {1}
    # Party 1 lost its epoch-2 checkpoint record: both parties must restart at epoch 2.
    assert _starts(_train(cfg, replace(job, epochs=2))) == {2}
    Location(cfg.stores()[1]).remove("checkpoints/epoch-0002/checkpoint.json")
    assert _starts(_train(cfg, job)) == {2}
    result = report.build_report(cfg, {})
    # Resumed training must equal uninterrupted plaintext training step by step.
    assert len(result["losses"]) == 3 * 3
    assert result["max_loss_gap"] < 0.05


def test_finished_run_trains_no_more(tmp_path: Path) -> None:
    cfg, job = _prepared(tmp_path, epochs=1)
    _train(cfg, job)
    events = _train(cfg, job)
    assert not [e for e in events if e["event"] == "step"]


def test_a_party_with_the_wrong_store_fails_the_stage_by_name(tmp_path: Path) -> None:
    cfg, job = _prepared(tmp_path, epochs=1)
    stores = [cfg.stores()[0], str(tmp_path / "nowhere")]
    with pytest.raises(PartyError, match="party 1") as caught:
        launch.run_local(stores, job, lambda e: None)
    assert "not found" in str(caught.value)


def test_settings_changes_are_not_resumed(tmp_path: Path) -> None:
    cfg, job = _prepared(tmp_path, epochs=1)
    _train(cfg, job)
    other = replace(job, lr=job.lr / 2, settings_hash="0" * 64)
    assert _starts(_train(cfg, other)) == {1}
    # The owner notices that the stored checkpoints no longer match the run's settings.
    with pytest.raises(IntegrityError, match="no complete checkpoint"):
        report.reconstruct(cfg)


def test_checkpoints_of_different_attempts_are_never_combined(tmp_path: Path) -> None:
    cfg, job = _prepared(tmp_path, epochs=2)
    _train(cfg, job)
    party1 = Location(cfg.stores()[1])
    stale = {n: party1.read_bytes(n) for n in party1.list("checkpoints/epoch-0002")}
    for url in cfg.stores():  # both parties redo epoch 2 together: a new attempt
        Location(url).remove("checkpoints/epoch-0002/checkpoint.json")
    assert _starts(_train(cfg, job)) == {2}
    for name, blob in stale.items():  # party 1's store is rolled back to the old attempt
        party1.write_bytes(name, blob)
    # Sizes match and each record verifies on its own, but epoch 2 mixes two attempts.
    assert report.reconstruct(cfg).epochs == 1
    assert _starts(_train(cfg, job)) == {2}  # resumed from epoch 1, the newest agreed
    result = report.build_report(cfg, {})
    assert result["epochs"] == 2 and result["max_loss_gap"] < 0.05


def test_training_completes_when_torch_generators_are_trapped(tmp_path: Path) -> None:
    """Every process, dealer included, raises on any protocol draw from a torch generator."""
    cfg, job = _prepared(tmp_path, epochs=1)
    trap = [sys.executable, str(Path(__file__).with_name("trap_party.py"))]
    events: list[dict[str, Any]] = []
    launch.run_local(cfg.stores(), job, events.append, entry=trap)
    assert [e for e in events if e["event"] == "step"]
    result = report.build_report(cfg, {})
    assert result["max_loss_gap"] < 0.05  # parity with plaintext unchanged
