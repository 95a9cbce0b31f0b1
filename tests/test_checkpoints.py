"""Per-party checkpoint records: completeness, hashes, run and settings, training attempts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from veiltrain import checkpoints
from veiltrain.errors import IntegrityError
from veiltrain.store import Location, sha256_bytes

IDENT = checkpoints.Identity("run-a", "tag-a")
EPOCHS = 5
ATTEMPT = 1234


def _checkpoint(loc: Location, epoch: int, **overrides: Any) -> str:
    blobs = {"params.safetensors": b"p" * 40, "losses.safetensors": b"l" * 8}
    fields = {
        "run_id": IDENT.run_id,
        "party": 0,
        "step": epoch * 3,
        "settings_hash": IDENT.settings_hash,
        "precision_bits": 16,
        "attempt": ATTEMPT,
    }
    checkpoints.write(loc, epoch, blobs, fields)
    folder = checkpoints.folder(epoch)
    if overrides:
        record = loc.read_json(f"{folder}/checkpoint.json")
        loc.write_json(f"{folder}/checkpoint.json", {**record, **overrides})
    return folder


def _newest(loc: Location) -> int:
    """What a single party would resume from: the newest candidate that verifies."""
    for epoch in checkpoints.common([checkpoints.candidates(loc, IDENT, EPOCHS)]):
        if checkpoints.verified(loc, epoch, IDENT):
            return epoch
    return 0


def test_no_checkpoints_means_epoch_zero(tmp_path: Path) -> None:
    assert _newest(Location(str(tmp_path))) == 0


def test_the_newest_complete_epoch_is_chosen(tmp_path: Path) -> None:
    loc = Location(str(tmp_path))
    for epoch in (1, 2, 3):
        _checkpoint(loc, epoch)
    assert _newest(loc) == 3
    assert checkpoints.candidates(loc, IDENT, EPOCHS) == {1: ATTEMPT, 2: ATTEMPT, 3: ATTEMPT}


def test_invalid_checkpoints_are_never_resume_points(tmp_path: Path) -> None:
    loc = Location(str(tmp_path))
    _checkpoint(loc, 1)
    _checkpoint(loc, 2)
    _checkpoint(loc, 3, settings_hash="other-settings")
    _checkpoint(loc, 4, run_id="other-run")
    missing = _checkpoint(loc, 5)
    loc.remove(f"{missing}/params.safetensors")
    assert _newest(loc) == 2
    truncated = _checkpoint(loc, 5)
    loc.write_bytes(f"{truncated}/losses.safetensors", b"l")
    assert _newest(loc) == 2
    loc.write_bytes("checkpoints/epoch-0005/checkpoint.json", b"{corrupt")
    assert _newest(loc) == 2
    _checkpoint(loc, 6)  # beyond this job's epochs
    assert _newest(loc) == 2
    _checkpoint(loc, 5, attempt="not-a-number")
    assert _newest(loc) == 2
    _checkpoint(loc, 5)
    assert _newest(loc) == 5


def test_a_same_size_corruption_fails_verification(tmp_path: Path) -> None:
    loc = Location(str(tmp_path))
    _checkpoint(loc, 1)
    folder = _checkpoint(loc, 2)
    loc.write_bytes(f"{folder}/params.safetensors", b"q" * 40)  # sizes still match
    assert 2 in checkpoints.candidates(loc, IDENT, EPOCHS)
    assert not checkpoints.verified(loc, 2, IDENT)
    assert _newest(loc) == 1
    with pytest.raises(IntegrityError, match="SHA-256"):
        checkpoints.read(loc, 2, "params.safetensors", IDENT)


def test_data_without_its_record_is_not_a_checkpoint(tmp_path: Path) -> None:
    loc = Location(str(tmp_path))
    _checkpoint(loc, 1)
    loc.write_bytes("checkpoints/epoch-0002/params.safetensors", b"p" * 40)
    assert _newest(loc) == 1


def test_a_record_without_epoch_is_skipped(tmp_path: Path) -> None:
    loc = Location(str(tmp_path))
    _checkpoint(loc, 1)
    folder = _checkpoint(loc, 2)
    record = loc.read_json(f"{folder}/checkpoint.json")
    del record["epoch"]
    loc.write_json(f"{folder}/checkpoint.json", record)
    assert _newest(loc) == 1


def test_parties_agree_only_on_epochs_of_one_attempt() -> None:
    # Party 1 reran epoch 3 alone (attempt 9): epoch 3's shares cannot be combined.
    party0 = {1: 5, 2: 5, 3: 5}
    party1 = {1: 5, 2: 5, 3: 9}
    assert checkpoints.common([party0, party1]) == [2, 1]
    assert checkpoints.common([party0, {1: 5}]) == [1]
    assert checkpoints.common([party0, {}]) == []
    assert checkpoints.common([{4: 7, 2: 5}, {4: 7, 2: 5}, {4: 7, 2: 6}]) == [4]


def test_reading_a_checkpoint_of_another_attempt_is_refused(tmp_path: Path) -> None:
    loc = Location(str(tmp_path))
    _checkpoint(loc, 1)
    assert checkpoints.read(loc, 1, "params.safetensors", IDENT, ATTEMPT) == b"p" * 40
    with pytest.raises(IntegrityError, match="attempt"):
        checkpoints.read(loc, 1, "params.safetensors", IDENT, ATTEMPT + 1)
    with pytest.raises(IntegrityError, match="another run or other settings"):
        checkpoints.read(loc, 1, "params.safetensors", checkpoints.Identity("run-a", "x"))


def test_attempt_ids_are_random_nonzero_int64() -> None:
    drawn = {checkpoints.new_attempt() for _ in range(100)}
    assert len(drawn) == 100 and all(0 < a < 2**63 for a in drawn)


def test_record_hashes_match_the_blobs(tmp_path: Path) -> None:
    loc = Location(str(tmp_path))
    folder = _checkpoint(loc, 1)
    record = loc.read_json(f"{folder}/checkpoint.json")
    assert record["objects"]["params.safetensors"]["sha256"] == sha256_bytes(b"p" * 40)
    assert record["attempt"] == ATTEMPT and record["epoch"] == 1
