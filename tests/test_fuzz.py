"""Bounded fuzzing of every parser a party or the owner runs on stored bytes.

FFRecord headers and records, the party manifest, dataset/info.json and checkpoint records:
whatever the bytes, the only errors are veiltrain's documented ones (IntegrityError and its
CorruptFileError, StoreError), nothing hangs (hypothesis' deadline), and no header can make the
reader allocate more than the file holds.
"""

from __future__ import annotations

import contextlib
import json
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veiltrain import checkpoints
from veiltrain.contract import INFO, MANIFEST, DatasetInfo, read_manifest, read_model
from veiltrain.errors import IntegrityError, StoreError
from veiltrain.ffrecord import FileReader, FileWriter
from veiltrain.store import Location

FUZZ = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DOCUMENTED = (IntegrityError, StoreError)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)


def _valid_shard(path: Path) -> bytes:
    with FileWriter(str(path), 3) as writer:
        for record in (b"a" * 16, b"b" * 16, b"c" * 16):
            writer.write_one(record)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_mutated_ffrecord_files_fail_only_with_documented_errors(
    tmp_path: Path, data: st.DataObject
) -> None:
    blob = bytearray(_valid_shard(tmp_path / "good.ffr"))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    target = tmp_path / "fuzzed.ffr"
    target.write_bytes(bytes(blob[:cut]))
    try:
        with FileReader(str(target), check_data=True) as reader:
            reader.read(range(reader.n))
    except DOCUMENTED:
        pass


@FUZZ
@given(count=st.integers(0, 2**62), body=st.binary(max_size=64))
def test_a_header_claiming_huge_counts_allocates_nothing_big(
    tmp_path: Path, count: int, body: bytes
) -> None:
    target = tmp_path / "hostile.ffr"
    target.write_bytes(struct.pack("<IQ", 0x12345678, count) + body)
    tracemalloc.start()
    try:
        FileReader(str(target), check_data=True).close()
    except DOCUMENTED:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 8 << 20  # a few MiB of bookkeeping at most, whatever N claims


def _json_store(tmp_path: Path, name: str, value: Any) -> Location:
    loc = Location(str(tmp_path / "store"))
    loc.write_bytes(name, json.dumps(value).encode())
    return loc


@FUZZ
@given(value=JSON)
def test_any_manifest_json_parses_or_is_an_integrity_error(tmp_path: Path, value: Any) -> None:
    loc = _json_store(tmp_path, MANIFEST, value)
    with contextlib.suppress(DOCUMENTED):
        read_manifest(loc)


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(
            [
                "count",
                "record_words",
                "sample_shape",
                "num_classes",
                "format",
                "seed_share",
                "other",
            ]
        ),
        JSON,
        max_size=7,
    )
)
def test_any_info_json_parses_or_is_an_integrity_error(tmp_path: Path, fields: Any) -> None:
    loc = _json_store(tmp_path, INFO, fields)
    with contextlib.suppress(DOCUMENTED):
        read_model(loc, INFO, DatasetInfo)


_RECORD = {
    "run_id": "run",
    "settings_hash": "tag",
    "epoch": 1,
    "attempt": 7,
    "objects": {"params.safetensors": {"sha256": "0" * 64, "size": 0}},
}


@FUZZ
@given(overrides=st.dictionaries(st.sampled_from([*_RECORD, "other"]), JSON, max_size=4))
def test_any_checkpoint_record_is_skipped_or_refused(tmp_path: Path, overrides: Any) -> None:
    ident = checkpoints.Identity("run", "tag")
    loc = _json_store(tmp_path, f"{checkpoints.folder(1)}/{checkpoints.RECORD}", {})
    loc.write_json(f"{checkpoints.folder(1)}/{checkpoints.RECORD}", {**_RECORD, **overrides})
    loc.write_bytes(f"{checkpoints.folder(1)}/params.safetensors", b"")
    found = checkpoints.candidates(loc, ident, 5)
    assert found == {} or (set(found) == {1} and isinstance(found[1], int))
    assert checkpoints.verified(loc, 1, ident) in (True, False)
    with contextlib.suppress(DOCUMENTED):
        checkpoints.read(loc, 1, "params.safetensors", ident)


@pytest.mark.parametrize("raw", [b"", b"\x00" * 11, b"\xff" * 12])
def test_truncated_headers_are_corrupt_files(tmp_path: Path, raw: bytes) -> None:
    target = tmp_path / "short.ffr"
    target.write_bytes(raw)
    with pytest.raises(IntegrityError):
        FileReader(str(target), check_data=True)
