"""Warm start (issue 8): a run starts from a previous run's trained shares, never decrypted.

Unit level, a finished previous run is simulated without parties: each party's epoch-1
checkpoint holds its staged initial shares and the owner's report of it is built as usual. The
end-to-end test trains two runs with real party processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from veiltrain import checkpoints, launch, owner, report, runstate, schedule, sharing, warmstart
from veiltrain.config import RunConfig, load_config, preflight
from veiltrain.contract import (
    PARAMS,
    PRIVATE_INITIAL,
    PRIVATE_ORDER,
    owner_location,
    party_location,
    staging,
)
from veiltrain.errors import ConfigError
from veiltrain.store import Location, read_npz

QUICK = {"max_samples": 300, "batch_size": 32, "test_fraction": 0.2, "timeout_s": 60}


def _config(root: Path, run_id: str, **options: Any) -> RunConfig:
    """A run laid out like the default: everything under root/<run id>."""
    return load_config(
        **{**QUICK, "run_id": run_id, "out": str(root / run_id), **options}
    ).resolved()


def _encrypted(cfg: RunConfig) -> RunConfig:
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    return cfg


def _as_if_trained(cfg: RunConfig, epoch: int = 1) -> None:
    """An epoch 'trained' without parties: the staged shares, each epoch's a bit different."""
    state = runstate.require(owner_location(cfg), cfg.run_id)
    count = int(state.dataset["count"])
    losses = torch.zeros(schedule.steps_per_epoch(count, cfg.batch_size), dtype=torch.int64)
    attempt = checkpoints.new_attempt()
    for party in range(cfg.parties):
        params = load_safetensors(staging(cfg, party).read_bytes(PARAMS))
        if party == 0:  # epoch e adds (e - 1) * 2^-precision to every parameter
            params = {name: value + (epoch - 1) for name, value in params.items()}
        blobs = {
            checkpoints.PARAMS_FILE: save_safetensors(params),
            "losses.safetensors": save_safetensors({"loss": losses}),
        }
        fields = {
            "run_id": cfg.run_id,
            "party": party,
            "step": epoch * len(losses),
            "settings_hash": state.tag,
            "precision_bits": cfg.precision_bits,
            "attempt": attempt,
        }
        checkpoints.write(party_location(cfg, party), epoch, blobs, fields)


def _finished(root: Path, run_id: str, **options: Any) -> RunConfig:
    cfg = _encrypted(_config(root, run_id, **options))
    _as_if_trained(cfg)
    report.build_report(cfg, {})  # writes OUT/report.json and OUT/model.safetensors
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/: one finished run A, shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("runs")
    _finished(path, "A", seed=7)  # other initial weights than the later runs' --seed 0
    return path


def _final_shares(cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    ident = checkpoints.Identity(cfg.run_id, runstate.require(owner_location(cfg), cfg.run_id).tag)
    found = checkpoints.newest_common(
        [party_location(cfg, p) for p in range(cfg.parties)], ident, 10
    )
    assert found is not None
    return [
        checkpoints.read_params(party_location(cfg, p), found.epoch, ident, found.attempt)
        for p in range(cfg.parties)
    ]


def _staged(cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    return [load_safetensors(staging(cfg, p).read_bytes(PARAMS)) for p in range(cfg.parties)]


def _sum(shares: list[dict[str, torch.Tensor]], name: str) -> np.ndarray[Any, Any]:
    return sharing.reconstruct([s[name] for s in shares])


# --------------------------------------------------------------------------- unit level


def test_staged_shares_are_fresh_shares_of_the_previous_final_parameters(root: Path) -> None:
    previous = _final_shares(_config(root, "A"))
    runs = [_encrypted(_config(root, run_id, warm_start="A")) for run_id in ("B", "C")]
    zero_sharings = []
    for cfg in runs:
        staged = _staged(cfg)
        assert set(staged[0]) == set(previous[0])
        for name in previous[0]:
            # The owner may reconstruct here, in the test: the sum is the previous encoding...
            assert np.array_equal(_sum(staged, name), _sum(previous, name))
            # ...while no party's share is its old one (a fresh sharing of zero was added).
            for party in range(cfg.parties):
                assert not torch.equal(staged[party][name], previous[party][name])
        zero_sharings.append(
            [(s[n] - p[n]) for s, p in zip(staged, previous, strict=True) for n in sorted(p)]
        )
    # Each warm start draws its own zero-sharing (CSPRNG, not --seed: both runs use seed 0).
    assert not any(torch.equal(a, b) for a, b in zip(*zero_sharings, strict=True))


def test_the_shadow_starts_from_the_previous_decrypted_model(root: Path) -> None:
    cfg = _encrypted(_config(root, "D", warm_start="A"))
    initial = load_safetensors(owner_location(cfg).read_bytes(PRIVATE_INITIAL))
    written = load_safetensors(Location(str(root / "A")).read_bytes("model.safetensors"))
    staged = _staged(cfg)
    for name, value in initial.items():
        assert torch.equal(value, written[name])
        decoded = sharing.decode(_sum(staged, name), cfg.precision_bits)
        np.testing.assert_array_equal(decoded.astype(np.float32), value.numpy())
    pin = owner_location(cfg).read_json(warmstart.PIN)
    assert (pin["run_id"], pin["epoch"]) == ("A", 1)


def test_a_rerun_restages_the_same_start(root: Path) -> None:
    cfg = _encrypted(_config(root, "E", warm_start="A"))
    first = _staged(cfg)
    owner.encrypt_model(cfg)
    again = _staged(cfg)
    for name in first[0]:
        assert np.array_equal(_sum(first, name), _sum(again, name))
        assert not torch.equal(first[0][name], again[0][name])


def test_a_rerun_keeps_its_start_when_the_previous_run_trained_on(root: Path) -> None:
    previous = _finished(root, "H", epochs=2)
    cfg = _encrypted(_config(root, "I", warm_start="H"))
    initial = owner_location(cfg).read_bytes(PRIVATE_INITIAL)
    epoch1 = _final_shares(previous)
    _as_if_trained(previous, epoch=2)
    report.build_report(previous, {})  # H's report and model now describe epoch 2
    owner.encrypt_model(cfg)  # a rerun of I: still epoch 1, the start it was encrypted from
    staged = _staged(cfg)
    assert all(np.array_equal(_sum(staged, n), _sum(epoch1, n)) for n in epoch1[0])
    assert owner_location(cfg).read_bytes(PRIVATE_INITIAL) == initial
    later = _encrypted(_config(root, "J", warm_start="H"))  # a new run starts from epoch 2
    one = sharing.encode(2.0**-16, cfg.precision_bits)
    moved = _staged(later)
    assert all(np.array_equal(_sum(moved, n), _sum(epoch1, n) + one) for n in epoch1[0])
    assert owner_location(later).read_json(warmstart.PIN)["epoch"] == 2


def test_a_warm_started_run_is_a_new_encryption(root: Path) -> None:
    cfg = _encrypted(_config(root, "K", warm_start="A"))
    records = [runstate.require(owner_location(c), c.run_id) for c in (_config(root, "A"), cfg)]
    assert records[0].key != records[1].key and records[0].order_seed != records[1].order_seed
    orders = [
        read_npz(owner_location(c), PRIVATE_ORDER)["order"] for c in (_config(root, "A"), cfg)
    ]
    assert not np.array_equal(*orders)


def test_parties_see_nothing_of_the_warm_start(root: Path) -> None:
    cfg = _encrypted(_config(root, "F", warm_start="A"))
    job = owner.train_job(cfg).to_json()
    assert "warm" not in job and '"A"' not in job  # the job is that of any run
    assert "warm_start" not in Location(cfg.stores()[0]).read_json("model/spec.json")


# ----------------------------------------------------------------------------- refusals


def _first_stages(cfg: RunConfig) -> None:
    preflight(cfg)
    owner.encrypt_dataset(cfg)


def _nothing_written(cfg: RunConfig) -> bool:
    return runstate.load(owner_location(cfg)) is None


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"precision_bits": 20}, "--precision-bits"),
        ({"parties": 3}, "--parties"),
        ({"model": "resnet18"}, "--model"),
        ({"model_kwargs": {"width": 16}}, "kwargs"),
    ],
)
def test_another_model_or_split_is_refused(root: Path, options: dict[str, Any], words: str) -> None:
    cfg = _config(root, "other", warm_start="A", **options)
    with pytest.raises(ConfigError, match="--warm-start A") as caught:
        _first_stages(cfg)
    assert words in str(caught.value)
    assert _nothing_written(cfg)


def test_other_parameter_shapes_are_refused(root: Path) -> None:
    cfg = _config(root, "shapes", warm_start="A")
    source = warmstart.locate(cfg)
    spec = {"kwargs": source.spec.kwargs, "parameters": dict(source.spec.parameters)}
    spec["parameters"]["fc.weight"] = [10, 7]
    with pytest.raises(ConfigError, match="--warm-start A: parameter shapes differ.*fc.weight"):
        warmstart.check_model(cfg, source, spec)


def test_a_missing_previous_run_is_refused(root: Path) -> None:
    cfg = _config(root, "orphan", warm_start="nowhere")
    with pytest.raises(ConfigError, match="--warm-start nowhere: no run nowhere"):
        _first_stages(cfg)
    assert _nothing_written(cfg)


def test_a_previous_run_without_a_complete_checkpoint_is_refused(root: Path) -> None:
    _encrypted(_config(root, "untrained"))
    cfg = _config(root, "next", warm_start="untrained")
    with pytest.raises(ConfigError, match="--warm-start untrained: no complete checkpoint"):
        _first_stages(cfg)
    assert _nothing_written(cfg)


def test_a_previous_run_whose_report_is_missing_is_refused(root: Path) -> None:
    _as_if_trained(_encrypted(_config(root, "unreported")))
    cfg = _config(root, "after", warm_start="unreported")
    with pytest.raises(ConfigError, match="--warm-start unreported: the report"):
        _first_stages(cfg)


def test_an_out_folder_without_the_run_id_is_refused(root: Path) -> None:
    cfg = _config(root, "fixed-out", warm_start="A", out=str(root / "results"))
    with pytest.raises(ConfigError, match="--warm-start A: the previous run's --out"):
        preflight(cfg)


def test_a_run_cannot_start_from_itself() -> None:
    with pytest.raises(ConfigError, match="--warm-start same: a run cannot start from itself"):
        load_config(run_id="same", warm_start="same")


def test_a_rerun_with_another_warm_start_is_refused(root: Path) -> None:
    cfg = _encrypted(_config(root, "G", warm_start="A"))
    changed = cfg.model_copy(update={"warm_start": "untrained"})
    with pytest.raises(ConfigError, match="--warm-start: was 'A', now 'untrained'"):
        owner.encrypt_model(changed)


# --------------------------------------------------------------------------- end to end


def _trained(root: Path, run_id: str, **options: Any) -> tuple[RunConfig, dict[str, Any]]:
    cfg = _encrypted(_config(root, run_id, batch_size=64, lr=0.5, **options))
    launch.run_local(cfg.stores(), owner.train_job(cfg), lambda event: None)
    return cfg, report.build_report(cfg, {})


@pytest.mark.slow
def test_a_warm_started_run_continues_where_the_previous_one_ended(tmp_path: Path) -> None:
    _, first = _trained(tmp_path, "first", epochs=2)  # 2 x 4 steps
    cfg, second = _trained(tmp_path, "second", epochs=1, warm_start="first")
    # The shares it started from are shares of the model the first run's report decrypted.
    final = load_safetensors(Location(str(tmp_path / "first")).read_bytes("model.safetensors"))
    staged = _staged(cfg)
    for name in staged[0]:
        decoded = sharing.decode(_sum(staged, name), cfg.precision_bits)
        np.testing.assert_array_equal(decoded.astype(np.float32), final[name].numpy())
    # Batch losses are noisy (batch 64: about +-0.15); a fresh model starts near ln 10 = 2.3.
    # 0.6 below the first run's start is four noise widths from a fresh model; 1.0 failed once
    # (2026-12-04, a fresh-clone CI run: the warm start at 1.35 against 2.30).
    start, before, after = second["losses"][0], first["losses"][0], first["losses"][-1]
    # The warm run's first loss comes after the first run's last update, on another batch: not
    # above where the first run ended, give or take SGD's noise at lr 0.5 (0.54 below to 0.32
    # above it in thirteen runs; 0.3 failed once, 2026-12-05).
    assert start < after + 0.6, (start, first["losses"])
    assert start < before - 0.6, (start, first["losses"])
    # The plaintext shadow started from the same model as the shares: parity holds.
    assert second["max_loss_gap"] < 0.05
    # Where it starts, exactly: its first loss is plaintext's for the first run's decrypted model
    # (PRIVATE_INITIAL, checked above against the staged shares) on the same batch, which
    # the bounds above can only bracket (six runs of 2026-12-05: 0.35 below to 0.32 above the
    # first run's last loss, all at parity 0.003).
    assert second["same_weights_gap"] < 0.01
    assert second["warm_start"] == "first"
