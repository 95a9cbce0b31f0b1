"""The reveal ledger: complete for a run, and no reconstruction outside the owner's process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from veiltrain import launch, ledger, lossterms, owner, report, sharing
from veiltrain.config import RunConfig, load_config

pytestmark = pytest.mark.slow

NO_REVEAL_PARTY = [sys.executable, str(Path(__file__).with_name("noreveal_party.py"))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """A small run trained by parties in which every reconstruction path raises."""
    out = tmp_path_factory.mktemp("ledger") / "run"
    options = {"max_samples": 120, "batch_size": 32, "test_fraction": 0.25, "epochs": 2}
    cfg = load_config(**options, timeout_s=60, out=str(out)).resolved()
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    events: list[dict[str, Any]] = []
    launch.run_local(cfg.stores(), owner.train_job(cfg), events.append, entry=NO_REVEAL_PARTY)
    assert [e for e in events if e["event"] == "step"]  # the parties trained all the same
    return cfg


def test_the_no_reveal_party_really_refuses() -> None:
    import subprocess

    code = "import noreveal_party as n; n.install(); from veiltrain import sharing; "
    code += "sharing.reconstruct([[1], [2]])"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "RevealAttempt" in done.stderr


def test_every_owner_reconstruction_is_in_the_ledger(
    trained: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    revealed: list[int] = []
    original = sharing.reconstruct

    def counted(shares: Any) -> Any:
        values = original(shares)
        revealed.append(int(np.asarray(values).size))
        return values

    monkeypatch.setattr(sharing, "reconstruct", counted)
    result = report.build_report(trained, {})
    entries = ledger.entries(trained.out, trained.run_id)
    assert result["reveals"] == entries
    assert sum(e["count"] for e in entries) == sum(revealed) > 0  # nothing revealed unrecorded
    by_what = {e["what"]: e for e in entries}
    # Per step, the cross-entropy's terms: one sum and one s_i per sample (veiltrain.lossterms).
    width = lossterms.width(trained.loss, trained.batch_size)
    assert by_what["training loss"]["count"] == len(result["losses"]) * width
    # The final model, and epoch 1's for the check of epoch 2's first loss on the same weights.
    params = [(e["epoch"], e["purpose"]) for e in entries if e["what"] == "model parameters"]
    assert sorted(params) == [(1, "report: loss on the same weights"), (2, "report")]
    assert all(e["pid"] == os.getpid() and e["run_id"] == trained.run_id for e in entries)
    on_disk = json.loads(Path(trained.out, "report.json").read_text())
    assert on_disk["reveals"] == entries


def test_a_second_report_appends_and_never_rewrites(trained: RunConfig) -> None:
    before = ledger.entries(trained.out, trained.run_id)
    report.build_report(trained, {})
    after = ledger.entries(trained.out, trained.run_id)
    assert after[: len(before)] == before and len(after) == len(before) + 3


def test_a_model_with_dropout_is_not_checked_on_the_same_weights(
    trained: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plaintext cannot replay the parties' dropout masks: no figure rather than a wrong one."""
    restore = report.restore_model

    def with_dropout(cfg: RunConfig, state: Any) -> Any:
        return torch.nn.Sequential(restore(cfg, state), torch.nn.Dropout(0.5))

    monkeypatch.setattr(report, "restore_model", with_dropout)
    result = report.build_report(trained, {})
    assert result["same_weights_losses"] is None and result["same_weights_gap"] is None
