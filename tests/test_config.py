"""Run settings: defaults, one readable ConfigError per bad option, resolution, preflight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

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
    ({"precision_bits": 24}, "--precision-bits"),  # the encoder refuses 2^24 mid-run
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
    cfg = load_config(parties=3, party_stores=["s3://a/r", "s3://b/r", "/tmp/c"], run_id="x")
    assert cfg.party_bases() == ["s3://a/r", "s3://b/r", "/tmp/c"]
    assert cfg.stores() == ["s3://a/r/x", "s3://b/r/x", "/tmp/c/x"]


def test_store_urls_need_a_run_id() -> None:
    with pytest.raises(ConfigError, match="run id"):
        load_config().stores()


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.epochs = 5


def test_resolved_fills_run_id_and_locations(tmp_path: Path) -> None:
    cfg = load_config(out=str(tmp_path / "run"), parties=3).resolved()
    assert cfg.run_id and cfg.out == str((tmp_path / "run").resolve())
    assert cfg.store == (tmp_path / "run" / "store").resolve().as_uri()
    assert cfg.owner_store == str((tmp_path / "run" / "owner").resolve())
    assert cfg.stores() == [f"{cfg.store}/party-{i}/{cfg.run_id}" for i in range(3)]
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
    assert cfg.party_bases() == ["s3://bucket/base/party-0", "s3://bucket/base/party-1"]
    assert cfg.stores() == [f"{base}/{cfg.run_id}" for base in cfg.party_bases()]
    assert cfg.owner_store == str(tmp_path / "mine")


def test_preflight_accepts_the_defaults(tmp_path: Path) -> None:
    preflight(load_config(out=str(tmp_path)).resolved())


def test_preflight_accepts_existing_npz_and_folder(tmp_path: Path) -> None:
    # Preflight loads and checks the data, so both hold a small real data set.
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 1, 4, 4)), y=np.arange(40) % 2)
    for label in ("a", "b"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 255, (4, 4), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / label / f"{i}.png")
    for dataset in (tmp_path / "d.npz", tmp_path / "img"):
        cfg = load_config(dataset=str(dataset), batch_size=8, out=str(tmp_path / "run"))
        preflight(cfg.resolved())


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


# ---------------------------------------------------------------------------------------------
# Overlapping locations: one role must never be able to read another's artifacts.

SAME_OR_NESTED = [
    ("s3://b/x", "s3a://b/x/"),
    ("S3://b/x", "s3://b/x"),
    ("s3://b/x", "s3://b//x/."),
    ("file:///tmp/vt/a", "/tmp/vt/a/"),
    ("/tmp/./vt/a", "/tmp/vt/a"),
    ("file://localhost/tmp/vt/a", "/tmp/vt/a"),
    ("s3://b/x", "s3://b/x/y"),
    ("/tmp/vt/a/b", "/tmp/vt/a"),
    ("/tmp/vt/a/../a/b", "file:///tmp/vt/a"),
]


@pytest.mark.parametrize(("first", "second"), SAME_OR_NESTED)
def test_overlapping_party_stores_are_refused_naming_both(first: str, second: str) -> None:
    with pytest.raises(InsecureSetupError, match="--party-store") as info:
        load_config(party_stores=[first, second])
    assert repr(first) in str(info.value) and repr(second) in str(info.value)


def test_relative_and_absolute_spellings_of_one_party_store_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InsecureSetupError, match="share one store"):
        load_config(party_stores=["shares", str(tmp_path / "shares" / "p1")])


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("/tmp/vt/a", "/tmp/vt/ab"),
        ("s3://b/x", "s3://b/xy"),
        ("s3://b/x", "gs://b/x"),
        ("s3://b1/x", "s3://b2/x"),
    ],
)
def test_neighbouring_party_stores_are_accepted(first: str, second: str) -> None:
    assert load_config(party_stores=[first, second]).party_bases() == [first, second]


@pytest.mark.parametrize(
    "owner",
    ["s3://b/p0", "s3a://b/p0/", "s3://b/p0/owner", "s3://b", "S3://B/"],
)
def test_owner_store_overlapping_a_party_is_refused_naming_both(owner: str) -> None:
    with pytest.raises(InsecureSetupError, match="--owner-store") as info:
        load_config(party_stores=["s3://b/p0", "s3://c/p1"], owner_store=owner)
    assert repr(owner) in str(info.value) and "'s3://b/p0'" in str(info.value)


def test_default_owner_store_is_checked_when_resolved(tmp_path: Path) -> None:
    # --store under OUT/owner puts the parties inside the default owner store OUT/owner.
    cfg = load_config(out=str(tmp_path / "run"), store=str(tmp_path / "run" / "owner" / "s"))
    with pytest.raises(InsecureSetupError, match="--owner-store") as info:
        cfg.resolved()
    assert str(tmp_path / "run" / "owner") in str(info.value)
    assert str(tmp_path / "run" / "owner" / "s" / "party-0") in str(info.value)


def test_out_inside_a_party_store_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "shares" / "party-1" / "report"
    with pytest.raises(InsecureSetupError, match="--out") as info:
        load_config(store=str(tmp_path / "shares"), out=str(out))
    assert str(out) in str(info.value) and str(tmp_path / "shares" / "party-1") in str(info.value)


def test_default_out_inside_a_party_store_is_refused_when_resolved(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The default --out is the relative runs/<run id>: here it resolves inside party 0's store.
    (tmp_path / "party-0").mkdir()
    monkeypatch.chdir(tmp_path / "party-0")
    cfg = load_config(store=f"file://{tmp_path}", run_id="r-1")
    with pytest.raises(InsecureSetupError, match="--out"):
        cfg.resolved()


def test_party_store_under_the_out_folder_is_the_accepted_default(tmp_path: Path) -> None:
    cfg = load_config(out=str(tmp_path / "run")).resolved()
    assert all(url.startswith((tmp_path / "run" / "store").as_uri()) for url in cfg.stores())


def test_two_runs_with_one_store_get_disjoint_party_locations(tmp_path: Path) -> None:
    first = load_config(out=str(tmp_path / "a"), store="s3://bucket/base", run_id="r-1").resolved()
    second = load_config(out=str(tmp_path / "b"), store="s3://bucket/base", run_id="r-2")
    urls = [*first.stores(), *second.resolved().stores()]
    assert len(set(urls)) == 4
    for a in urls:
        assert not [b for b in urls if b != a and b.startswith(a + "/")]  # none inside another
    assert first.stores()[0] == "s3://bucket/base/party-0/r-1"


def test_precision_bits_below_the_encoder_limit_is_accepted() -> None:
    from veiltrain.sharing import MAX_ENCODED_BITS

    assert load_config(precision_bits=MAX_ENCODED_BITS - 1).precision_bits == 23
