"""Owner stages (encrypt, upload, manifests) and the party-side readers, local and on real S3."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from seaweed import PARTY_BUCKETS, S3Server, use_party_identities
from veiltrain import contract, data, ffrecord, owner, runstate, sharing
from veiltrain.config import RunConfig, load_config
from veiltrain.contract import UploadCounts
from veiltrain.data import one_hot
from veiltrain.errors import ConfigError, IntegrityError, StoreError
from veiltrain.ffrecord import FileWriter
from veiltrain.party_data import PartyData
from veiltrain.store import Location, sha256_bytes

TOLERANCE = 2.0**-16


def _config(tmp_path: Path, parties: int, **options: Any) -> RunConfig:
    return load_config(
        max_samples=120, parties=parties, out=str(tmp_path / "run"), **options
    ).resolved()


def _prepare(cfg: RunConfig) -> UploadCounts:
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    return owner.upload(cfg)


def _parties(cfg: RunConfig) -> list[Location]:
    return [contract.party_location(cfg, i) for i in range(cfg.parties)]


def _check_manifests(cfg: RunConfig, parties: list[Location]) -> None:
    for i, loc in enumerate(parties):
        manifest = contract.read_manifest(loc).model_dump()
        assert manifest["format"] == contract.MANIFEST_FORMAT
        assert manifest["version"] == contract.MANIFEST_VERSION
        assert (manifest["run_id"], manifest["party"]) == (cfg.run_id, i)
        assert (manifest["parties"], manifest["precision_bits"]) == (cfg.parties, 16)
        stored = [n for n in loc.list() if n != contract.MANIFEST]
        assert sorted(manifest["objects"]) == stored
        for name, meta in manifest["objects"].items():
            assert meta == {"sha256": loc.sha256(name), "size": loc.size(name)}


def _check_reconstruction(cfg: RunConfig, parties: list[Location]) -> None:
    own = contract.owner_location(cfg)
    x_train, y_train = owner.training_split(cfg)
    train = {"x": x_train.astype(np.float64), "y": y_train}
    assert not own.exists("private/train.npz")  # no second copy of the training set
    shares = [PartyData.in_store(loc, contract.read_manifest(loc).table()) for loc in parties]
    count = len(train["x"])
    assert all(s.count == count for s in shares)
    idx = np.random.default_rng(0).permutation(count)[:37]
    idx = np.concatenate([idx, [0, count - 1]])
    xs, ys = zip(*(s.batch(idx) for s in shares), strict=True)
    assert all(x.dtype == torch.int64 for x in xs)
    x = sharing.decode(sharing.reconstruct(list(xs)), cfg.precision_bits)
    y = sharing.decode(sharing.reconstruct(list(ys)), cfg.precision_bits)
    classes = shares[0].num_classes
    np.testing.assert_allclose(x, train["x"][idx], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(y, one_hot(train["y"][idx], classes), rtol=0, atol=TOLERANCE)
    # A single share alone is noise, not the data.
    assert np.abs(sharing.decode(xs[0].numpy(), 16)).mean() > 1e6

    initial = load_safetensors(own.read_bytes("private/initial.safetensors"))
    params = [load_safetensors(loc.read_bytes("model/params.safetensors")) for loc in parties]
    assert all(set(p) == set(initial) for p in params)
    for name, value in initial.items():
        total = sharing.reconstruct([p[name] for p in params])
        assert total.shape == tuple(value.shape)
        decoded = sharing.decode(total, cfg.precision_bits)
        np.testing.assert_allclose(decoded, value.double().numpy(), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("parties", [2, 3])
def test_encrypt_and_upload_give_complete_manifests(tmp_path: Path, parties: int) -> None:
    cfg = _config(tmp_path, parties)
    counts = _prepare(cfg)
    locs = _parties(cfg)
    assert counts.skipped == 0
    assert counts.uploaded == sum(len(loc.list()) - 1 for loc in locs)
    _check_manifests(cfg, locs)
    shards = [n for n in locs[0].list() if n.endswith(".ffr")]
    assert shards and all(n.startswith("dataset/shard-") for n in shards)
    for loc in locs[1:]:  # seed-compressed: no record files, only the seed in info.json
        assert not [n for n in loc.list() if n.endswith(".ffr")]
        assert loc.read_json("dataset/info.json")["format"] == "keystream"
    for loc in locs:
        names = loc.list()
        assert not [n for n in names if n.endswith((".npz", ".npy", ".pt", ".pkl"))]
        assert {"model/params.safetensors", "model/spec.json", "dataset/info.json"} <= set(names)
    _check_reconstruction(cfg, locs)


def test_chunks_straddling_shards_reconstruct_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shards of 25 records written in chunks of 10: shards end inside chunks, each shard is
    # closed while the next opens, and the block flushes follow the writer from one to the next.
    cfg = _config(tmp_path, 2)
    monkeypatch.setattr(owner, "_SHARD_BYTES", 8 * 74 * 25)  # digits: 74 words a record
    monkeypatch.setattr(owner, "_CHUNK_BYTES", 8 * 74 * 10)
    _prepare(cfg)
    locs = _parties(cfg)
    shards = sorted(n for n in locs[0].list() if n.endswith(".ffr"))
    assert len(shards) == -(-90 // 25)  # 120 samples, 30 held out: 90 records in 4 shards
    x_train, y_train = owner.training_split(cfg)
    shares = [PartyData.in_store(loc, contract.read_manifest(loc).table()) for loc in locs]
    xs, ys = zip(*(s.batch(np.arange(len(x_train))) for s in shares), strict=True)
    x = sharing.decode(sharing.reconstruct(list(xs)), cfg.precision_bits)
    np.testing.assert_allclose(x, x_train.astype(np.float64), rtol=0, atol=TOLERANCE)
    labels = sharing.decode(sharing.reconstruct(list(ys)), cfg.precision_bits)
    np.testing.assert_array_equal(labels.argmax(axis=1), y_train)


def test_the_training_split_is_rebuilt_only_from_unchanged_data(tmp_path: Path) -> None:
    source = tmp_path / "data.npz"
    rng = np.random.default_rng(3)
    np.savez(source, x=rng.normal(size=(90, 1, 4, 4)).astype(np.float32), y=np.arange(90) % 3)
    cfg = load_config(dataset=str(source), out=str(tmp_path / "run")).resolved()
    count = owner.encrypt_dataset(cfg).count
    x, y = owner.training_split(cfg)
    assert x.dtype == np.float32 and len(x) == len(y) == count
    with np.load(source) as f:
        changed = {"x": f["x"] + 1e-3, "y": f["y"]}
    np.savez(source, **changed)
    with pytest.raises(IntegrityError, match="--dataset .*changed since run"):
        owner.training_split(cfg)


def test_second_upload_uploads_nothing(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 2)
    first = _prepare(cfg)
    locs = _parties(cfg)
    before = [loc.read_bytes(contract.MANIFEST) for loc in locs]
    second = owner.upload(cfg)
    assert second == UploadCounts(uploaded=0, skipped=first.uploaded, bytes=0)
    assert [loc.read_bytes(contract.MANIFEST) for loc in locs] == before


def _first_shard(loc: Location) -> str:
    return next(n for n in loc.list() if n.endswith(".ffr"))


def test_truncated_object_is_uploaded_again(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 2)
    _prepare(cfg)
    party0 = contract.party_location(cfg, 0)
    name = _first_shard(party0)
    good = party0.read_bytes(name)
    party0.write_bytes(name, good[:-8])
    counts = owner.upload(cfg)
    assert counts.uploaded == 1 and counts.bytes == len(good)
    assert party0.read_bytes(name) == good


def test_manifest_survives_a_repairing_upload(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 2)
    _prepare(cfg)
    party0 = contract.party_location(cfg, 0)
    name = _first_shard(party0)
    party0.write_bytes(name, party0.read_bytes(name)[:-8])
    owner.upload(cfg)
    _check_manifests(cfg, _parties(cfg))


def test_same_size_corruption_is_uploaded_again(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 2)
    _prepare(cfg)
    party1 = contract.party_location(cfg, 1)
    good = party1.read_bytes("model/params.safetensors")
    party1.write_bytes("model/params.safetensors", good[:-1] + bytes([good[-1] ^ 1]))
    counts = owner.upload(cfg)
    assert counts.uploaded == 1
    assert party1.read_bytes("model/params.safetensors") == good


def test_new_shares_replace_old_ones_and_the_manifest(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 2)
    _prepare(cfg)
    old = contract.read_manifest(contract.party_location(cfg, 0)).table()
    owner.encrypt_model(cfg)  # fresh masks: new bytes for every party's parameter shares
    counts = owner.upload(cfg)
    assert counts.uploaded == 2 and counts.skipped >= 2
    locs = _parties(cfg)
    _check_manifests(cfg, locs)
    assert contract.read_manifest(locs[0]).table() != old
    _check_reconstruction(cfg, locs)


def test_damaged_manifest_is_rewritten(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 2)
    _prepare(cfg)
    party0 = contract.party_location(cfg, 0)
    party0.write_bytes(contract.MANIFEST, b"{truncated")
    counts = owner.upload(cfg)
    assert counts.uploaded == len(party0.list()) - 1
    _check_manifests(cfg, _parties(cfg))


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"format": "something-else", "version": 1, "objects": {}}, "not a veiltrain"),
        ({"version": 1, "objects": {}}, "not a veiltrain"),
        ({"format": contract.MANIFEST_FORMAT, "version": 2, "objects": {}}, "version 2"),
        ({"format": contract.MANIFEST_FORMAT, "objects": {}}, "version None"),
        ({"format": contract.MANIFEST_FORMAT, "version": 1, "objects": []}, "no object list"),
        ({"format": contract.MANIFEST_FORMAT, "version": 1}, "no object list"),
        ([1, 2, 3], "not a veiltrain"),
    ],
)
def test_read_manifest_rejects_foreign_manifests(
    tmp_path: Path, manifest: Any, message: str
) -> None:
    loc = Location(str(tmp_path))
    loc.write_json(contract.MANIFEST, manifest)
    with pytest.raises(IntegrityError, match=message):
        contract.read_manifest(loc)


def test_read_manifest_rejects_corrupt_json_and_missing_file(tmp_path: Path) -> None:
    loc = Location(str(tmp_path))
    with pytest.raises(StoreError, match="not found"):
        contract.read_manifest(loc)
    loc.write_bytes(contract.MANIFEST, b"\x00\x01")
    with pytest.raises(IntegrityError, match="manifest.json"):
        contract.read_manifest(loc)


# ------------------------------------------------------------------------------- real S3


@pytest.mark.s3
def test_upload_to_s3_with_per_party_credentials(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_party_identities(monkeypatch, s3_server)
    prefix = f"owner-tests/{uuid.uuid4().hex}"
    stores = [f"s3://{PARTY_BUCKETS[f'party-{i}']}/{prefix}" for i in range(2)]
    cfg = _config(tmp_path, 2, party_stores=stores, owner_store=str(tmp_path / "owner"))
    first = _prepare(cfg)
    locs = _parties(cfg)
    assert [loc.url for loc in locs] == [f"{url}/{cfg.run_id}" for url in stores]
    assert first.uploaded == sum(len(loc.list()) - 1 for loc in locs)
    _check_manifests(cfg, locs)
    _check_reconstruction(cfg, locs)
    before = [loc.read_bytes(contract.MANIFEST) for loc in locs]
    assert owner.upload(cfg) == UploadCounts(uploaded=0, skipped=first.uploaded, bytes=0)
    assert [loc.read_bytes(contract.MANIFEST) for loc in locs] == before
    # Party 1's identity can neither read nor overwrite party 0's shares.
    snoop = Location(locs[0].url, role="party-1")
    for attempt in (
        lambda: snoop.read_bytes(contract.MANIFEST),
        lambda: snoop.read_bytes("model/params.safetensors"),
        lambda: snoop.write_bytes("model/params.safetensors", b"x"),
    ):
        with pytest.raises(StoreError, match="access denied") as info:
            attempt()
        assert s3_server.identities["party-1"].secret not in str(info.value)
    assert sha256_bytes(locs[0].read_bytes(contract.MANIFEST)) == sha256_bytes(before[0])


def test_upload_with_nothing_staged_is_refused_naming_the_stage(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 2)
    with pytest.raises(ConfigError, match="party 0.*encrypt_dataset and encrypt_model first"):
        owner.upload(cfg)
    owner.encrypt_dataset(cfg)  # half a run: the model is still missing
    with pytest.raises(ConfigError, match="model/params.safetensors"):
        owner.upload(cfg)
    assert not contract.party_location(cfg, 0).exists(contract.MANIFEST)


def test_a_first_upload_reads_each_staged_object_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, 2)
    owner.encrypt_dataset(cfg)
    owner.encrypt_model(cfg)
    opened: list[str] = []
    original = Location.open_read

    def counting(self: Location, name: str) -> Any:
        if "/staging/" in self.url:
            opened.append(f"{self.url}/{name}")
        return original(self, name)

    monkeypatch.setattr(Location, "open_read", counting)
    owner.upload(cfg)
    assert opened and len(opened) == len(set(opened))  # hashed while copied, never re-read
    _check_manifests(cfg, _parties(cfg))


class _FullDisk:
    """A file whose writes fail as a full disk does; everything else is the real file's."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_records_are_encoded_as_the_unfused_passes_encode_them(dtype: Any) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((300, 2, 3, 3)) * 40 + 7).astype(dtype)
    y = rng.integers(0, 4, 300)
    for scaler in (data.Standardizer.fit(x), data.Standardizer.identity(x.shape[1:])):
        plain = np.concatenate([scaler.apply(x).reshape(300, -1), one_hot(y, 4)], axis=1)
        fused = owner.encode_records(x, y, scaler, 4, 16)
        assert fused.dtype == np.int64 and np.array_equal(fused, sharing.encode(plain, 16))


def test_fused_record_encoding_refuses_what_encode_refuses() -> None:
    x, y = np.array([[1.0], [np.nan]]), np.array([0, 1])
    identity = data.Standardizer.identity((1,))
    with pytest.raises(ConfigError, match="1 value.s. are NaN"):
        owner.encode_records(x, y, identity, 2, 16)
    too_big = r"1 of 2 value.s. are outside .* largest magnitude is 1e\+20"
    with pytest.raises(ConfigError, match=too_big):
        owner.encode_records(np.array([[1.0], [1e20]]), y, identity, 2, 16)
    edge = 2.0**24 - 0.5  # rounds to 2^24 words: refused before rounding as encode refuses after
    for value in (edge, -edge):
        with pytest.raises(ConfigError, match="1 of 1 value.s. are outside the safe"):
            sharing.encode(np.array([value / 2**16]), 16)
        with pytest.raises(ConfigError, match="1 of 1 value.s. are outside the safe"):
            owner.encode_records(np.array([[value / 2**16]]), y[:1], identity, 2, 16)
    inside = 2.0**24 - 0.75
    assert (
        owner.encode_records(np.array([[inside / 2**16]]), y[:1], identity, 2, 16)[0, 0]
        == inside + 0.75 - 1
    )


def test_a_failed_shard_write_surfaces_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shards are written by a thread while the next chunk is encoded: its error must still
    # reach the caller, naming the shard, and leave no shard that looks complete.
    cfg = _config(tmp_path, 2)
    monkeypatch.setattr(owner, "_CHUNK_BYTES", 8 * 74 * 10)  # digits: 74 words, 10 rows a chunk
    original, calls = FileWriter.write_rows, []

    def failing(self: FileWriter, rows: Any) -> None:
        calls.append(len(rows))
        if len(calls) == 3:
            self._file = _FullDisk(self._file)
        original(self, rows)

    monkeypatch.setattr(FileWriter, "write_rows", failing)
    with pytest.raises(StoreError, match=r"shard-00000\.ffr: could not stage samples"):
        owner.encrypt_dataset(cfg)
    assert len(calls) == 3  # it stopped at the failure instead of writing the rest
    staged = owner.staging(cfg, 0).child("dataset")
    assert not [name for name in staged.list() if name.endswith(".ffr")]


def test_a_failed_flush_surfaces_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks are flushed to disk by a second thread while the next is written: a disk error
    # there (EIO from fdatasync) must reach the caller too, and leave no shard behind.
    cfg = _config(tmp_path, 2)
    monkeypatch.setattr(owner, "_CHUNK_BYTES", 8 * 74 * 10)
    calls: list[int] = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ffrecord, "_datasync", failing)
    with pytest.raises(StoreError, match=r"shard-00000\.ffr: could not flush samples"):
        owner.encrypt_dataset(cfg)
    assert calls  # the flush thread did run
    staged = owner.staging(cfg, 0).child("dataset")
    assert not [name for name in staged.list() if name.endswith(".ffr")]
    assert not owner.owner_location(cfg).exists(runstate.RECORD)  # not marked encrypted
