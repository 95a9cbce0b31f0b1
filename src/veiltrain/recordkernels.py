"""The owner's record encoding and feature sums in one C loop each (`_recordkernels.c`).

Both read float32 or float64 rows where they lie in the source, picked by row index, so a
chunk of the shuffled training split is never gathered into a copy first. ctypes releases the
GIL for the call, so the loop runs beside the writer thread. Where the extension was not built,
or for other dtypes, callers run their numpy passes, which give the same words (tests compare).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np
import numpy.typing as npt

from veiltrain import cext

Array = npt.NDArray[Any]

_P = ctypes.c_void_p
_N = ctypes.c_int64
_DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_ENCODE_ARGS = [_P, _P, _N, _N, _P, _P, ctypes.c_double, _P, _N, _N, _P]
_MOMENTS_ARGS = [_P, _P, _N, _N, _P, _N, _P, _P, _P]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built extension as a C library, or None where it was not built."""
    lib = cext.load("veiltrain._recordkernels")
    if lib is None:
        return None
    for kind in _DTYPES.values():
        getattr(lib, f"encode_records_{kind}").argtypes = _ENCODE_ARGS
        getattr(lib, f"encode_records_{kind}").restype = _N
        getattr(lib, f"shifted_moments_{kind}").argtypes = _MOMENTS_ARGS
        getattr(lib, f"shifted_moments_{kind}").restype = None
    return lib


def built() -> bool:
    """Whether the extension was built (setuptools compiles it on install)."""
    return _library() is not None


def takes(x: Array) -> bool:
    """Whether the C loops read this source: built, float32 or float64, rows contiguous."""
    return built() and x.dtype in _DTYPES and x.ndim >= 1 and x.flags.c_contiguous


def encode_records(
    x: Array,
    rows: Array,
    labels: Array,
    *,
    mean: Array,
    quantum: Array,
    limit: float,
    classes: int,
    one: int,
) -> tuple[Array, int]:
    """int64 records: rint((x[rows] - mean) / quantum) per feature, then `classes` label words
    (`one` at each label), and how many values were not finite or not inside +-limit (the
    records are then not to be used). x must pass `takes`; rows and labels are checked here."""
    lib, kind = _checked(x, rows)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.shape != rows.shape:
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    features = x[0].size if len(x) else 0
    mean, quantum = (_doubles(a, features) for a in (mean, quantum))
    out = np.empty((len(rows), features + classes), dtype=np.int64)
    bad = getattr(lib, f"encode_records_{kind}")(
        x.ctypes.data, rows.ctypes.data, len(rows), features, mean.ctypes.data,
        quantum.ctypes.data, limit, labels.ctypes.data, classes, one, out.ctypes.data,
    )  # fmt: skip
    if bad < 0:
        raise ValueError(f"a label outside 0..{classes - 1}")
    return out, int(bad)


def shifted_moments(x: Array, rows: Array | None, shift: Array, chunk: int) -> tuple[Array, Array]:
    """Per-feature sums of x[rows] - shift and of its square (rows None: every row of x), in
    float64, added as numpy adds them `chunk` rows at a time (Standardizer.fit's passes give
    the same bits). x must pass `takes`."""
    lib, kind = _checked(x, rows)
    shape, features = shift.shape, x[0].size if len(x) else shift.size
    shift = _doubles(shift, features)
    sums, squares, scratch = np.zeros(features), np.zeros(features), np.empty(2 * features)
    count = len(x) if rows is None else len(rows)
    getattr(lib, f"shifted_moments_{kind}")(
        x.ctypes.data, None if rows is None else rows.ctypes.data, count, features,
        shift.ctypes.data, max(1, chunk), scratch.ctypes.data, sums.ctypes.data,
        squares.ctypes.data,
    )  # fmt: skip
    return sums.reshape(shape), squares.reshape(shape)


def _checked(x: Array, rows: Array | None) -> tuple[ctypes.CDLL, str]:
    """The library and the loop for x's dtype; the loops trust their row offsets, so every one
    must name a row of x (raises if not)."""
    lib = _library()
    if lib is None or not takes(x):
        raise ValueError("recordkernels: not built, or x is not contiguous float32/float64")
    if rows is not None:
        if rows.dtype != np.int64 or rows.ndim != 1 or not rows.flags.c_contiguous:
            raise ValueError("rows must be a contiguous 1-D int64 array")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(x)):
            raise IndexError(f"row offsets {int(rows.min())}..{int(rows.max())} outside {len(x)}")
    return lib, _DTYPES[x.dtype]


def _doubles(a: Array, size: int) -> Array:
    flat = np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
    if flat.size != size:
        raise ValueError(f"{flat.size} per-feature values for {size} features")
    return flat
