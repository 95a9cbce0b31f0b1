"""veiltrain's C extensions as ctypes libraries (ctypes releases the GIL around each call)."""

from __future__ import annotations

import ctypes
import importlib.util


def load(module: str) -> ctypes.CDLL | None:
    """The built extension `module` (e.g. "veiltrain._ringkernels"), or None where it was not
    built: setuptools compiles it on install, and it is optional."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return ctypes.CDLL(spec.origin)
