"""Run settings: defaults, one readable ConfigError per bad option, resolution, preflight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from veiltrain.config import RunConfig, load_config, preflight
from veiltrain.errors import ConfigError, InsecureSetupError


def test_defaults() -> None:
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.dataset == "digits" and cfg.model == "small-cnn" and cfg.model_kwargs == {}
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.loss) == (3, 64, 0.2, "cross-entropy")
    assert (cfg.parties, cfg.precision_bits, cfg.seed, cfg.device) == (2, 16, 0, "cpu")
    assert cfg.standardize is True and cfg.test_fraction == 0.2 and cfg.max_samples is None
    assert (cfg.out, cfg.store, cfg.owner_store, cfg.run_id) == ("", "", "", "")
    assert cfg.party_stores == [] and cfg.timeout_s == 300.0


BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"epochs": 0}, "--epochs"),
    ({"epochs": 1001}, "--epochs"),
    ({"epochs": 2.5}, "--epochs"),
    ({"epochs": "many"}, "--epochs"),
    ({"lr": 0}, "--lr"),
    ({"lr": -0.1}, "--lr"),
    ({"lr": "fast"}, "--lr"),
    ({"loss": "hinge"}, "--loss"),
    ({"parties": 17}, "--parties"),
    ({"parties": "two"}, "--parties"),
    ({"batch_size": 1}, "--batch-size"),
    ({"precision_bits": 30}, "--precision-bits"),
    ({"precision_bits": 4}, "--precision-bits"),
    ({"seed": -1}, "--seed"),
    ({"device": "tpu"}, "--device"),
    ({"test_fraction": 0.0}, "--test-fraction"),
    ({"test_fraction": 1.0}, "--test-fraction"),
    ({"max_samples": 3}, "--max-samples"),
    ({"timeout_s": 0}, "--timeout-s"),
    ({"model_kwargs": [1, 2]}, "--model-kwargs"),
    ({"run_id": "bad id/../x"}, "--run-id"),
    ({"run_id": "x" * 65}, "--run-id"),
    ({"no_such_option": 1}, "--no-such-option"),
    ({"party_stores": ["only-one"]}, "--party-store"),
]


@pytest.mark.parametrize(("options", "flag"), BAD_OPTIONS, ids=[f for _, f in BAD_OPTIONS])
def test_bad_option_is_a_config_error_naming_the_flag(options: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(**options)
    err = info.value
    assert isinstance(err, ValueError)
    assert type(err) is ConfigError  # not the insecure subclass, and not pydantic's own type
    assert flag in str(err)
    assert "pydantic" not in str(err).lower() and "errors.pydantic.dev" not in str(err)
    assert err.__suppress_context__ and err.__cause__ is None  # no chained pydantic traceback


def test_several_bad_options_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(epochs=0, lr=0, loss="nope")
    for flag in ("--epochs", "--lr", "--loss"):
        assert flag in str(info.value)


@pytest.mark.parametrize("parties", [1, 0, -3])
def test_fewer_than_two_parties_is_insecure(parties: int) -> None:
    with pytest.raises(InsecureSetupError, match="--parties") as info:
        load_config(parties=parties)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert info.value.__cause__ is None


def test_duplicate_party_stores_are_insecure() -> None:
    with pytest.raises(InsecureSetupError, match="share one store"):
        load_config(party_stores=["s3://b/run", "s3://b/run"])
    with pytest.raises(InsecureSetupError):
        load_config(parties=3, party_stores=["/a", "/b", "/a"])


def test_duplicate_party_stores_spelled_differently_are_insecure() -> None:
    with pytest.raises(InsecureSetupError):
        load_config(party_stores=["s3://b/run", "s3://b/run/"])


def test_duplicate_party_stores_error_names_the_flag() -> None:
    with pytest.raises(InsecureSetupError, match="--party-store"):
        load_config(party_stores=["s3://b/run", "s3://b/run"])


def test_distinct_party_stores_are_accepted() -> None:
    cfg = load_config(parties=3, party_stores=["s3://a/r", "s3://b/r", "/tmp/c"])
    assert cfg.stores() == ["s3://a/r", "s3://b/r", "/tmp/c"]


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.epochs = 5


def test_resolved_fills_run_id_and_locations(tmp_path: Path) -> None:
    cfg = load_config(out=str(tmp_path / "run"), parties=3).resolved()
    assert cfg.run_id and cfg.out == str((tmp_path / "run").resolve())
    assert cfg.store == (tmp_path / "run" / "store").resolve().as_uri()
    assert cfg.owner_store == str((tmp_path / "run" / "owner").resolve())
    assert cfg.stores() == [f"{cfg.store}/party-{i}" for i in range(3)]
    again = cfg.resolved()
    assert again == cfg  # resolving twice changes nothing


def test_resolved_default_out_uses_run_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(run_id="r-1").resolved()
    assert cfg.run_id == "r-1"
    assert cfg.out == str((tmp_path / "runs" / "r-1").resolve())
    other = load_config().resolved()
    assert other.run_id and other.run_id != load_config().resolved().run_id


def test_resolved_keeps_explicit_locations(tmp_path: Path) -> None:
    cfg = load_config(
        out=str(tmp_path), store="s3://bucket/base/", owner_store=str(tmp_path / "mine")
    ).resolved()
    assert cfg.stores() == ["s3://bucket/base/party-0", "s3://bucket/base/party-1"]
    assert cfg.owner_store == str(tmp_path / "mine")


def test_training_hash_tracks_training_settings_only() -> None:
    base = load_config(run_id="r")
    h = base.training_hash()
    assert len(h) == 64 and h == load_config(run_id="r").training_hash()
    assert load_config(run_id="r", lr=0.1).training_hash() != h
    assert load_config(run_id="r", batch_size=32).training_hash() != h
    assert load_config(run_id="r", seed=1).training_hash() != h
    assert load_config(run_id="other").training_hash() != h
    assert load_config(run_id="r", epochs=50).training_hash() == h
    assert load_config(run_id="r", timeout_s=5).training_hash() == h


def test_preflight_accepts_the_defaults(tmp_path: Path) -> None:
    preflight(load_config(out=str(tmp_path)).resolved())


def test_preflight_accepts_existing_npz_and_folder(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"")
    preflight(load_config(dataset=str(tmp_path / "d.npz"), out=str(tmp_path)).resolved())
    preflight(load_config(dataset=str(tmp_path), out=str(tmp_path)).resolved())


@pytest.mark.parametrize("name", ["missing.npz", "missing-folder", "data.csv"])
def test_preflight_rejects_a_missing_dataset(tmp_path: Path, name: str) -> None:
    (tmp_path / "data.csv").write_text("1,2\n")
    cfg = load_config(dataset=str(tmp_path / name), out=str(tmp_path)).resolved()
    with pytest.raises(ConfigError, match="--dataset"):
        preflight(cfg)


@pytest.mark.parametrize(
    "model",
    ["no_such_module_xyz:factory", "veiltrain.models:no_such_factory", "not a reference"],
)
def test_preflight_rejects_an_unimportable_model(tmp_path: Path, model: str) -> None:
    cfg = load_config(model=model, out=str(tmp_path)).resolved()
    with pytest.raises(ConfigError, match="--model"):
        preflight(cfg)


def test_preflight_rejects_an_unknown_store_protocol(tmp_path: Path) -> None:
    cfg = load_config(store="nosuchproto://bucket/x", out=str(tmp_path)).resolved()
    with pytest.raises(ConfigError, match="nosuchproto"):
        preflight(cfg)
    owner = load_config(owner_store="alsobad://x", out=str(tmp_path)).resolved()
    with pytest.raises(ConfigError, match="alsobad"):
        preflight(owner)
