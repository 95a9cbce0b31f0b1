"""The party's record reader refuses hostile shards: short records, unchecked legacy headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from veiltrain.errors import IntegrityError
from veiltrain.ffrecord import CorruptFileError, FileWriter
from veiltrain.party_data import PartyData
from veiltrain.store import Location

WORDS = 6  # 4 feature words (shape 2 x 2) + 2 one-hot label words
INFO = {
    "count": 3,
    "record_words": WORDS,
    "sample_shape": [2, 2],
    "num_classes": 2,
    "format": "ffrecord",
}
SHARD = "dataset/shard-00000.ffr"


def _party_store(tmp_path: Path, records: list[bytes]) -> Location:
    """A party store holding info.json and one FFRecord shard of the given records."""
    loc = Location(str(tmp_path / "party-0"))
    loc.write_json("dataset/info.json", INFO)
    with FileWriter(loc.path(SHARD), len(records), fs=loc.fs) as writer:
        for record in records:
            writer.write_one(record)
    return loc


def _row(value: int) -> bytes:
    return np.full(WORDS, value, dtype="<i8").tobytes()


def test_full_records_are_read_as_rows(tmp_path: Path) -> None:
    loc = _party_store(tmp_path, [_row(1), _row(2), _row(3)])
    x, y = PartyData.in_store(loc, [SHARD]).batch(np.array([2, 0]))
    assert x.shape == (2, 2, 2) and y.shape == (2, 2)
    assert x[0].flatten().tolist() == [3] * 4 and y[1].tolist() == [1, 1]


def test_an_eight_byte_record_is_refused_not_broadcast(tmp_path: Path) -> None:
    # One int64 word would fill the whole row by numpy broadcasting: a party would then train
    # on a value chosen by whoever wrote the store, repeated into every feature and label.
    short = np.array([7], dtype="<i8").tobytes()
    loc = _party_store(tmp_path, [_row(1), short, _row(3)])
    data = PartyData.in_store(loc, [SHARD])
    with pytest.raises(IntegrityError, match="record 1 ") as caught:
        data.batch(np.array([0, 1]))
    message = str(caught.value)
    assert str(tmp_path / "party-0" / SHARD) in message  # names the store and the shard
    assert "8 bytes" in message and f"{WORDS * 8} bytes" in message
    data.batch(np.array([0, 2]))  # the intact records still read


def test_a_long_record_is_refused(tmp_path: Path) -> None:
    loc = _party_store(tmp_path, [_row(1), _row(2) + _row(2)[:8], _row(3)])
    with pytest.raises(IntegrityError, match="record 1 "):
        PartyData.in_store(loc, [SHARD]).batch(np.array([1]))


def test_a_shard_with_a_legacy_unchecked_header_is_refused(tmp_path: Path) -> None:
    loc = _party_store(tmp_path, [_row(1), _row(2), _row(3)])
    path = Path(loc.path(SHARD))
    raw = bytearray(path.read_bytes())
    raw[0:4] = bytes(4)  # meta_crc == 0: "first version", header unchecked by the reference
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="meta_crc is 0") as caught:
        PartyData.in_store(loc, [SHARD])
    assert isinstance(caught.value, IntegrityError) and SHARD in str(caught.value)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"count": "three"}, "count"),
        ({"count": 0}, "count"),
        ({"format": "pickle"}, "format"),
        ({"record_words": None}, "record_words"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_malformed_info_json_is_one_error_naming_it(
    tmp_path: Path, change: dict[str, object], where: str
) -> None:
    loc = _party_store(tmp_path, [_row(1), _row(2), _row(3)])
    loc.write_json("dataset/info.json", {**INFO, **change})
    with pytest.raises(IntegrityError, match=f"dataset/info.json: malformed .*{where}"):
        PartyData.in_store(loc, [SHARD])
