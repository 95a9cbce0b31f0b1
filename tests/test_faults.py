"""Failures that lose nothing: a party or the dealer killed mid-epoch, then a resumed rerun."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from veiltrain import launch, owner, report
from veiltrain.config import RunConfig, load_config
from veiltrain.contract import TrainJob
from veiltrain.errors import PartyError
from veiltrain.store import Location

pytestmark = pytest.mark.slow

PARTIES = 2


def _prepared(tmp_path: Path) -> tuple[RunConfig, TrainJob]:
    # Batches of 8: 15 steps an epoch, so that epoch 2 outlasts the launcher's polling of events
    # (with 4 steps of 32 on a fast machine, epoch 2 once checkpointed before the kill landed).
    options = {"max_samples": 160, "batch_size": 8, "test_fraction": 0.25, "epochs": 2}
    cfg = load_config(**options, timeout_s=60, out=str(tmp_path / "run")).resolved()
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    return cfg, owner.train_job(cfg)


class _KillMidEpoch2:
    """An event sink that SIGKILLs one process once every party has checkpointed epoch 1 and
    training of epoch 2 is under way (a step event arrives after those checkpoints)."""

    def __init__(self, victim: str) -> None:
        self.victim, self.pids, self.checkpointed = victim, dict[str, int](), set[str]()
        self.killed = False

    def __call__(self, event: dict[str, Any]) -> None:
        self.pids.setdefault(event["party"], event["pid"])
        if event["event"] == "checkpoint" and event.get("epoch") == 1:
            self.checkpointed.add(event["party"])
        mid_epoch = event["event"] == "step" and len(self.checkpointed) == PARTIES
        if mid_epoch and not self.killed:
            os.kill(self.pids[self.victim], signal.SIGKILL)
            self.killed = True


def _attempt(cfg: RunConfig, epoch: int) -> int:
    record = Location(cfg.stores()[0]).read_json(f"checkpoints/epoch-{epoch:04d}/checkpoint.json")
    return int(record["attempt"])


@pytest.mark.parametrize("victim", ["party 1", "dealer"])
def test_a_process_killed_mid_epoch_fails_by_name_and_a_rerun_resumes(
    tmp_path: Path, victim: str
) -> None:
    cfg, job = _prepared(tmp_path)
    killer = _KillMidEpoch2(victim)
    with pytest.raises(PartyError) as caught:
        launch.run_local(cfg.stores(), job, killer)
    assert killer.killed
    message = str(caught.value)
    assert message.startswith(f"{victim} was killed (SIGKILL)"), message
    assert "resumes from the newest checkpoint" in message
    # Nothing half-written of epoch 2 counts: the owner sees epoch 1, complete.
    assert report.reconstruct(cfg).epochs == 1
    events: list[dict[str, Any]] = []
    launch.run_local(cfg.stores(), job, events.append)
    assert {e["epoch"] for e in events if e["event"] == "start"} == {2}  # resumed, not redone
    assert _attempt(cfg, 1) != _attempt(cfg, 2)
    result = report.build_report(cfg, {})
    # The stated tolerance for interrupted training: the same as for uninterrupted training.
    # Fixed-point truncation makes the shares' model differ from the plaintext one by rounding
    # only, and the plaintext shadow trains the same batches without interruption.
    assert len(result["losses"]) == 2 * 15
    assert result["max_loss_gap"] < 0.05
    assert abs(result["test_accuracy"] - result["plaintext_test_accuracy"]) <= 0.05
