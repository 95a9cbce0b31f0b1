"""The reveal ledger: every value the owner reconstructs is recorded (what, when, run, count).

`reveal` and `reveal_many` are the only code paths that add shares up and decode them; each call
appends one JSON line to OUT/reveals.jsonl before returning, so the ledger is complete even when
a later step fails. Only the owner's process calls them (parties never import this module).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from veiltrain import sharing

LEDGER = "reveals.jsonl"

Shares = Sequence[np.ndarray[Any, Any]]


def _append(out: str, entry: dict[str, Any]) -> None:
    path = Path(out) / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True) + "\n"
    # One write of one line in append mode: entries of concurrent writers never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _entry(run_id: str, what: str, count: int, where: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "what": what,
        "run_id": run_id,
        "count": count,
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "pid": os.getpid(),
        **where,
    }


def reveal(
    out: str, run_id: str, what: str, shares: Shares, precision_bits: int, **where: Any
) -> np.ndarray[Any, Any]:
    """Reconstruct and decode one array from every party's share, and record it."""
    values = sharing.decode(sharing.reconstruct(shares), precision_bits)
    _append(out, _entry(run_id, what, int(values.size), where))
    return values


def reveal_many(
    out: str,
    run_id: str,
    what: str,
    shares: Mapping[str, Shares],
    precision_bits: int,
    **where: Any,
) -> dict[str, np.ndarray[Any, Any]]:
    """Reconstruct several named arrays (a model's tensors) as one recorded reveal."""
    values = {
        name: sharing.decode(sharing.reconstruct(parts), precision_bits)
        for name, parts in shares.items()
    }
    count = sum(int(v.size) for v in values.values())
    _append(out, _entry(run_id, what, count, {"tensors": len(values), **where}))
    return values


def entries(out: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """The recorded reveals in OUT (of one run, if given), oldest first."""
    path = Path(out) / LEDGER
    if not path.is_file():
        return []
    found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in found if run_id is None or e.get("run_id") == run_id]
