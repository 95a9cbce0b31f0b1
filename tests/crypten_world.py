"""CrypTen in a world of one party inside the test process, for modules that need it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import veiltrain


@contextmanager
def one_party(folder: Path, overrides: dict[str, Any] | None = None) -> Iterator[Any]:
    """Initialise CrypTen with world size 1 (TFP: one party needs no dealer) and tear it down.

    CrypTen keeps process-wide state (the communicator, os.environ, its config), so the
    environment and config are set for exactly one party here and restored afterwards.
    """
    assert veiltrain  # CrypTen is importable on torch 2.13 only after `import veiltrain`
    import crypten

    assert not crypten.is_initialized(), "CrypTen was left initialised by an earlier test"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANK", "0")
        mp.setenv("WORLD_SIZE", "1")
        mp.setenv("RENDEZVOUS", f"file://{folder / 'rendezvous'}")
        mp.setenv("DISTRIBUTED_BACKEND", "gloo")
        with crypten.cfg.temp_override({"mpc.provider": "TFP", **(overrides or {})}):
            crypten.init()
            try:
                yield crypten
            finally:
                crypten.uninit()
