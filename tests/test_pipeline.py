"""End-to-end runs of the inline pipeline: Prefect flows, real party processes, local stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from veiltrain import cli, runstate
from veiltrain.config import RunConfig, load_config
from veiltrain.ffrecord import FileReader
from veiltrain.store import Location

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

QUICK = {"max_samples": 200, "epochs": 2, "batch_size": 32, "test_fraction": 0.25, "timeout_s": 120}
REPORT_KEYS = {
    "run_id",
    "parties",
    "epochs",
    "losses",
    "plaintext_losses",
    "test_accuracy",
    "plaintext_test_accuracy",
    "stage_seconds",
    "party_stores",
    "max_loss_gap",
}


def _run(tmp_path: Path, **options: Any) -> tuple[RunConfig, dict[str, Any]]:
    cfg = load_config(**{**QUICK, "out": str(tmp_path / "run"), **options}).resolved()
    return cfg, cli.run(cfg)


@pytest.fixture(scope="module")
def two_party(
    tmp_path_factory: pytest.TempPathFactory, prefect_server: None
) -> tuple[RunConfig, dict[str, Any]]:
    return _run(tmp_path_factory.mktemp("two"), parties=2)


def test_two_party_report_is_complete_and_consistent(
    two_party: tuple[RunConfig, dict[str, Any]],
) -> None:
    cfg, report = two_party
    on_disk = json.loads(Path(cfg.out, "report.json").read_text())
    assert set(on_disk) >= REPORT_KEYS
    assert on_disk["run_id"] == cfg.run_id and on_disk["parties"] == 2 and on_disk["epochs"] == 2
    steps = 2 * int(np.ceil(150 / 32))
    assert len(on_disk["losses"]) == len(on_disk["plaintext_losses"]) == steps
    assert on_disk["party_stores"] == cfg.stores()
    assert set(on_disk["stage_seconds"]) >= {"encrypt_dataset", "encrypt_model", "upload", "train"}
    assert Path(cfg.out, "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decrypted_losses_track_the_plaintext_shadow(
    two_party: tuple[RunConfig, dict[str, Any]],
) -> None:
    _, report = two_party
    losses, plain = np.array(report["losses"]), np.array(report["plaintext_losses"])
    assert np.all(np.isfinite(losses))
    assert np.max(np.abs(losses - plain)) == pytest.approx(report["max_loss_gap"])
    assert report["max_loss_gap"] < 0.05  # fixed-point and approximation error only
    assert losses[-1] < losses[0]  # it learned
    assert abs(report["test_accuracy"] - report["plaintext_test_accuracy"]) <= 0.02
    # the second shadow starts from the rounded weights: a different curve, close for this net
    rounded = np.array(report["plaintext_rounded_losses"])
    assert len(rounded) == len(plain) and np.any(rounded != plain)
    assert np.max(np.abs(rounded - plain)) == pytest.approx(report["plaintext_rounding_gap"])
    assert report["plaintext_rounding_gap"] < 0.01
    assert abs(report["plaintext_rounded_test_accuracy"] - report["plaintext_test_accuracy"]) < 0.05


def _int64_words(loc: Location, name: str) -> np.ndarray[Any, Any]:
    if name.endswith(".safetensors"):
        tensors = load_safetensors(loc.read_bytes(name))
        assert all(t.dtype == torch.int64 for t in tensors.values()), name
        return np.concatenate([t.numpy().ravel() for t in tensors.values()])
    with FileReader(loc.path(name), fs=loc.fs) as reader:
        return np.concatenate([r.view("<i8") for r in reader.read(range(reader.n))])


def test_party_stores_hold_nothing_data_like(two_party: tuple[RunConfig, dict[str, Any]]) -> None:
    cfg, _ = two_party
    scale = 2.0**cfg.precision_bits
    for party, url in enumerate(cfg.stores()):
        loc = Location(url)
        binary = [n for n in loc.list() if n.endswith((".ffr", ".safetensors"))]
        assert binary, f"party {party} store is empty"
        words = np.concatenate([_int64_words(loc, n) for n in binary])
        magnitudes = np.abs(words.astype(np.float64)) / scale
        # Uniform int64 words decode to about 2^47; data and weights decode to below 2^8.
        assert np.median(magnitudes) > 2.0**40, f"party {party}"
        assert np.mean(magnitudes < 1e3) < 1e-3, f"party {party}"
        names = loc.list()
        assert not [n for n in names if n.endswith((".npz", ".npy", ".pt", ".pkl"))]


def test_owner_keeps_test_split_and_statistics_private(
    two_party: tuple[RunConfig, dict[str, Any]],
) -> None:
    cfg, _ = two_party
    for url in cfg.stores():
        text = " ".join(Location(url).list())
        assert "test" not in text and "scaler" not in text and "initial" not in text
    assert Location(cfg.owner_store).exists("private/test.npz")


def test_every_checkpoint_carries_resume_metadata(
    two_party: tuple[RunConfig, dict[str, Any]],
) -> None:
    cfg, _ = two_party
    tag = runstate.require(Location(cfg.owner_store), cfg.run_id).tag
    for party, url in enumerate(cfg.stores()):
        loc = Location(url)
        records = [
            loc.read_json(n) for n in loc.list("checkpoints") if n.endswith("checkpoint.json")
        ]
        assert [r["epoch"] for r in records] == [1, 2]
        for r in records:
            assert r["run_id"] == cfg.run_id and r["party"] == party
            assert r["settings_hash"] == tag
            assert r["step"] == r["epoch"] * int(np.ceil(150 / 32))
            assert set(r["objects"]) == {"params.safetensors", "losses.safetensors"}
            assert r["attempt"] == records[0]["attempt"] > 0  # one attempt trained it all
            assert all(len(o["sha256"]) == 64 for o in r["objects"].values())


def test_three_parties(tmp_path: Path, prefect_server: None) -> None:
    cfg, report = _run(tmp_path, parties=3, epochs=1)
    assert report["parties"] == 3 and len(report["party_stores"]) == 3
    assert report["max_loss_gap"] < 0.05
    for url in cfg.stores():
        assert Location(url).exists("manifest.json")
    # Party 0 holds the full share; parties 1 and 2 only a seed to expand.
    assert Location(cfg.stores()[0]).list("dataset") != Location(cfg.stores()[2]).list("dataset")


USER_MODULE = '''
"""A user's own model factory."""
import torch


def mlp(in_features: int, classes: int, hidden: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
    )
'''


def test_user_factory_on_raw_tabular_npz(
    tmp_path: Path, prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sklearn.datasets import load_wine

    wine = load_wine()  # 13 raw features, up to ~1700 (proline): unusable without scaling
    np.savez(tmp_path / "wine.npz", x=wine.data, y=wine.target)
    (tmp_path / "mymodels.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the party processes import it too
    _, report = _run(
        tmp_path,
        dataset=str(tmp_path / "wine.npz"),
        model="mymodels:mlp",
        model_kwargs={"in_features": 13, "classes": 3},
        epochs=8,
        batch_size=16,
        lr=0.1,
        max_samples=None,
        test_fraction=0.3,
    )
    assert report["test_accuracy"] >= 0.9  # the goal for a user's own model and data
    assert abs(report["test_accuracy"] - report["plaintext_test_accuracy"]) <= 0.02
    assert report["max_loss_gap"] < 0.05


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--parties", "1"], "--parties"),
        (["--epochs", "0"], "--epochs"),
        (["--loss", "hinge"], "--loss"),
        (["--model", "no_such_module:factory"], "no_such_module"),
        (["--model", "not a reference"], "--model"),
        (["--dataset", "/nonexistent/data.npz"], "--dataset"),
        (["--party-store", "/tmp/a", "--party-store", "/tmp/a"], "share one store"),
        (["--store", "nosuchproto://bucket"], "nosuchproto"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    code = cli.main(["run", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_report_progress_and_curves_are_prefect_artifacts(
    two_party: tuple[RunConfig, dict[str, Any]],
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["veiltrain-report", "veiltrain-losses", "veiltrain-progress", "veiltrain-reveals"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
    cfg, _ = two_party
    # Keys are stable across runs (the UI shows their history); pick this run's versions.
    mine = [a for a in found if cfg.run_id in str(a.description)]
    by_key = {a.key: a for a in mine}
    assert set(by_key) == set(keys)
    assert "data:image/png;base64," in str(by_key["veiltrain-report"].data)
    assert float(by_key["veiltrain-progress"].data) == 100.0  # type: ignore[arg-type]
    reveals = json.loads(str(by_key["veiltrain-reveals"].data))
    assert {r["what"] for r in reveals} == {"training loss", "model parameters"}
