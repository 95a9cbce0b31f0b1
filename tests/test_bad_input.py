"""Bad input, tried as a new user would: one clear error, no traceback, nothing stored damaged.

Most cases go through the real CLI in a subprocess and must be refused by the preflight, before
Prefect's temporary server starts: exit code 2, one `veiltrain: error:` paragraph naming the
file, option or party, no 'Traceback', no Prefect database, nothing under --out. What only a
party or a stage can see (another run's shares, an edited manifest, a corrupt header, a foreign
checkpoint, a full disk) is checked where it is raised, plus one real party process.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seaweed import PARTY_BUCKETS, S3Server
from veiltrain import checkpoints, models, owner, runstate
from veiltrain.config import RunConfig, load_config
from veiltrain.contract import MANIFEST, TrainJob, owner_location
from veiltrain.errors import ConfigError, IntegrityError, StoreError, VeiltrainError
from veiltrain.store import Location

QUICK = ["--max-samples", "60", "--batch-size", "16"]
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens on loopback here

USER_MODELS = '''
"""A new user's model factories."""
import torch
from torch import nn


def boom(**kwargs):
    raise RuntimeError("weights file missing")


def with_tanh(**kwargs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


class Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return nn.functional.leaky_relu(self.fc(x.flatten(1)))


def leaky(**kwargs):
    return Leaky()
'''


# ---------------------------------------------------------------------------- the CLI


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What one `veiltrain run` printed and left behind."""

    code: int
    err: str
    out: str
    prefect_home: Path
    run_out: Path


def _cli(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> Refusal:
    home, run_out = tmp_path / "prefect-home", tmp_path / "run"
    environment = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "VEILTRAIN_", "AWS_"))
        },
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(tmp_path),  # the user's own model module
        **(env or {}),
    }
    command = [sys.executable, "-m", "veiltrain.cli", "run", "--out", str(run_out), *QUICK]
    done = subprocess.run(
        [*command, *argv],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return Refusal(done.returncode, done.stderr, done.stdout, home, run_out)


def _assert_refused(result: Refusal, *needles: str) -> str:
    """Exit 2 with one error naming every needle, before any server, with nothing written."""
    both = result.err + result.out
    assert result.code == 2, both
    assert "Traceback" not in both, both
    assert both.count("veiltrain: error:") == 1, both
    message = result.err.split("veiltrain: error:", 1)[1]
    for needle in needles:
        assert needle in message, (needle, message)
    # Refused in the preflight: Prefect never started its server, so never made its database.
    assert "Starting temporary server" not in both
    assert not list(result.prefect_home.glob("*.db")), list(result.prefect_home.iterdir())
    assert not result.run_out.exists(), sorted(result.run_out.rglob("*"))
    return message


def _npz(folder: Path, name: str, **arrays: Any) -> Path:
    path = folder / name
    np.savez(path, **arrays)
    return path


def _xy(n: int = 80, features: int = 4) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, features)), "y": np.arange(n) % 2}


def _bad_files(folder: Path) -> dict[str, Path]:
    """One file per way a new user's data set can be wrong."""
    nan, inf = _xy(), _xy()
    nan["x"][3, 1] = np.nan
    inf["x"][5, 0] = np.inf
    (folder / "table.npz").write_text("a,b,label\n1,2,0\n")  # a CSV saved under a .npz name
    with zipfile.ZipFile(folder / "zip-of-text.npz", "w") as archive:
        archive.writestr("x.npy", b"not an array")
        archive.writestr("y.npy", b"nor this")
    return {
        "missing": folder / "absent.npz",
        "not-a-zip": folder / "table.npz",
        "zip-not-npz": folder / "zip-of-text.npz",
        "lengths": _npz(folder, "lengths.npz", x=np.zeros((80, 4)), y=np.arange(70) % 2),
        "nan": _npz(folder, "nan.npz", **nan),
        "inf": _npz(folder, "inf.npz", **inf),
        "one-based": _npz(folder, "one-based.npz", x=_xy()["x"], y=np.arange(80) % 3 + 1),
        "gaps": _npz(folder, "gaps.npz", x=_xy()["x"], y=(np.arange(80) % 2) * 1000),
        "one-class": _npz(folder, "one-class.npz", x=_xy()["x"], y=np.zeros(80, dtype=int)),
        "float-labels": _npz(folder, "float-labels.npz", x=_xy()["x"], y=np.ones(80) / 2),
        "empty": _npz(folder, "empty.npz", x=np.zeros((0, 4)), y=np.zeros(0, dtype=int)),
        "raw-large": _npz(folder, "raw-large.npz", x=_xy()["x"] * 1000, y=_xy()["y"]),
        "outlier": _npz(folder, "outlier.npz", **_outlier()),
        "fine": _npz(folder, "fine.npz", **_xy()),
    }


def _outlier() -> dict[str, Any]:
    # Standardised, one value apart from 69,999 equal ones lands at sqrt(69,999) = 265 sigma.
    # The test split is given, so the outlier is surely in the training split.
    x = np.zeros((70_000, 1))
    x[0, 0] = 1.0
    return {"x": x, "y": np.arange(70_000) % 2, "x_test": np.zeros((2, 1)), "y_test": [0, 1]}


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _bad_files(tmp_path_factory.mktemp("bad-data"))


@pytest.mark.parametrize(
    ("case", "extra", "needles"),
    [
        ("missing", [], ["--dataset", "absent.npz", "no such file or folder"]),
        ("not-a-zip", [], ["table.npz", "not an .npz file (not a zip archive"]),
        ("zip-not-npz", [], ["zip-of-text.npz", "are not numpy arrays"]),
        ("lengths", [], ["lengths.npz", "'x' has 80 rows but 'y' has 70 labels"]),
        ("nan", [], ["nan.npz", "1 NaN", "sample 3", "impute"]),
        ("inf", [], ["inf.npz", "1 infinite", "sample 5"]),
        ("one-based", [], ["one-based.npz", "0..K-1", "from 1 to 3", "return_inverse"]),
        ("gaps", [], ["gaps.npz", "0..K-1", "0, 1000"]),
        ("one-class", [], ["one-class.npz", "at least 2 classes"]),
        ("float-labels", [], ["float-labels.npz", "integer class labels", "float64"]),
        ("empty", [], ["empty.npz", "no samples (0 rows)"]),
        ("raw-large", ["--no-standardize"], ["raw-large.npz", "--no-standardize", "|x| < 256"]),
        ("outlier", ["--max-samples", "70000"], ["outlier.npz", "after standardisation"]),
        ("fine", ["--batch-size", "64"], ["--batch-size 64", "48 samples", "fine.npz"]),
    ],
)
def test_bad_data_is_refused_before_prefect_starts(
    tmp_path: Path, bad: dict[str, Path], case: str, extra: list[str], needles: list[str]
) -> None:
    # (--max-samples 60 leaves 48 samples to train on: fewer than a batch of 64.)
    _assert_refused(_cli(tmp_path, "--dataset", str(bad[case]), *extra), *needles)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--epochs", "0"], ["--epochs", "greater than or equal to 1"]),
        (["--model", "no_such_module:factory"], ["--model", "no_such_module"]),
        (["--model", "usermodels:boom"], ["usermodels:boom", "RuntimeError: weights file missing"]),
        (["--model", "usermodels:with_tanh"], ["layer '2' (Tanh)", "Linear, Conv1d, Conv2d"]),
        (["--model", "usermodels:leaky"], ["usermodels:leaky", "ONNX op LeakyRelu", "ReLU"]),
    ],
)
def test_bad_options_and_models_are_refused_before_prefect_starts(
    tmp_path: Path, argv: list[str], needles: list[str]
) -> None:
    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    message = _assert_refused(_cli(tmp_path, *argv), *needles)
    assert message.count("\n") <= 2  # one paragraph (pydantic's report adds one line per option)


def _one_layer(layer: type[torch.nn.Module]) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A small model around one layer type, and the sample shape it takes."""
    nn = torch.nn
    made: dict[type[nn.Module], tuple[nn.Module, tuple[int, ...]]] = {
        nn.Linear: (nn.Linear(4, 2), (4,)),
        nn.Conv1d: (nn.Conv1d(2, 2, 3, padding=1), (2, 8)),
        nn.Conv2d: (nn.Conv2d(2, 2, 3, padding=1), (2, 8, 8)),
        nn.Softmax: (nn.Softmax(dim=1), (4,)),
        nn.LogSoftmax: (nn.LogSoftmax(dim=1), (4,)),
        nn.AvgPool2d: (nn.AvgPool2d(2), (2, 8, 8)),
        nn.MaxPool2d: (nn.MaxPool2d(2), (2, 8, 8)),
        nn.AdaptiveAvgPool2d: (nn.AdaptiveAvgPool2d(1), (2, 8, 8)),
        nn.AdaptiveMaxPool2d: (nn.AdaptiveMaxPool2d(1), (2, 8, 8)),
        nn.BatchNorm1d: (nn.BatchNorm1d(4), (4,)),
        nn.BatchNorm2d: (nn.BatchNorm2d(2), (2, 8, 8)),
        nn.BatchNorm3d: (nn.BatchNorm3d(2), (2, 4, 4, 4)),
    }
    return made[layer] if layer in made else (layer(), (4,))  # activations, Flatten...


@pytest.mark.parametrize("layer", models.SUPPORTED_LAYERS, ids=lambda t: t.__name__)
def test_every_supported_layer_passes_the_model_checks(layer: type[torch.nn.Module]) -> None:
    model, shape = _one_layer(layer)
    wrapped = torch.nn.Sequential(model)
    models.check_layers(wrapped, "test")
    models.check_convertible(wrapped, shape, "test")


def test_an_unreachable_store_is_refused_naming_it_and_the_role(tmp_path: Path) -> None:
    env = {"VEILTRAIN_S3_ENDPOINT_URL": DEAD_ENDPOINT}
    keys = {f"VEILTRAIN_PARTY_{i}_{kind}_KEY": "k" for i in (0, 1) for kind in ("ACCESS", "SECRET")}
    result = _cli(tmp_path, "--store", "s3://veiltrain-nowhere/runs", env={**env, **keys})
    _assert_refused(result, "party 0's store s3://veiltrain-nowhere/runs", "role party-0")
    assert "unreachable" in result.err and "VEILTRAIN_S3_ENDPOINT_URL" in result.err


def test_an_owner_store_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    owner_store = str(tmp_path / "a-file" / "owner")
    result = _cli(tmp_path, "--owner-store", owner_store)
    _assert_refused(result, f"--owner-store {owner_store}", "is not a folder this user may write")


def test_missing_credentials_are_refused_naming_the_variables(tmp_path: Path) -> None:
    env = {
        "VEILTRAIN_S3_ENDPOINT_URL": DEAD_ENDPOINT,
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    result = _cli(tmp_path, "--store", "s3://veiltrain-nowhere/runs", env=env)
    _assert_refused(result, "VEILTRAIN_PARTY_0_ACCESS_KEY", "no credentials for this role")


def test_a_rerun_with_other_settings_is_refused_and_keeps_its_run(tmp_path: Path) -> None:
    cfg = load_config(max_samples=60, batch_size=16, run_id="r1", out=str(tmp_path / "r1"))
    owner.encrypt_dataset(cfg.resolved())
    before = _snapshot(tmp_path / "r1")
    result = _cli(tmp_path, "--run-id", "r1", "--out", str(tmp_path / "r1"), "--lr", "0.05")
    both = result.err + result.out
    assert result.code == 2 and "Traceback" not in both and "Starting temporary" not in both
    assert "run r1 was encrypted with other training options" in result.err
    assert "--lr: was 0.2, now 0.05" in result.err
    assert _snapshot(tmp_path / "r1") == before  # nothing of the earlier run was touched


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


# --------------------------------------------------------------------------- credentials


def _party_keys(server: S3Server, keys: dict[str, tuple[str, str]]) -> dict[str, str]:
    env = {"VEILTRAIN_S3_ENDPOINT_URL": server.endpoint_url}
    for role, (key, secret) in keys.items():
        prefix = "VEILTRAIN_" + role.upper().replace("-", "_")
        env.update({prefix + "_ACCESS_KEY": key, prefix + "_SECRET_KEY": secret})
    return env


def _stores(prefix: str) -> list[str]:
    return [
        arg
        for bucket in PARTY_BUCKETS.values()
        for arg in ("--party-store", f"s3://{bucket}/{prefix}")
    ]


@pytest.mark.s3
@pytest.mark.parametrize("wrong", ["secret", "revoked", "other-party"])
def test_wrong_credentials_are_refused_naming_the_store_and_role(
    tmp_path: Path, s3_server: S3Server, wrong: str
) -> None:
    p0, p1 = (s3_server.identities[name] for name in PARTY_BUCKETS)
    party0 = {
        "secret": (p0.key, "not-the-secret"),
        "revoked": ("AKIAREVOKED000000000", p0.secret),
        "other-party": (p1.key, p1.secret),
    }[wrong]
    env = _party_keys(s3_server, {"party-0": party0, "party-1": (p1.key, p1.secret)})
    prefix = f"bad-input/{uuid.uuid4().hex}"
    result = _cli(tmp_path, *_stores(prefix), env=env)
    message = _assert_refused(result, "party 0's store s3://veiltrain-party-0/", "role party-0")
    assert "VEILTRAIN_PARTY_0_ACCESS_KEY" in message and "access denied" in message
    assert p0.secret not in result.err + result.out and p1.secret not in result.err + result.out
    assert not _objects(s3_server, f"veiltrain-party-0/{prefix}")  # the probe left nothing


def _objects(server: S3Server, prefix: str) -> list[str]:
    """Objects below a prefix (SeaweedFS keeps empty folders; S3 has none to keep)."""
    found = server.filesystem("admin").find(prefix, detail=True)
    return [name for name, info in found.items() if info["type"] == "file"]


@pytest.mark.s3
def test_the_store_probe_passes_and_leaves_nothing(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from veiltrain.config import preflight

    p0, p1 = (s3_server.identities[name] for name in PARTY_BUCKETS)
    keys = {"party-0": (p0.key, p0.secret), "party-1": (p1.key, p1.secret)}
    for name, value in _party_keys(s3_server, keys).items():
        monkeypatch.setenv(name, value)
    prefix = f"bad-input/{uuid.uuid4().hex}"
    stores = [f"s3://{bucket}/{prefix}" for bucket in PARTY_BUCKETS.values()]
    cfg = load_config(max_samples=60, batch_size=16, party_stores=stores, out=str(tmp_path))
    preflight(cfg.resolved(), probe_stores=True)
    assert not any(_objects(s3_server, f"{bucket}/{prefix}") for bucket in PARTY_BUCKETS.values())


# ----------------------------------------------------------------- what a party can see


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, TrainJob]:
    out = tmp_path_factory.mktemp("uploaded")
    cfg = load_config(max_samples=60, batch_size=16, out=str(out)).resolved()
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    return cfg, owner.train_job(cfg)


def _party_copy(cfg: RunConfig, party: int, tmp_path: Path) -> Location:
    """A copy of a party's store to damage, leaving the shared fixture intact."""
    copy = tmp_path / f"party-{party}"
    shutil.copytree(Location(cfg.stores()[party]).root, copy)
    return Location(str(copy), role=f"party-{party}")


def _verify(loc: Location, job: TrainJob, rank: int) -> VeiltrainError:
    from veiltrain.trainer import Trainer  # imports CrypTen: only these tests need it

    with pytest.raises(VeiltrainError) as caught:
        Trainer(loc, job, rank).verify()
    return caught.value


def test_a_party_given_another_runs_shares_is_refused(
    uploaded: tuple[RunConfig, TrainJob],
) -> None:
    cfg, job = uploaded
    error = _verify(Location(cfg.stores()[0]), dataclasses.replace(job, run_id="other-run"), 0)
    assert isinstance(error, IntegrityError)
    assert f"holds run {cfg.run_id!r} party 0, but this is run 'other-run'" in str(error)
    swapped = _verify(Location(cfg.stores()[1]), job, 0)  # party 1's store given to party 0
    assert "party 1, but this is" in str(swapped) and "check the store URLs" in str(swapped)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ("size", "manifest says"),
        ("hash", "SHA-256 differs from its manifest; re-run upload"),
        ("party", "party 1, but this is"),
        ("truncated", "not valid JSON"),
        ("format", "not a veiltrain party manifest"),
    ],
)
def test_a_manifest_edited_by_hand_is_refused(
    uploaded: tuple[RunConfig, TrainJob], tmp_path: Path, edit: str, words: str
) -> None:
    cfg, job = uploaded
    loc = _party_copy(cfg, 0, tmp_path)
    path = Path(loc.path(MANIFEST))
    raw = json.loads(path.read_text())
    spec = raw["objects"]["model/spec.json"]
    if edit == "size":
        spec["size"] += 1
    elif edit == "hash":
        spec["sha256"] = "0" * 64
    elif edit == "party":
        raw["party"] = 1
    elif edit == "format":
        raw["format"] = "something-else"
    text = json.dumps(raw)
    path.write_text(text[: len(text) // 2] if edit == "truncated" else text)
    error = _verify(loc, job, 0)
    assert words in str(error) and loc.url in str(error)


def test_a_corrupt_ffrecord_header_is_refused(
    uploaded: tuple[RunConfig, TrainJob], tmp_path: Path
) -> None:
    cfg, job = uploaded
    loc = _party_copy(cfg, 0, tmp_path)
    shard = next(n for n in loc.list("dataset") if n.endswith(".ffr"))
    blob = bytearray(Path(loc.path(shard)).read_bytes())
    blob[9] ^= 0xFF  # inside the sample count
    Path(loc.path(shard)).write_bytes(bytes(blob))
    error = _verify(loc, job, 0)
    assert shard in str(error) and "re-run upload" in str(error)
    # Even with a manifest made to match (a faulty writer), the header check names the file.
    raw = json.loads(Path(loc.path(MANIFEST)).read_text())
    raw["objects"][shard]["sha256"] = loc.sha256(shard)
    Path(loc.path(MANIFEST)).write_text(json.dumps(raw))
    error = _verify(loc, job, 0)
    assert isinstance(error, IntegrityError) and shard.split("/")[-1] in str(error)


def test_a_checkpoint_from_other_settings_is_never_resumed(
    uploaded: tuple[RunConfig, TrainJob], tmp_path: Path
) -> None:
    cfg, job = uploaded
    loc = _party_copy(cfg, 0, tmp_path)
    fields = {
        "run_id": cfg.run_id,
        "party": 0,
        "step": 3,
        "settings_hash": "settings-of-another-run",
        "precision_bits": 16,
        "attempt": 7,
    }
    checkpoints.write(loc, 1, {checkpoints.PARAMS_FILE: b"shares"}, fields)
    ident = checkpoints.Identity(job.run_id, job.settings_hash)
    assert checkpoints.candidates(loc, ident, job.epochs) == {}  # training starts afresh
    with pytest.raises(IntegrityError, match="belongs to another run or other settings"):
        checkpoints.read(loc, 1, checkpoints.PARAMS_FILE, ident)


def test_a_party_process_reports_a_bad_store_in_one_line(
    uploaded: tuple[RunConfig, TrainJob],
) -> None:
    cfg, job = uploaded
    message = {
        "job": json.loads(dataclasses.replace(job, run_id="other-run").to_json()),
        "store": cfg.stores()[0],
        "rendezvous": "tcp://127.0.0.1:9",  # never reached: the store is checked first
    }
    done = subprocess.run(
        [sys.executable, "-m", "veiltrain.party", "--rank", "0", "--world-size", "2"],
        input=json.dumps(message),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    verdict = [line for line in done.stderr.splitlines() if line.startswith("veiltrain ")]
    assert len(verdict) == 1 and "veiltrain party 0:" in verdict[0]
    assert "but this is run 'other-run'" in verdict[0]


# -------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("failing_sync", [1, 2, 3])
def test_a_full_disk_while_staging_names_the_file_and_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_sync: int
) -> None:
    cfg = load_config(max_samples=60, batch_size=16, out=str(tmp_path / "run")).resolved()
    real_fsync, calls = os.fsync, [0]

    def fsync(fd: int) -> None:  # a disk reports ENOSPC at the latest when data is synced
        calls[0] += 1
        if calls[0] == failing_sync:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreError) as caught:
        owner.encrypt_dataset(cfg)
    message = str(caught.value)
    assert "the disk is full" in message and "no half-written object" in message
    assert str(tmp_path / "run" / "owner") in message
    leftovers = [p for p in (tmp_path / "run").rglob("*") if ".part" in p.name]
    assert not leftovers  # temporary files are removed: no object is half written
    assert runstate.load(owner_location(cfg)) is None  # nothing looks like a finished stage


# -------------------------------------------------------------------- logging in Prefect


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=0)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected() -> Iterator[_Collect]:
    from veiltrain.tasks.stages import ExpectedErrors

    logger = logging.getLogger("veiltrain.test-expected-errors")
    handler, level = _Collect(), logger.level
    logger.addFilter(ExpectedErrors())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.filters.clear()
    logger.setLevel(level)


def _log_failure(exc: Exception) -> None:
    logger = logging.getLogger("veiltrain.test-expected-errors")
    try:
        raise exc
    except Exception as raised:  # as Prefect's engines do: the current exception, at ERROR
        logger.error("Encountered exception during execution: %r", raised, exc_info=True)


def test_an_expected_error_is_one_line_once_with_its_stack_at_debug(collected: _Collect) -> None:
    error = ConfigError("--dataset d.npz: holds NaN")
    _log_failure(error)
    _log_failure(error)  # re-raised by the flow above: not logged again at ERROR
    errors = [r for r in collected.records if r.levelno >= logging.ERROR]
    debug = [r for r in collected.records if r.levelno == logging.DEBUG]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "holds NaN" in errors[0].getMessage() and "\n" not in errors[0].getMessage()
    assert len(debug) == 2 and all(r.exc_info for r in debug)


def test_an_unexpected_error_keeps_its_traceback(collected: _Collect) -> None:
    _log_failure(KeyError("bug"))
    assert [bool(r.exc_info) for r in collected.records] == [True]


@pytest.mark.prefect
def test_a_failing_stage_in_prefect_logs_no_stack(prefect_server: None) -> None:
    from prefect import flow, task

    from veiltrain.tasks import stages

    stages.quiet_expected_errors()  # done on import already; idempotent
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("prefect.task_runs", "prefect.flow_runs")]
    for logger in loggers:
        logger.addHandler(handler)

    @task
    def stage() -> None:
        raise ConfigError("--dataset d.npz: holds NaN")

    @flow
    def sub() -> None:
        stage()

    @flow
    def parent() -> None:
        sub()

    try:
        with pytest.raises(ConfigError, match="holds NaN"):
            parent()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    loud = [r for r in handler.records if r.levelno > logging.DEBUG]
    assert loud and not any(r.exc_info for r in loud)
    # Once where it happened (the task), not again by each flow it passes through; the task's
    # "Finished in state Failed(...)" line is Prefect's state change, without a stack.
    raised = [r for r in loud if "holds NaN" in r.getMessage()]
    assert sum("Finished in state" not in r.getMessage() for r in raised) == 1
