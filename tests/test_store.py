"""Location: round trips, atomic writes and error mapping on local, memory:// and real S3."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from seaweed import PARTY_BUCKETS, S3Server
from veiltrain.errors import ConfigError, IntegrityError, StoreError
from veiltrain.store import Location, check_objects, download_verified, s3_options, sha256_bytes

ENV_NAMES = (
    "VEILTRAIN_PARTY_0_ACCESS_KEY",
    "VEILTRAIN_PARTY_0_SECRET_KEY",
    "VEILTRAIN_PARTY_1_ACCESS_KEY",
    "VEILTRAIN_PARTY_1_SECRET_KEY",
    "VEILTRAIN_S3_ENDPOINT_URL",
)


class FailingStream:
    """A binary stream that hands out `good` bytes, then fails like a dropped connection."""

    def __init__(self, good: int = 1000) -> None:
        self.left = good
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.left <= 0:
            raise RuntimeError("source failed mid-stream")
        n = self.left if size < 0 else min(size, self.left)
        self.left -= n
        return b"p" * n


@pytest.fixture(params=["local", "file-url", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def loc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Location]:
    """One store location per backend: every test of the storage contract runs on each."""
    if request.param == "s3":  # a real SeaweedFS, party 0's own bucket and credentials
        server = request.getfixturevalue("s3_server")
        yield Location(_prefix(PARTY_BUCKETS["party-0"]), "party-0", **_options(server, "party-0"))
    elif request.param == "local":
        yield Location(str(tmp_path / "store"))
    elif request.param == "file-url":
        yield Location((tmp_path / "store").as_uri())
    else:
        location = Location(f"memory://veiltrain-test-{uuid.uuid4().hex}")
        yield location
        if location.fs.exists(location.root):
            location.fs.rm(location.root, recursive=True)


def _round_trip(loc: Location) -> None:
    payload = bytes(range(256)) * 40
    loc.write_bytes("a/b/blob.bin", payload)
    loc.write_json("meta.json", {"z": 1, "a": [1, 2.5, "x"], "n": None})
    loc.write_bytes("a/empty", b"")
    assert loc.read_bytes("a/b/blob.bin") == payload
    assert loc.read_json("meta.json") == {"z": 1, "a": [1, 2.5, "x"], "n": None}
    assert loc.read_bytes("a/empty") == b""
    assert loc.list() == ["a/b/blob.bin", "a/empty", "meta.json"]
    assert loc.list("a") == ["a/b/blob.bin", "a/empty"]
    assert loc.list("nothing-here") == []
    assert loc.exists("meta.json") and not loc.exists("nope.json")
    assert loc.size("a/b/blob.bin") == len(payload)
    assert loc.sha256("a/b/blob.bin") == sha256_bytes(payload)
    with loc.open_read("a/b/blob.bin") as f:
        assert f.read(10) == payload[:10]
    loc.write_bytes("a/b/blob.bin", b"newer")  # overwrite
    assert loc.read_bytes("a/b/blob.bin") == b"newer"
    child = loc.child("a")
    assert child.read_bytes("b/blob.bin") == b"newer" and child.list() == ["b/blob.bin", "empty"]
    objects = {"b/blob.bin": {"size": 5, "sha256": sha256_bytes(b"newer")}}
    check_objects(child, objects)
    with pytest.raises(IntegrityError, match="SHA-256"):
        check_objects(child, {"b/blob.bin": {"size": 5, "sha256": "0" * 64}})
    with pytest.raises(IntegrityError, match="bytes"):
        check_objects(child, {"b/blob.bin": {"size": 6, "sha256": "0" * 64}})
    loc.remove("meta.json")
    loc.remove("meta.json")  # removing a missing object is a no-op
    assert not loc.exists("meta.json")
    assert "meta.json" not in loc.list()


class TestStorageContract:
    """What every backend (local path, file://, memory://, S3) must do alike."""

    def test_download_is_verified_while_it_streams(self, loc: Location, tmp_path: Path) -> None:
        _download_check(loc, tmp_path)

    def test_round_trip(self, loc: Location) -> None:
        _round_trip(loc)

    def test_write_json_is_canonical(self, loc: Location) -> None:
        loc.write_json("x.json", {"b": 1, "a": 2})
        raw = loc.read_bytes("x.json")
        assert json.loads(raw) == {"b": 1, "a": 2} and raw.index(b'"a"') < raw.index(b'"b"')

    def test_failed_stream_leaves_no_object(self, loc: Location) -> None:
        stream = FailingStream()
        with pytest.raises(RuntimeError, match="mid-stream"):
            loc.put_stream("dir/new.bin", stream)
        assert stream.reads >= 2  # it did fail after some bytes, not at once
        assert not loc.exists("dir/new.bin")
        assert loc.list() == []  # no partial or temporary object either

    def test_failed_overwrite_keeps_the_older_object(self, loc: Location) -> None:
        loc.write_bytes("obj.bin", b"old complete object")
        with pytest.raises(RuntimeError):
            loc.put_stream("obj.bin", FailingStream(5000))
        assert loc.read_bytes("obj.bin") == b"old complete object"
        assert loc.list() == ["obj.bin"]

    def test_put_stream_copies_a_large_stream(self, loc: Location) -> None:
        payload = bytes(range(251)) * 50_000  # ~12 MB: more than one 8 MiB chunk
        loc.put_stream("big.bin", io.BytesIO(payload))
        assert loc.size("big.bin") == len(payload)
        assert loc.sha256("big.bin") == sha256_bytes(payload)

    @pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b'{"a": 1'])
    def test_corrupt_json_is_an_integrity_error_naming_the_object(
        self, loc: Location, raw: bytes
    ) -> None:
        loc.write_bytes("sub/broken.json", raw)
        with pytest.raises(IntegrityError, match=r"sub/broken\.json"):
            loc.read_json("sub/broken.json")

    def test_oversized_read_is_refused(self, loc: Location) -> None:
        loc.write_bytes("big", b"x" * 100)
        with pytest.raises(IntegrityError, match="larger than 10 bytes"):
            loc.read_bytes("big", limit=10)
        assert loc.read_bytes("big", limit=100) == b"x" * 100

    @pytest.mark.parametrize(
        "action",
        [
            lambda loc: loc.read_bytes("missing.bin"),
            lambda loc: loc.read_json("missing.bin"),
            lambda loc: loc.size("missing.bin"),
            lambda loc: loc.sha256("missing.bin"),
            lambda loc: loc.open_read("missing.bin"),
        ],
        ids=["read_bytes", "read_json", "size", "sha256", "open_read"],
    )
    def test_missing_object_is_a_store_error(self, loc: Location, action: Any) -> None:
        with pytest.raises(StoreError, match="not found") as info:
            action(loc)
        assert "missing.bin" in str(info.value) and isinstance(info.value, OSError)


def test_unknown_protocol_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nosuchproto"):
        Location("nosuchproto://bucket/x")


def test_s3_options_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    options = s3_options("party-0")
    assert options["skip_instance_cache"] is True
    assert "key" not in options and "secret" not in options and "endpoint_url" not in options


def test_s3_options_reads_the_role_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEILTRAIN_PARTY_0_ACCESS_KEY", "k0")
    monkeypatch.setenv("VEILTRAIN_PARTY_0_SECRET_KEY", "s0")
    monkeypatch.setenv("VEILTRAIN_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("VEILTRAIN_PARTY_1_ACCESS_KEY", raising=False)
    monkeypatch.delenv("VEILTRAIN_PARTY_1_SECRET_KEY", raising=False)
    zero = s3_options("party-0")
    assert (zero["key"], zero["secret"], zero["endpoint_url"]) == ("k0", "s0", "http://127.0.0.1:1")
    one = s3_options("party-1")
    assert "key" not in one and one["endpoint_url"] == "http://127.0.0.1:1"
    monkeypatch.setenv("VEILTRAIN_PARTY_1_ACCESS_KEY", "only-the-key")
    assert "key" not in s3_options("party-1")  # half a credential is not used


# ------------------------------------------------------------------------------- real S3


def _options(server: S3Server, identity: str) -> dict[str, Any]:
    creds = server.identities[identity]
    return {
        "key": creds.key,
        "secret": creds.secret,
        "endpoint_url": server.endpoint_url,
        "skip_instance_cache": True,
    }


def _prefix(bucket: str) -> str:
    return f"s3://{bucket}/store-tests/{uuid.uuid4().hex}"


@pytest.mark.s3
def test_s3_other_partys_bucket_is_denied(s3_server: S3Server) -> None:
    owner1 = Location(
        _prefix(PARTY_BUCKETS["party-1"]), "party-1", **_options(s3_server, "party-1")
    )
    owner1.write_bytes("secret.bin", b"party 1 only")
    intruder = Location(owner1.url, "party-0", **_options(s3_server, "party-0"))
    creds = s3_server.identities["party-0"]
    attempts: list[Callable[[], object]] = [
        lambda: intruder.read_bytes("secret.bin"),
        lambda: intruder.write_bytes("planted.bin", b"x"),
    ]
    for attempt in attempts:
        with pytest.raises(StoreError, match="access denied") as info:
            attempt()
        text = str(info.value) + repr(intruder)
        assert creds.key not in text and creds.secret not in text
        assert "party-0" in str(info.value)
    assert owner1.list() == ["secret.bin"]


@pytest.mark.s3
def test_s3_location_takes_credentials_from_the_environment(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = s3_server.identities["party-0"]
    monkeypatch.setenv("VEILTRAIN_PARTY_0_ACCESS_KEY", creds.key)
    monkeypatch.setenv("VEILTRAIN_PARTY_0_SECRET_KEY", creds.secret)
    monkeypatch.setenv("VEILTRAIN_S3_ENDPOINT_URL", s3_server.endpoint_url)
    options = s3_options("party-0")
    assert options["key"] == creds.key and options["endpoint_url"] == s3_server.endpoint_url
    loc = Location(_prefix(PARTY_BUCKETS["party-0"]), role="party-0")
    loc.write_json("hello.json", {"from": "env"})
    assert loc.read_json("hello.json") == {"from": "env"}
    assert creds.secret not in repr(loc)
    # The same role on a bucket it has no rights to is refused.
    other = Location(_prefix(PARTY_BUCKETS["party-1"]), role="party-0")
    with pytest.raises(StoreError, match="access denied"):
        other.write_bytes("x.bin", b"x")


def _download_check(loc: Location, tmp_path: Path) -> None:
    blob = b"shard bytes " * 1000
    loc.write_bytes("dataset/shard-00000.ffr", blob)
    meta = {"size": len(blob), "sha256": sha256_bytes(blob)}
    folder = tmp_path / "spool"
    folder.mkdir()
    path = download_verified(loc, "dataset/shard-00000.ffr", meta, str(folder))
    assert Path(path).read_bytes() == blob
    loc.write_bytes("dataset/shard-00000.ffr", blob[:-1] + b"X")  # same size, other bytes
    with pytest.raises(IntegrityError, match="shard-00000.ffr.*manifest"):
        download_verified(loc, "dataset/shard-00000.ffr", meta, str(folder))
    assert not list(folder.iterdir())  # unverified bytes are never left behind to be read
