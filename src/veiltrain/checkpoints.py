"""Per-party encrypted checkpoints: share files first, then a record that marks them complete."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veiltrain.errors import IntegrityError, VeiltrainError
from veiltrain.store import Location, sha256_bytes

RECORD = "checkpoint.json"


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must match to be resumed or decrypted."""

    run_id: str
    settings_hash: str


def folder(epoch: int) -> str:
    """Where one epoch's checkpoint lives inside a party's store."""
    return f"checkpoints/epoch-{epoch:04d}"


def write(loc: Location, epoch: int, blobs: Mapping[str, bytes], fields: dict[str, Any]) -> None:
    """Write the share files, then the record with their hashes (a missing record = incomplete)."""
    for name, blob in blobs.items():
        loc.write_bytes(f"{folder(epoch)}/{name}", blob)
    objects = {n: {"sha256": sha256_bytes(b), "size": len(b)} for n, b in blobs.items()}
    loc.write_json(f"{folder(epoch)}/{RECORD}", {**fields, "epoch": epoch, "objects": objects})


def read(loc: Location, epoch: int, name: str, ident: Identity) -> bytes:
    """One share file of a checkpoint, checked against its record and the expected run."""
    record = loc.read_json(f"{folder(epoch)}/{RECORD}")
    if record.get("run_id") != ident.run_id or record.get("settings_hash") != ident.settings_hash:
        raise IntegrityError(
            f"{loc.url}/{folder(epoch)}: belongs to another run or other settings; "
            "re-run the train stage"
        )
    blob = loc.read_bytes(f"{folder(epoch)}/{name}")
    expected = record.get("objects", {}).get(name, {}).get("sha256")
    if sha256_bytes(blob) != expected:
        raise IntegrityError(f"{loc.url}/{folder(epoch)}/{name}: SHA-256 differs from {RECORD}")
    return blob


def epochs(loc: Location) -> list[int]:
    """Epochs that have a record, complete or not, sorted."""
    names = [n for n in loc.list("checkpoints") if n.endswith(f"/{RECORD}")]
    found = []
    for name in names:
        try:
            found.append(int(name.split("/")[1].removeprefix("epoch-")))
        except ValueError:
            continue  # a stray folder is not a checkpoint
    return sorted(found)


def latest(loc: Location, ident: Identity, max_epoch: int) -> int:
    """Highest epoch (at most max_epoch) with a complete checkpoint of this run, or 0."""
    usable = [e for e in epochs(loc) if e <= max_epoch and _complete(loc, e, ident)]
    return max(usable, default=0)


def _complete(loc: Location, epoch: int, ident: Identity) -> bool:
    try:
        record = loc.read_json(f"{folder(epoch)}/{RECORD}")
        if record["run_id"] != ident.run_id or record["settings_hash"] != ident.settings_hash:
            return False
        return (
            all(
                loc.size(f"{folder(epoch)}/{name}") == meta["size"]
                for name, meta in record["objects"].items()
            )
            and int(record["epoch"]) == epoch
        )
    except (KeyError, TypeError, ValueError, AttributeError, VeiltrainError):
        return False  # unreadable, partial or foreign: not a resume point
