"""`veiltrain audit`: it flags artifacts made the naive way and passes veiltrain's own stores."""

from __future__ import annotations

import io
import json
import os
import pickle
import posixpath
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors
from scipy.stats import chisquare

from crypten_world import one_party
from seaweed import PARTY_BUCKETS, S3Server, use_party_identities
from veiltrain import audit, checkpoints, contract, owner, sharing
from veiltrain.audit import AuditResult
from veiltrain.config import RunConfig, load_config
from veiltrain.errors import StoreError
from veiltrain.ffrecord import FileWriter
from veiltrain.store import Location, sha256_bytes
from veiltrain.summary import summary_lines

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _config(base: Path, parties: int = 2, **options: Any) -> RunConfig:
    return load_config(
        max_samples=100, parties=parties, out=str(base / "run"), **options
    ).resolved()


def _prepare(cfg: RunConfig) -> list[Location]:
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    owner.upload(cfg)
    return [contract.party_location(cfg, p) for p in range(cfg.parties)]


@dataclass(frozen=True)
class Run:
    """One run encrypted and uploaded by veiltrain's own owner stages."""

    cfg: RunConfig
    stores: list[Location]


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    cfg = _config(tmp_path_factory.mktemp("own"))
    return Run(cfg, _prepare(cfg))


@pytest.fixture
def store(own_run: Run, tmp_path: Path) -> Location:
    """A private copy of party 0's store, clean until a test adds something to it."""
    target = tmp_path / "party-0"
    shutil.copytree(own_run.stores[0].root, target)
    return Location(str(target))


def _kinds(result: AuditResult, name: str) -> set[str]:
    return {f.kind for f in result.findings if f.object == name}


def _reason(result: AuditResult, name: str, kind: str) -> str:
    return " | ".join(f.reason for f in result.findings if f.object == name and f.kind == kind)


def _only(result: AuditResult, name: str) -> set[str]:
    """The kinds found, checking that nothing but `name` was flagged."""
    assert {f.object for f in result.findings} == {name}, result.findings
    return _kinds(result, name)


def _records(loc: Location, name: str, records: list[bytes]) -> None:
    """FFRecord records written the way a new user would, with veiltrain's FileWriter."""
    loc.fs.makedirs(posixpath.dirname(loc.path(name)), exist_ok=True)
    with FileWriter(loc.path(name), len(records), fs=loc.fs) as writer:
        for record in records:
            writer.write_one(record)


def _uniform(count: int) -> np.ndarray[Any, Any]:
    return np.frombuffer(secrets.token_bytes(8 * count), dtype="<i8").copy()


@pytest.fixture(scope="module")
def crypten_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """CrypTen in a world of one party, as a new user starts it (torn down at the end)."""
    with one_party(tmp_path_factory.mktemp("crypten")) as crypten:
        yield crypten


def _data(rows: int = 100) -> torch.Tensor:
    """Standardised features, like a new user's (what must never reach a party)."""
    return torch.randn(rows, 16, generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------ (1) naive artifacts are flagged


def test_the_base_store_is_clean(store: Location) -> None:
    """Every test below adds one thing to this store: the finding comes from that thing."""
    assert audit.audit(store).clean


def test_cryptensor_pickled_into_ffrecord_records_is_flagged(
    store: Location, crypten_single: Any
) -> None:
    x = _data()
    encrypted = crypten_single.cryptensor(x)
    assert encrypted.share.dtype == torch.int64
    # In a world of one party the share IS the data times 2^16:
    assert (encrypted.share - x.double() * 2**16).abs().max() <= 1
    _records(store, "dataset/naive.ffr", [pickle.dumps(encrypted[i]) for i in range(len(x))])
    result = audit.audit(store)
    name = "dataset/naive.ffr"
    assert _only(result, name) >= {"code", "data-like"}
    assert "pickle" in _reason(result, name, "code")
    # The pickled tensor carries a torch.save archive whose storage is the data times 2^16.
    assert "inside the pickle" in _reason(result, name, "data-like")
    assert "16 fractional bits" in _reason(result, name, "data-like")


def test_a_share_from_a_world_of_one_is_flagged_as_data(
    store: Location, crypten_single: Any
) -> None:
    share = crypten_single.cryptensor(_data()).share
    _records(store, "dataset/one-party.ffr", [row.numpy().tobytes() for row in share])
    store.write_bytes("model/one-party.safetensors", save_safetensors({"x": share}))
    result = audit.audit(store)
    assert _kinds(result, "dataset/one-party.ffr") == {"data-like", "manifest"}
    assert _kinds(result, "model/one-party.safetensors") == {"data-like", "manifest"}
    assert "world of one party" in _reason(result, "dataset/one-party.ffr", "data-like")


def test_torch_save_is_flagged_as_code(store: Location) -> None:
    buffer = io.BytesIO()
    torch.save({"weight": torch.randn(64, 8)}, buffer)
    store.write_bytes("model/params.pt", buffer.getvalue())
    result = audit.audit(store)
    kinds = _only(result, "model/params.pt")
    assert {"code", "plaintext", "manifest"} <= kinds
    assert "torch.save" in _reason(result, "model/params.pt", "code")


def test_a_pickle_is_flagged_without_being_loaded(
    store: Location, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the audit unpickled something")

    store.write_bytes("model/state.pkl", pickle.dumps({"w": np.arange(10.0)}))
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    result = audit.audit(store)
    assert "code" in _only(result, "model/state.pkl")


def test_plaintext_npy_and_float_safetensors_are_flagged(store: Location) -> None:
    buffer = io.BytesIO()
    np.save(buffer, _data().numpy())
    store.write_bytes("dataset/x.npy", buffer.getvalue())
    store.write_bytes("model/float.safetensors", save_safetensors({"w": torch.randn(8, 8)}))
    result = audit.audit(store)
    assert _kinds(result, "dataset/x.npy") == {"plaintext", "manifest"}
    assert "float32" in _reason(result, "dataset/x.npy", "plaintext")
    assert _kinds(result, "model/float.safetensors") == {"plaintext", "manifest"}
    assert "F32" in _reason(result, "model/float.safetensors", "plaintext")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_records_are_flagged(store: Location, dtype: type) -> None:
    x = _data().numpy().astype(dtype)
    _records(store, "dataset/floats.ffr", [row.tobytes() for row in x])
    result = audit.audit(store)
    assert _kinds(result, "dataset/floats.ffr") == {"plaintext", "manifest"}
    assert np.dtype(dtype).name in _reason(result, "dataset/floats.ffr", "plaintext")


def test_a_share_with_a_36_bit_mask_fails_the_uniformity_test(store: Location) -> None:
    encoded = sharing.encode(_data(4096).numpy(), 16).ravel()
    weak = encoded + np.random.default_rng(1).integers(-(2**35), 2**35, len(encoded))
    assert audit.data_like(weak) is None  # too large for data: only uniformity catches it
    _records(store, "dataset/weak.ffr", [row.tobytes() for row in weak.reshape(-1, 16)])
    result = audit.audit(store)
    assert _kinds(result, "dataset/weak.ffr") == {"non-uniform", "manifest"}
    assert "chi-square of byte 4" in _reason(result, "dataset/weak.ffr", "non-uniform")


def test_a_low_entropy_seed_share_is_flagged(own_run: Run, tmp_path: Path) -> None:
    shutil.copytree(own_run.stores[1].root, tmp_path / "p1")
    loc = Location(str(tmp_path / "p1"))
    info = loc.read_json(contract.INFO)
    info["seed_share"]["seed"] = (b"0123" * 8).hex()
    loc.write_json(contract.INFO, info)
    result = audit.audit(loc)
    assert {"non-uniform", "manifest"} == _only(result, contract.INFO)


def test_a_manifest_that_does_not_match_its_objects_is_flagged(store: Location) -> None:
    manifest = store.read_json(contract.MANIFEST)
    manifest["objects"][contract.PARAMS]["sha256"] = "0" * 64
    store.write_json(contract.MANIFEST, manifest)
    shard = next(n for n in store.list() if n.endswith(".ffr"))
    blob = store.read_bytes(shard)
    store.write_bytes(shard, blob[:-8])
    store.remove(contract.SPEC)
    store.write_bytes("extra.bin", _uniform(64).tobytes())
    result = audit.audit(store)
    by_object = {(f.object, f.kind): f.reason for f in result.findings}
    assert "SHA-256 differs" in by_object[(contract.PARAMS, "manifest")]
    assert f"{len(blob) - 8} bytes" in by_object[(shard, "manifest")]
    assert "missing" in by_object[(contract.SPEC, "manifest")]
    assert "not listed" in by_object[("extra.bin", "manifest")]
    assert {f.kind for f in result.findings} == {"manifest"}
    # Without hashes, sizes are still checked but a same-size change is not seen.
    shallow = audit.audit(store, hashes=False)
    assert not shallow.hashed and shallow.bytes_hashed == 0
    assert (contract.PARAMS, "manifest") not in {(f.object, f.kind) for f in shallow.findings}
    assert (shard, "manifest") in {(f.object, f.kind) for f in shallow.findings}


def test_a_checkpoint_that_does_not_match_its_record_is_flagged(store: Location) -> None:
    checkpoints.write(store, 1, {"params.safetensors": _params_blob(store)}, {"epoch": 1})
    name = f"{checkpoints.folder(1)}/params.safetensors"
    store.write_bytes(name, _params_blob(store)[:-8] + b"\x00" * 8)
    result = audit.audit(store)
    assert _only(result, name) == {"manifest"}
    assert "checkpoint.json" in _reason(result, name, "manifest")


def test_owner_private_objects_are_flagged(own_run: Run, store: Location) -> None:
    own = contract.owner_location(own_run.cfg)
    record = own.read_bytes("private/run.json")
    store.write_bytes("private/run.json", record)
    store.write_bytes("notes/run.json", record)  # by content: it holds the run key and --seed
    store.write_bytes(
        "staging/party-1/dataset/info.json", own.read_bytes("staging/party-1/" + contract.INFO)
    )
    result = audit.audit(store)
    assert "owner-private" in _kinds(result, "private/run.json")
    assert "owner-private" in _kinds(result, "notes/run.json")
    assert "'key'" in _reason(result, "notes/run.json", "owner-private")
    assert "--seed" in _reason(result, "notes/run.json", "owner-private")
    assert "owner-private" in _kinds(result, "staging/party-1/dataset/info.json")


def test_the_owner_store_itself_is_full_of_findings(own_run: Run) -> None:
    result = audit.audit(contract.owner_location(own_run.cfg))
    kinds = {f.kind for f in result.findings}
    assert {"owner-private", "plaintext", "data-like", "manifest"} <= kinds
    private = {f.object for f in result.findings if f.kind == "owner-private"}
    assert {contract.PRIVATE_TEST, contract.PRIVATE_ORDER, "private/run.json"} <= private


# ------------------------------------------------------- (2) veiltrain's own stores are clean


def _params_blob(loc: Location) -> bytes:
    return loc.read_bytes(contract.PARAMS)


def _truncated(count: int, bits: int = 16) -> np.ndarray[Any, Any]:
    """What CrypTen's 2-party truncation leaves: each party divides its own share by 2^f."""
    return _uniform(count) >> bits


@pytest.mark.parametrize("parties", [2, 3])
def test_veiltrain_party_stores_are_clean(tmp_path: Path, parties: int) -> None:
    cfg = _config(tmp_path, parties)
    for party, loc in enumerate(_prepare(cfg)):
        result = audit.audit(loc)
        assert result.clean, result.findings
        assert result.objects == len(loc.list()) and result.bytes_hashed > 0
        visible = "\n".join(result.visible)
        count = contract.read_model(loc, contract.INFO, contract.DatasetInfo).count
        assert f"{count} records of" in visible  # counts and shapes: visible by design
        assert "sample shape [1, 8, 8], 10 classes" in visible
        assert f"party {party} of {parties}" in visible
        assert "parameter tensors" in visible
        if party == 0:
            assert "FFRecord file of" in visible
        else:
            assert "ChaCha20 seed" in visible


def test_checkpoints_with_truncated_shares_are_clean(store: Location) -> None:
    """Loss shares and BatchNorm statistics are truncated locally: top bits are sign extension."""
    running_var = _truncated(8192)
    # A test of the top bits would reject this perfectly good share:
    assert chisquare(np.bincount(running_var.view(np.uint8)[7::8], minlength=256)).pvalue < 1e-9
    blobs = {
        "params.safetensors": save_safetensors(
            {
                "conv.weight": torch.from_numpy(_uniform(288)),
                "bn.running_var": torch.from_numpy(running_var),
            }
        ),
        "losses.safetensors": save_safetensors({"loss": torch.from_numpy(_truncated(23))}),
    }
    fields = {"run_id": "r", "party": 0, "step": 23, "settings_hash": "h", "attempt": 5}
    for epoch in (1, 2):
        checkpoints.write(store, epoch, blobs, {**fields, "precision_bits": 16})
    store.write_bytes(f"{checkpoints.folder(3)}/params.safetensors", blobs["params.safetensors"])
    result = audit.audit(store)
    assert result.clean, result.findings
    assert any("epoch 1 (step 23), epoch 2 (step 23)" in v for v in result.visible)
    assert any("unfinished checkpoint" in v for v in result.visible)


def test_the_record_name_matches_the_checkpoints_module() -> None:
    assert audit._CHECKPOINT_RECORD == checkpoints.RECORD  # noqa: SLF001


def test_party_results_and_the_summary_line(own_run: Run, store: Location) -> None:
    results = audit.party_results([*own_run.stores, store])
    assert [r["clean"] for r in results] == [True, True, True]
    report = {
        "run_id": "r",
        "parties": 2,
        "epochs": 1,
        "losses": [1.0],
        "plaintext_losses": [1.0],
        "test_accuracy": 0.9,
        "plaintext_test_accuracy": 0.9,
        "max_loss_gap": 0.0,
        "stage_seconds": {},
        "audit": results,
    }
    assert summary_lines(report)[-1] == "audit: 3 party stores clean"
    store.write_bytes("x.npy", _npy(np.ones(4)))
    missing = Location(str(Path(store.root).parent / "nothing-here"))
    results = audit.party_results([store, missing])
    assert [r["clean"] for r in results] == [False, False]
    assert "no objects to audit" in results[1]["error"]
    line = summary_lines({**report, "audit": results})[-1]
    assert line.startswith("audit: 2 findings in 2 of 2 party stores (1 could not be read)")


def _npy(array: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ------------------------------------------------------------------------- (3) real S3


@pytest.mark.s3
def test_audit_on_s3_with_each_party_identity(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_party_identities(monkeypatch, s3_server)
    prefix = f"audit-tests/{uuid.uuid4().hex}"
    bases = [f"s3://{PARTY_BUCKETS[f'party-{i}']}/{prefix}" for i in range(2)]
    cfg = _config(tmp_path, 2, party_stores=bases, owner_store=str(tmp_path / "owner"))
    stores = _prepare(cfg)
    for party, loc in enumerate(stores):
        result = audit.audit(loc.url, role=f"party-{party}")
        assert result.clean, result.findings
        assert result.location.startswith("s3://") and result.bytes_hashed > 0
    buffer = io.BytesIO()
    torch.save(_data(), buffer)
    stores[0].write_bytes("model/extra.pt", buffer.getvalue())
    result = audit.audit(stores[0].url, role="party-0")
    assert {"code", "plaintext", "manifest"} <= _only(result, "model/extra.pt")
    # The command on S3: exit 1 on the finding; party 1's identity may not read party 0's store.
    cli = _cli("audit", "--role", "party-0", stores[0].url)
    assert cli.returncode == 1 and "model/extra.pt" in cli.stdout
    denied = _cli("audit", "--role", "party-1", stores[0].url)
    assert denied.returncode == 2 and "access denied" in denied.stderr
    assert "Traceback" not in denied.stderr
    assert s3_server.identities["party-1"].secret not in denied.stderr


# ------------------------------------------------------------------------------ (4) the CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veiltrain.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_cli_exit_codes_and_json(own_run: Run, store: Location, tmp_path: Path) -> None:
    clean = _cli("audit", *(loc.url for loc in own_run.stores))
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.count(": clean") == 2
    assert "visible by design" in clean.stdout and "at most 8.0 MiB per object" in clean.stdout

    store.write_bytes("model/params.pt", pickle.dumps(np.zeros(3)))
    found = _cli("audit", "--json", store.url, own_run.stores[1].url)
    assert found.returncode == 1, found.stderr
    document = json.loads(found.stdout)
    assert document["clean"] is False
    first, second = document["locations"]
    assert not first["clean"] and second["clean"]
    assert {f["object"] for f in first["findings"]} == {"model/params.pt"}

    missing = _cli("audit", str(tmp_path / "no-such-store"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no objects to audit" in missing.stderr
    usage = _cli("audit")
    assert usage.returncode == 2 and "LOCATION" in usage.stderr
    for result in (clean, found, missing, usage):
        assert "Traceback" not in result.stderr


# ------------------------------------------------------ (5) false positives of the thresholds


def test_uniformity_test_is_calibrated_and_passes_random_words() -> None:
    trials, started = 1000, time.monotonic()
    pvalues = []
    for _ in range(trials):
        words = _uniform(2048)
        assert audit.non_uniform(words) is None
        assert audit.data_like(words) is None
        assert audit.float_like([words.tobytes()]) is None
        pvalues += audit.byte_pvalues(words)
    # Under the null hypothesis p is uniform: about 1 % of the 5,000 p-values fall below 0.01
    # (50, standard deviation 7); a miscomputed statistic or wrong degrees of freedom would not.
    below = sum(p < 0.01 for p in pvalues)
    assert 25 <= below <= 80, below
    assert time.monotonic() - started < 60


def test_truncated_shares_pass_at_every_precision() -> None:
    for bits in range(8, 24):
        for _ in range(20):
            words = _truncated(4096, bits)
            assert audit.non_uniform(words) is None
            assert audit.data_like(words) is None


def test_audits_of_random_stores_find_nothing(tmp_path: Path) -> None:
    """A store of fresh random shares (safetensors, FFRecord, raw), with its manifest."""
    for trial in range(40):
        loc = Location(str(tmp_path / f"store-{trial}"))
        blobs = {
            contract.PARAMS: save_safetensors({"w": torch.from_numpy(_uniform(4096))}),
            "blob.bin": _uniform(2048).tobytes(),
        }
        for name, blob in blobs.items():
            loc.write_bytes(name, blob)
        _records(loc, "dataset/shard-00000.ffr", [_uniform(74).tobytes() for _ in range(100)])
        names = [*blobs, "dataset/shard-00000.ffr"]
        objects = {}
        for name in names:
            data = loc.read_bytes(name)
            objects[name] = {"sha256": sha256_bytes(data), "size": len(data)}
        manifest = {"run_id": "r", "party": 0, "parties": 2, "precision_bits": 16}
        contract.write_manifest(loc, contract.Manifest(**manifest, objects=objects))
        result = audit.audit(loc)
        assert result.clean, result.findings


def test_a_data_share_is_caught_with_few_words() -> None:
    words = sharing.encode(np.linspace(-3, 3, 8), 16)
    assert audit.data_like(words) is not None
    assert audit.data_like(words[:7]) is None  # fewer than 8 words: not judged


def test_an_empty_location_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no objects to audit"):
        audit.audit(str(tmp_path))
