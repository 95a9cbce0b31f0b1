"""FFRecord reader and writer: golden files, hostile headers, atomic writes, local and real S3."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import struct
import tracemalloc
import uuid
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seaweed import PARTY_BUCKETS, TEST_BUCKET, S3Server
from veiltrain.errors import ConfigError, IntegrityError, StoreError
from veiltrain.ffrecord import (
    CorruptFileError,
    FileReader,
    FileWriter,
    LegacyFormatWarning,
    SampleCountError,
    SampleIndexError,
    list_ffr_files,
)

# Golden files written by the reference implementation (copied from the project's shared/).
VECTORS = Path(__file__).resolve().parent / "data" / "ffrecord-vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())["files"]
WORKED_EXAMPLE = bytes.fromhex(
    "df292c81 0200000000000000 86a61036 e8988471 2400000000000000 2900000000000000"
    " 68656c6c6f 776f726c6421"
)
READABLE = [f for f in MANIFEST if "payloads" in f]
CORRUPT = [f for f in MANIFEST if f.get("corrupt")]
OUT_OF_RANGE = [f for f in MANIFEST if "read_one_out_of_range" in f["reference_with_check"]]


@dataclass
class Store:
    """A fresh directory on one backend; `kwargs` go to FileReader/FileWriter."""

    kind: str
    root: str
    fs: Any
    kwargs: dict[str, Any] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        """Every object under the root (hidden temp files included), relative to it."""
        base = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        self.fs.invalidate_cache()
        return sorted(p[len(base) :] for p in self.fs.find(base))

    def make_parent(self, url: str) -> None:
        """Local writes need the directory; object stores have none."""
        if self.kind == "local":
            Path(url).parent.mkdir(parents=True, exist_ok=True)

    def put(self, source: Path, name: str | None = None) -> str:
        """Copy a local file, or a directory tree, into the store; returns its URL there."""
        target = self.url(name or source.name)
        files = (
            [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        )
        for path in files:
            dest = target if path == source else f"{target}/{path.relative_to(source).as_posix()}"
            self.make_parent(dest)
            self.fs.pipe_file(self.fs._strip_protocol(dest), path.read_bytes())
        return target

    def put_bytes(self, name: str, data: bytes) -> str:
        self.make_parent(self.url(name))
        self.fs.pipe_file(self.fs._strip_protocol(self.url(name)), data)
        return self.url(name)

    def read_bytes(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(self.fs._strip_protocol(self.url(name))))

    def reader(self, name: str, check_data: bool = True) -> FileReader:
        return FileReader(self.url(name), check_data, **self.kwargs)

    def writer(self, name: str, n: int) -> FileWriter:
        self.make_parent(self.url(name))
        return FileWriter(self.url(name), n, **self.kwargs)


@pytest.fixture(scope="session")
def s3_admin(s3_server: S3Server) -> Any:
    """One admin filesystem for the session: building a client costs ~0.4 s."""
    fs = s3_server.filesystem("admin")
    fs.ls(TEST_BUCKET)  # builds the client now, outside the allocation measurements
    return fs


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store("local", str(tmp_path), LocalFileSystem())
    fs = request.getfixturevalue("s3_admin")
    return Store("s3", f"s3://{TEST_BUCKET}/{uuid.uuid4().hex}", fs, {"fs": fs})


def write_samples(store: Store, name: str, samples: list[bytes]) -> str:
    with store.writer(name, len(samples)) as writer:
        for sample in samples:
            writer.write_one(sample)
    return store.url(name)


def as_bytes(arrays: list[np.ndarray[Any, Any]]) -> list[bytes]:
    for a in arrays:
        assert a.dtype == np.uint8 and a.ndim == 1
    return [a.tobytes() for a in arrays]


@contextlib.contextmanager
def no_legacy_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    legacy = [str(w.message) for w in caught if issubclass(w.category, LegacyFormatWarning)]
    assert not legacy, legacy


def legacy_warning_if(expected: bool) -> contextlib.AbstractContextManager[Any]:
    return pytest.warns(LegacyFormatWarning) if expected else no_legacy_warning()


def reference_index(message: str) -> int:
    found = re.search(r"Sample (\d+)", message)
    assert found, message
    return int(found.group(1))


# ---------------------------------------------------------------------------------------------
# The format, byte for byte, and the reference's golden files.


def test_worked_example_is_byte_exact(store: Store) -> None:
    write_samples(store, "hello.ffr", [b"hello", b"world!"])
    assert store.read_bytes("hello.ffr") == WORKED_EXAMPLE
    assert len(WORKED_EXAMPLE) == 47
    assert store.names() == ["hello.ffr"]  # no temp file left beside it


def test_write_rows_gives_the_bytes_of_one_write_per_row(store: Store) -> None:
    rows = np.arange(5 * 7, dtype="<i8").reshape(5, 7) * 1_000_003
    write_samples(store, "one.ffr", [row.tobytes() for row in rows])
    with store.writer("rows.ffr", 5) as writer:
        writer.write_rows(rows[:2])
        writer.write_rows(rows[2:2])  # nothing
        writer.write_rows(rows[2:])
        writer.sync_data()  # flushed to disk now: the same bytes, and close still completes
    assert store.read_bytes("rows.ffr") == store.read_bytes("one.ffr")
    with store.writer("over.ffr", 4) as writer:
        with pytest.raises(SampleCountError, match="exceeded the number of samples"):
            writer.write_rows(rows)
        writer.write_rows(rows[:4])
    with pytest.raises(ConfigError, match="C-contiguous 2-D"):
        store.writer("bad.ffr", 5).write_rows(rows[:, ::2])


def test_zero_samples_is_a_12_byte_file(store: Store) -> None:
    write_samples(store, "zero.ffr", [])
    assert store.read_bytes("zero.ffr") == (VECTORS / "zero.ffr").read_bytes()
    assert store.reader("zero.ffr").n == 0


@pytest.mark.parametrize("entry", READABLE, ids=lambda e: e["name"])
def test_golden_payloads(store: Store, entry: dict[str, Any]) -> None:
    url = store.put(VECTORS / entry["name"])
    expected = [bytes.fromhex(h) for h in entry["payloads"]]
    legacy = "legacy" in entry["name"]
    with legacy_warning_if(legacy):
        reader = FileReader(url, allow_legacy=legacy, **store.kwargs)
    with reader:
        assert reader.n == len(expected)
        assert as_bytes(reader.read(range(reader.n))) == expected
        backwards = list(reversed(range(reader.n)))
        assert as_bytes(reader.read(backwards)) == expected[::-1]
        assert [reader.read_one(i).tobytes() for i in range(reader.n)] == expected


@pytest.mark.parametrize("entry", OUT_OF_RANGE, ids=lambda e: e["name"])
def test_out_of_range_raises_like_the_reference(store: Store, entry: dict[str, Any]) -> None:
    ref = entry["reference_with_check"]
    n = int(re.findall(r"\((\d+) >= \1\)", ref["read_one_out_of_range"]["message"])[0])
    legacy = "stderr" in ref.get("open", {})
    with legacy_warning_if(legacy):
        reader = FileReader(store.put(VECTORS / entry["name"]), allow_legacy=legacy, **store.kwargs)
    with pytest.raises(SampleIndexError, match=rf"\({n} >= {n}\)") as caught:
        reader.read_one(n)
    # Callers of the reference catch RuntimeError; torch-style callers catch IndexError.
    assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, IndexError)
    with pytest.raises(SampleIndexError, match="negative"):
        reader.read([-1])


@pytest.mark.parametrize("entry", CORRUPT, ids=lambda e: e["name"])
def test_corrupt_files_fail_where_the_reference_fails(store: Store, entry: dict[str, Any]) -> None:
    url = store.put(VECTORS / entry["name"])
    ref = entry["reference_with_check"]
    if "raises" in ref.get("open", {}):
        with pytest.raises(CorruptFileError, match="checksum of metadata mismatched") as caught:
            FileReader(url, **store.kwargs)
        assert entry["name"] in str(caught.value) and isinstance(caught.value, RuntimeError)
        return
    legacy = "stderr" in ref.get("open", {})
    with legacy_warning_if(legacy):
        reader = FileReader(url, allow_legacy=legacy, **store.kwargs)
    bad = reference_index(ref["read_batch_all"]["message"])
    with pytest.raises(CorruptFileError, match=rf"sample {bad} .*checksum mismatched"):
        reader.read(range(reader.n))
    first = ref["read_one_first_failure"]["index"]
    assert first == bad
    reader.read(range(first))  # every sample before the first bad one reads fine
    with pytest.raises(CorruptFileError, match=entry["name"]):
        reader.read_one(first)


def test_validate_checks_metadata_like_the_reference(store: Store) -> None:
    corrupt_meta = FileReader(store.put(VECTORS / "corrupt_meta.ffr"), False, **store.kwargs)
    with pytest.raises(CorruptFileError, match="checksum of metadata"):
        corrupt_meta.validate()
    url = store.put(VECTORS / "legacy_meta0.ffr")
    legacy = FileReader(url, False, allow_legacy=True, **store.kwargs)
    with pytest.warns(LegacyFormatWarning, match="first FFRecord version"):
        legacy.validate()
    with pytest.raises(CorruptFileError, match="meta_crc is 0"):
        FileReader(url, False, **store.kwargs).validate()  # unchecked headers are opt-in
    # The reference's validate() passes a file whose only fault is in a sample's bytes.
    corrupt_sample = FileReader(store.put(VECTORS / "corrupt_sample.ffr"), **store.kwargs)
    corrupt_sample.validate()
    with pytest.raises(CorruptFileError, match="sample 37 "):
        corrupt_sample.validate(check_samples=True)


@pytest.mark.parametrize("name", ["legacy_meta0.ffr", "legacy_meta0_corrupt_sample.ffr"])
def test_checked_reader_refuses_a_legacy_header_by_default(store: Store, name: str) -> None:
    # meta_crc == 0 turns the header check off: an attacker who edits the offsets and zeroes
    # the CRC field would otherwise get a header that is read unchecked.
    url = store.put(VECTORS / name)
    with pytest.raises(CorruptFileError, match="meta_crc is 0") as caught:
        FileReader(url, **store.kwargs)
    assert name in str(caught.value) and "allow_legacy=True" in str(caught.value)
    assert isinstance(caught.value, IntegrityError)


def test_a_zeroed_meta_crc_cannot_switch_off_the_header_check(store: Store) -> None:
    url = write_samples(store, "x.ffr", [b"hello", b"world!"])
    forged = bytearray(store.read_bytes("x.ffr"))
    forged[0:4] = bytes(4)  # the "legacy" marker
    forged[28:36] = struct.pack("<q", 40)  # sample 1 now overlaps sample 0
    store.put_bytes("x.ffr", bytes(forged))
    with pytest.raises(CorruptFileError, match="meta_crc is 0"):
        FileReader(url, **store.kwargs)


def test_unchecked_reader_still_reads_a_legacy_header(store: Store) -> None:
    reader = FileReader(store.put(VECTORS / "legacy_meta0.ffr"), False, **store.kwargs)
    assert reader.n == 2


def test_locate_names_the_file_and_its_local_index(store: Store) -> None:
    write_samples(store, "d/a.ffr", [b"a0", b"a1"])
    write_samples(store, "d/b.ffr", [b"b0"])
    reader = FileReader(store.url("d"), **store.kwargs)
    assert [reader.locate(i) for i in range(3)] == [
        (reader.paths[0], 0),
        (reader.paths[0], 1),
        (reader.paths[1], 0),
    ]
    with pytest.raises(SampleIndexError):
        reader.locate(3)


def test_check_data_false_skips_crc_checks(store: Store) -> None:
    reader = FileReader(store.put(VECTORS / "trailing_garbage.ffr"), False, **store.kwargs)
    assert as_bytes(reader.read([0, 1])) == [b"hello", b"world!XYZ"]  # last runs to the end


# ---------------------------------------------------------------------------------------------
# Several files: a directory means its own *.ffr files sorted by path; a list keeps its order.


def test_directory_order_and_which_names_count(store: Store) -> None:
    entry = next(f for f in MANIFEST if f["name"] == "shards_sort")
    url = store.put(VECTORS / "shards_sort")
    names = [u.rsplit("/", 1)[-1] for u in list_ffr_files(url, **store.kwargs)]
    # Byte order of the path: digits < upper case < "_" < lower case; "c.FFR" (the suffix is
    # case-sensitive), notes.txt and sub/0.ffr (not recursive) do not count.
    assert names == entry["reference_file_order"]
    reader = FileReader(url, **store.kwargs)
    assert as_bytes(reader.read(range(reader.n))) == [bytes.fromhex(h) for h in entry["payloads"]]
    assert [p.rsplit("/", 1)[-1] for p in reader.paths] == names


def test_shards_map_global_indices_through_empty_files(store: Store) -> None:
    write_samples(store, "dir/b.ffr", [b"b0"])
    write_samples(store, "dir/a1.ffr", [])
    write_samples(store, "dir/a0.ffr", [b"a0", b"a1", b"a2"])
    write_samples(store, "dir/c.ffr", [b"c0", b"c1"])
    reader = FileReader(store.url("dir"), **store.kwargs)
    assert reader.n == 6
    assert as_bytes(reader.read([5, 0, 3, 2, 4, 3])) == [b"c1", b"a0", b"b0", b"a2", b"c0", b"b0"]
    listed = FileReader([store.url("dir/c.ffr"), store.url("dir/b.ffr")], **store.kwargs)
    assert as_bytes(listed.read(range(listed.n))) == [b"c0", b"c1", b"b0"]


def test_bad_sources_are_named(store: Store) -> None:
    store.put_bytes("empty/notes.txt", b"not a shard")
    with pytest.raises(ConfigError, match="no \\*.ffr files"):
        FileReader(store.url("empty"), **store.kwargs)
    with pytest.raises(StoreError, match="missing.ffr"):
        FileReader(store.url("missing.ffr"), **store.kwargs)
    with pytest.raises(ConfigError, match="empty list"):
        FileReader([], **store.kwargs)


# ---------------------------------------------------------------------------------------------
# Hostile headers: a clear error at once, never a huge allocation.


def hostile(count: int, checksums: list[int], offsets: list[int], payload: bytes = b"") -> bytes:
    body = struct.pack("<q", count)
    body += struct.pack(f"<{len(checksums)}I", *checksums)
    body += struct.pack(f"<{len(offsets)}q", *offsets)
    return struct.pack("<I", zlib.crc32(body)) + body + payload  # a valid meta CRC


HOSTILE = {
    "huge_n": (hostile(2**62, [], [], bytes(52)), "N = 4611686018427387904"),
    "n_past_file": (hostile(8_000_000, [], [], bytes(52)), "needs a 96000012-byte header"),
    "negative_n": (hostile(-1, [], [], bytes(52)), "negative count"),
    "header_longer_than_file": (hostile(3, [0, 0], [48, 48]), "needs a 48-byte header"),
    "shorter_than_12_bytes": (bytes(7), "shorter than the 12-byte"),
    "offsets_past_end": (hostile(2, [0, 0], [36, 999], b"hello"), "past the end"),
    "decreasing_offsets": (hostile(3, [0, 0, 0], [48, 50, 49], b"abcd"), "offsets decrease"),
    "negative_offset": (hostile(2, [0, 0], [36, -5], b"abcd"), "offsets decrease"),
    "first_offset_not_after_header": (hostile(2, [0, 0], [30, 36], b"abcd"), "at byte 36"),
}


@pytest.mark.parametrize("check_data", [True, False])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_fail_fast_without_allocating(
    store: Store, case: str, check_data: bool
) -> None:
    data, message = HOSTILE[case]
    url = store.put_bytes(f"{case}.ffr", data)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match=re.escape(message)) as caught:
            FileReader(url, check_data, **store.kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"{case}.ffr" in str(caught.value)
    assert isinstance(caught.value, IntegrityError)
    assert peak < 4 * 2**20, f"peak {peak} bytes while rejecting a {len(data)}-byte file"


# ---------------------------------------------------------------------------------------------
# The writer: all or nothing.


def test_writer_rejects_a_sample_beyond_n_and_leaves_nothing(store: Store) -> None:
    with pytest.raises(SampleCountError, match="n = 1") as caught, store.writer("x.ffr", 1) as w:
        w.write_one(b"a")
        w.write_one(b"b")
    assert isinstance(caught.value, RuntimeError)
    assert store.names() == []


def test_writer_closed_short_raises_and_leaves_nothing(store: Store) -> None:
    writer = store.writer("x.ffr", 3)
    writer.write_one(b"a")
    with pytest.raises(SampleCountError, match="wrote 1 but"):
        writer.close()
    assert store.names() == []
    writer.close()  # a second close is a no-op
    with pytest.raises(ConfigError, match="closed"):
        writer.write_one(b"b")


def test_failed_writer_keeps_the_previous_file(store: Store) -> None:
    write_samples(store, "x.ffr", [b"old"])

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.writer("x.ffr", 2) as writer:
        writer.write_one(b"new")
        raise Boom
    assert store.names() == ["x.ffr"]
    assert as_bytes(store.reader("x.ffr").read([0])) == [b"old"]


@pytest.mark.parametrize("name", ["x.bin", "x.FFR", "x.ffr.tmp"])
def test_writer_needs_the_ffr_suffix(store: Store, name: str) -> None:
    with pytest.raises(ConfigError, match="must end in '.ffr'"):
        store.writer(name, 1)
    assert store.names() == []


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_writer_needs_a_count(store: Store, n: Any) -> None:
    with pytest.raises(ConfigError, match="n, the number of samples"):
        store.writer("x.ffr", n)


def test_writer_takes_any_contiguous_buffer(store: Store) -> None:
    values = np.arange(6, dtype="<i4").reshape(2, 3)
    with store.writer("x.ffr", 3) as writer:
        writer.write_one(values)
        writer.write_one(memoryview(b"mv"))
        writer.write_one(bytearray(b"ba"))
        with pytest.raises(ConfigError, match="C-contiguous"):
            writer.write_one(values[:, 1])
        with pytest.raises(ConfigError, match="got str"):
            writer.write_one("text")  # type: ignore[arg-type]
    assert as_bytes(store.reader("x.ffr").read([0, 1, 2])) == [values.tobytes(), b"mv", b"ba"]


# ---------------------------------------------------------------------------------------------
# Reader behaviour: pickling, errors, round trips.


def test_reader_pickles_for_dataloader_workers(store: Store) -> None:
    write_samples(store, "d/a.ffr", [b"a0", b"a1"])
    write_samples(store, "d/b.ffr", [b"b0"])
    reader = FileReader(store.url("d"), check_data=False, allow_legacy=True, **store.kwargs)
    clone = pickle.loads(pickle.dumps(reader))
    assert (clone.n, clone.check_data, clone.paths) == (3, False, reader.paths)
    assert clone.allow_legacy is True
    assert as_bytes(clone.read([2, 0])) == [b"b0", b"a0"]
    assert clone.read_one(1).flags.writeable  # torch.from_numpy wants writable arrays


def test_reader_rejects_bad_indices_and_use_after_close(store: Store) -> None:
    url = write_samples(store, "x.ffr", [b"a"])
    with FileReader(url, **store.kwargs) as reader:
        with pytest.raises(ConfigError, match="integers"):
            reader.read([0.0])  # type: ignore[list-item]
        assert as_bytes(reader.read([np.int64(0)])) == [b"a"]
        assert reader.read([]) == []
    with pytest.raises(ConfigError, match="closed"):
        reader.read_one(0)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(samples=st.lists(st.binary(max_size=200), max_size=12), data=st.data())
def test_round_trip_property(store: Store, samples: list[bytes], data: st.DataObject) -> None:
    url = write_samples(store, f"{uuid.uuid4().hex}.ffr", samples)
    reader = FileReader(url, **store.kwargs)
    assert reader.n == len(samples)
    if samples:
        order = data.draw(st.lists(st.integers(0, len(samples) - 1), max_size=20))
        assert as_bytes(reader.read(order)) == [samples[i] for i in order]


def test_memory_urls_work() -> None:
    url = f"memory://veiltrain-{uuid.uuid4().hex}/x.ffr"
    with FileWriter(url, 2) as writer:
        writer.write_one(b"hello")
        writer.write_one(b"world!")
    assert as_bytes(FileReader(url).read([1, 0])) == [b"world!", b"hello"]


# ---------------------------------------------------------------------------------------------
# Reads are ranged: one sample of a multi-MiB file fetches about one sample.


class RangeSpy:
    """Wraps fs.cat_file, recording (start, end) of every call; forbids whole-object reads."""

    def __init__(self, fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int]] = []
        self._real = fs.cat_file
        monkeypatch.setattr(fs, "cat_file", self)
        # LocalFileSystem.cat_file itself opens the file; s3fs's does a ranged GET.
        wholes = ("cat", "get_file", "get") + (() if isinstance(fs, LocalFileSystem) else ("open",))
        for whole in wholes:
            monkeypatch.setattr(fs, whole, self._forbidden)

    def __call__(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        assert start is not None and end is not None, f"unranged read of {path}"
        self.calls.append((start, end))
        return bytes(self._real(path, start=start, end=end))

    def _forbidden(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"whole-object access {args}")

    def take(self) -> list[tuple[int, int]]:
        calls, self.calls = self.calls, []
        return calls


def test_reads_are_ranged_and_merged(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 96 * 1024
    samples = [bytes([i]) * size for i in range(48)]  # about 4.5 MiB
    write_samples(store, "big.ffr", samples)
    fs = store.fs if store.kind == "s3" else LocalFileSystem()
    spy = RangeSpy(fs, monkeypatch)
    reader = FileReader(store.url("big.ffr"), fs=fs)
    header = spy.take()
    assert len(header) == 1 and header[0][1] - header[0][0] <= 64 * 1024
    assert reader.read_one(17).tobytes() == samples[17]
    assert [end - start for start, end in spy.take()] == [size]
    assert as_bytes(reader.read([5, 3, 4])) == [samples[5], samples[3], samples[4]]
    assert len(spy.take()) == 1  # adjacent samples: one request
    assert as_bytes(reader.read([40, 0])) == [samples[40], samples[0]]
    assert len(spy.take()) == 2  # far apart: two requests, never the bytes between


# ---------------------------------------------------------------------------------------------
# S3 only: credentials by storage_options, and the per-bucket identities really separate.


@pytest.mark.s3
def test_storage_options_reach_s3(s3_server: S3Server) -> None:
    creds = s3_server.identities["admin"]
    options = {
        "key": creds.key,
        "secret": creds.secret,
        "endpoint_url": s3_server.endpoint_url,
        "skip_instance_cache": True,
    }
    url = f"s3://{TEST_BUCKET}/{uuid.uuid4().hex}/x.ffr"
    with FileWriter(url, 1, storage_options=options) as writer:
        writer.write_one(b"via options")
    reader = FileReader(url, storage_options=options)
    assert reader.paths == [url]
    assert as_bytes(pickle.loads(pickle.dumps(reader)).read([0])) == [b"via options"]


@pytest.mark.s3
def test_party_identity_is_denied_on_the_other_partys_bucket(s3_server: S3Server) -> None:
    party0, party1 = (s3_server.filesystem(name) for name in PARTY_BUCKETS)
    own = f"s3://{PARTY_BUCKETS['party-1']}/{uuid.uuid4().hex}.ffr"
    with FileWriter(own, 1, fs=party1) as writer:
        writer.write_one(b"party 1 only")
    assert as_bytes(FileReader(own, fs=party1).read([0])) == [b"party 1 only"]
    with pytest.raises((PermissionError, StoreError)):
        FileReader(own, fs=party0)
    foreign = f"s3://{PARTY_BUCKETS['party-1']}/{uuid.uuid4().hex}.ffr"
    writer = FileWriter(foreign, 1, fs=party0)
    writer.write_one(b"intruder")
    with pytest.raises((PermissionError, StoreError), match="denied"):
        writer.close()
    assert not party1.exists(foreign)
