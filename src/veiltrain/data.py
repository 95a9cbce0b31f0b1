"""Owner-side data loading: digits, an .npz of arrays or an image folder, split and standardised."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veiltrain import npzfile, recordkernels
from veiltrain.errors import ConfigError
from veiltrain.sharing import MAX_ENCODED_ABS, MAX_ENCODED_BITS

Array = npt.NDArray[Any]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Dataset:
    """Plaintext train/test split as the owner holds it (never uploaded).

    The training features are `x_source[train_rows]`, gathered only where they are used: the
    owner's encryption reads them chunk by chunk, so the data set is in memory once, as loaded
    (a shuffled copy was 17 MB of fresh memory and 4 ms of a 60 ms encryption).
    """

    x_source: Array
    train_rows: Array
    y_train: Array
    x_test: Array
    y_test: Array
    classes: list[str]

    @cached_property
    def x_train(self) -> Array:
        """The training features in split order (gathered on first use)."""
        return self.x_source[self.train_rows]

    def train_features(self, index: Array) -> Array:
        """The training samples at positions `index` of the split, gathered from the source."""
        return self.x_source[self.train_rows[index]]

    @property
    def train_count(self) -> int:
        """Number of training samples."""
        return len(self.train_rows)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one feature sample (e.g. (1, 8, 8) or (13,))."""
        return tuple(int(d) for d in self.x_source.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of label classes (the width of the one-hot labels)."""
        return len(self.classes)


def load(source: str, test_fraction: float, seed: int, max_samples: int | None) -> Dataset:
    """Load a data set by name or path and hold out a test split that stays with the owner."""
    if source == "digits":
        x, y, xt, yt, classes = _digits()
    else:
        path = Path(source).expanduser()
        if path.suffix == ".npz":
            x, y, xt, yt, classes = _npz(path)
        elif path.is_dir():
            x, y, xt, yt, classes = _image_dir(path)
        else:
            raise ConfigError(
                f"--dataset {source!r}: not 'digits', an existing .npz file or an image folder"
            )
    rows = _shuffled_rows(len(x), seed, max_samples)
    if xt is None or yt is None:
        test_rows, rows = _holdout(rows, test_fraction, source)
        xt, yt = x[test_rows], y[test_rows]
    features = _features(x)
    return Dataset(
        features, rows, y[rows].astype(np.int64), _features(xt), yt.astype(np.int64), classes
    )


def _features(x: Array) -> Array:
    """float32 where that holds the source exactly (float32, 8- and 16-bit integers), else
    float64: a float32 source is not doubled in the owner's memory."""
    exact = x.dtype == np.float32 or (x.dtype.kind in "iu" and x.dtype.itemsize <= 2)
    return x.astype(np.float32 if exact else np.float64, copy=False)


def _digits() -> tuple[Array, Array, None, None, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64).reshape(-1, 1, 8, 8)
    return x, np.asarray(bunch.target), None, None, [str(c) for c in range(10)]


def _npz(path: Path) -> tuple[Array, Array, Array | None, Array | None, list[str]]:
    if not path.is_file():
        raise ConfigError(f"--dataset {path}: no such file")
    arrays = _npz_arrays(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise ConfigError(f"--dataset {path}: needs arrays 'x' and 'y', has {sorted(arrays)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ConfigError(f"--dataset {path}: give both 'x_test' and 'y_test' or neither")
    xt, yt = arrays.get("x_test"), arrays.get("y_test")
    _check_features(arrays["x"], arrays["y"], path, "x")
    if xt is not None and yt is not None:
        _check_features(xt, yt, path, "x_test")
    test_labels = arrays.get("y_test", np.empty(0, dtype=arrays["y"].dtype))
    classes = _check_labels(arrays["y"].ravel(), test_labels.ravel(), path)
    return arrays["x"], arrays["y"].ravel(), xt, None if yt is None else yt.ravel(), classes


def _npz_arrays(path: Path) -> dict[str, Array]:
    """Every array of an .npz, never unpickling; each way of not being one gets its own words."""
    # np.load falls back to pickle for a file that is neither zip nor .npy, and with pickles
    # refused it then blames "pickled (object) data": say what the file really is instead.
    if not zipfile.is_zipfile(path):
        raise ConfigError(
            f"--dataset {path}: not an .npz file (not a zip archive; an .npz is what "
            "numpy.savez(path, x=..., y=...) writes); check the path or re-save the data"
        )
    try:
        arrays = npzfile.stored_arrays(path) or _loaded_arrays(path)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        if "allow_pickle" in str(exc):
            raise ConfigError(
                f"--dataset {path}: holds object arrays, which cannot be read without "
                "unpickling (that could run code); save plain numeric arrays "
                "(x.astype(float), y.astype(int))"
            ) from exc
        raise ConfigError(
            f"--dataset {path}: a damaged or unreadable .npz ({exc}); re-save it with numpy.savez"
        ) from exc
    odd = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if odd:  # numpy hands back raw bytes for a zip member that is not an .npy array
        raise ConfigError(
            f"--dataset {path}: members {odd} are not numpy arrays; re-save it with numpy.savez"
        )
    return arrays


def _loaded_arrays(path: Path) -> dict[str, Array]:
    # allow_pickle=False: an .npz from elsewhere must not be able to run code here.
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _check_labels(train: Array, test: Array, path: Path) -> list[str]:
    """Labels are class numbers 0..K-1, every class present: anything else is a mislabelling."""
    labels = np.concatenate([train, test])
    if labels.dtype.kind not in "iu":
        raise ConfigError(
            f"--dataset {path}: 'y' must hold integer class labels 0..K-1, got dtype "
            f"{labels.dtype}; convert them, e.g. y.astype(int)"
        )
    found = np.unique(labels)
    if found[0] != 0 or found[-1] != len(found) - 1:
        raise ConfigError(
            f"--dataset {path}: labels must be 0..K-1 with every class present; found "
            f"{len(found)} distinct labels from {found[0]} to {found[-1]} ({_listed(found)}). "
            "Number the classes from 0, e.g. y = numpy.unique(y, return_inverse=True)[1]"
        )
    if len(found) < 2:
        raise ConfigError(
            f"--dataset {path}: every label is {found[0]}; a classifier needs at least 2 classes"
        )
    return [str(c) for c in range(len(found))]


def _listed(values: Array, most: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:most])
    return shown + (", ..." if len(values) > most else "")


def _check_features(x: Array, y: Array, path: Path, key: str) -> None:
    if x.dtype.kind not in "iuf" or x.ndim < 2:
        raise ConfigError(
            f"--dataset {path}: {key!r} must be a real-valued numeric array of shape N x ..., "
            f"got dtype {x.dtype} and shape {x.shape}"
        )
    if len(x) != len(y.ravel()):
        labels = "y" if key == "x" else "y_test"
        raise ConfigError(
            f"--dataset {path}: {key!r} has {len(x)} rows but {labels!r} has {len(y.ravel())} "
            "labels; give one label per sample"
        )
    if len(x) == 0:
        raise ConfigError(f"--dataset {path}: {key!r} and its labels hold no samples (0 rows)")
    if _all_finite(x):
        return
    finite = np.isfinite(x)
    if not finite.all():
        n_nan, bad = int(np.isnan(x).sum()), int(x.size - np.count_nonzero(finite))
        first = int(np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))[0])
        raise ConfigError(
            f"--dataset {path}: {key!r} holds {n_nan} NaN and {bad - n_nan} infinite values "
            f"(first in sample {first}); remove or impute them before sharing"
        )


def _all_finite(x: Array) -> bool:
    """True when every value is finite, without a mask as large as x: a NaN or an infinity makes
    the sum NaN or infinite, so a finite sum proves them all finite (an overflowing one leaves the
    question to the exact count)."""
    if x.dtype.kind in "iu":
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.add.reduce(x.reshape(-1))))


def _image_dir(path: Path) -> tuple[Array, Array, None, None, list[str]]:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ConfigError(
            f"--dataset {path}: an image folder needs one sub-folder per class (>= 2)"
        )
    images: list[Array] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() in _IMAGE_SUFFIXES:
                images.append(_read_image(Image, file, images[0].shape if images else None))
                labels.append(label)
    if not images:
        raise ConfigError(f"--dataset {path}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    return np.stack(images), np.asarray(labels), None, None, classes


def _read_image(image_module: Any, file: Path, shape: tuple[int, ...] | None) -> Array:
    try:
        with image_module.open(file) as img:
            arr = np.asarray(img.convert("L" if img.mode in ("1", "L", "P", "I") else "RGB"))
    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ConfigError(f"image {file}: cannot be read ({exc}); remove or replace it") from exc
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if shape is not None and arr.shape != shape:
        raise ConfigError(f"image {file}: shape {arr.shape} differs from {shape}; resize all alike")
    return arr.astype(np.float64)


def _shuffled_rows(count: int, seed: int, limit: int | None) -> Array:
    """The source rows in --seed's order, the first `limit` of them (the split's order)."""
    order = np.random.default_rng(seed).permutation(count)
    return order if limit is None else order[:limit]


def _holdout(rows: Array, fraction: float, source: str) -> tuple[Array, Array]:
    """The test rows and the training rows, in that order."""
    n_test = max(1, round(len(rows) * fraction))
    if len(rows) - n_test < 2:
        raise ConfigError(f"--dataset {source}: {len(rows)} samples leave too few to train on")
    return rows[:n_test], rows[n_test:]


def check_trainable(
    ds: Dataset, source: str, batch_size: int, standardize: bool, precision_bits: int
) -> None:
    """Refuse, before any work, a split that training would choke on (preflight)."""
    count = ds.train_count
    if batch_size > count:
        raise ConfigError(
            f"--batch-size {batch_size} is larger than the training set of --dataset {source}: "
            f"{count} samples (after --max-samples and the held-out test split); use "
            f"--batch-size {count} or less, or more data"
        )
    _check_encodable(ds.x_train, source, standardize, precision_bits)


def _check_encodable(x: Array, source: str, standardize: bool, precision_bits: int) -> None:
    """What sharing.encode would refuse mid-run: features as encoded, standardised or not.

    Per-feature extremes are enough (standardising is monotonic per feature), so no
    standardised copy of the data is made here.
    """
    flat = x.reshape(len(x), -1)
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    if standardize:
        scaler = Standardizer.fit(flat)
        lo, hi = scaler.apply(lo), scaler.apply(hi)
    largest = float(max(np.abs(lo).max(), np.abs(hi).max()))
    if np.rint(np.ldexp(largest, precision_bits)) < MAX_ENCODED_ABS:
        return
    limit = math.ldexp(1.0, MAX_ENCODED_BITS - precision_bits)
    what = "after standardisation" if standardize else "with --no-standardize"
    fix = (
        "clip or remove the outliers"
        if standardize
        else "drop --no-standardize (features are then standardised with owner-only statistics) "
        "or scale the features yourself"
    )
    bits = _fitting_precision(largest)
    if bits >= 8:
        fix += f", or lower --precision-bits to {bits} (each bit less doubles the range)"
    raise ConfigError(
        f"--dataset {source}: the largest feature magnitude {what} is {largest:g}, beyond the "
        f"fixed-point range |x| < {limit:g} of --precision-bits {precision_bits} (values are "
        f"encoded as x * 2^{precision_bits} and must stay below 2^{MAX_ENCODED_BITS}); {fix}"
    )


def _fitting_precision(largest: float) -> int:
    """The most fractional bits that still encode `largest` within the safe range."""
    bits = MAX_ENCODED_BITS - 1
    while bits > 0 and np.rint(np.ldexp(largest, bits)) >= MAX_ENCODED_ABS:
        bits -= 1
    return bits


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean and scale, computed on the owner's training split; never uploaded."""

    mean: Array
    scale: Array

    @classmethod
    def fit(cls, x: Array, rows: int = 256, index: Array | None = None) -> Standardizer:
        """Statistics of the training features (constant features keep scale 1): of the rows
        `index` of x when given (gathered a chunk at a time), else of all of x.

        In float64, in one pass over chunks of `rows` samples with no copy of the data set:
        sums of the deviations from a shift and of their squares. The shift is the first
        chunk's mean, so the variance is not the difference of two large numbers (equal to the
        two-pass figures to 1e-15 here, a 1e6 outlier in the first row included). Each half of
        the rows is summed in its own thread, as the C loop and numpy's release the GIL (the
        owner waits for this before the first record is encrypted: 5 ms for 16 MB by numpy's
        passes, under 1 by the C loop)."""
        count = len(x) if index is None else len(index)
        take = _row_taker(x, index)
        shift = take(0, rows).mean(axis=0, dtype=np.float64) if count else np.zeros(x.shape[1:])
        middle = count // 2
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="veiltrain-fit") as pool:
            (sum_a, squares_a), (sum_b, squares_b) = pool.map(
                lambda lo, hi: _moments(x, index, lo, hi, shift=shift, rows=rows),
                (0, middle),
                (middle, count),
            )
        offset = (sum_a + sum_b) / max(count, 1)
        scale = np.sqrt(np.maximum((squares_a + squares_b) / max(count, 1) - offset * offset, 0.0))
        return cls(shift + offset, np.where(scale > 1e-12, scale, 1.0))

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> Standardizer:
        """No scaling: features are used as they are."""
        return cls(np.zeros(shape), np.ones(shape))

    def apply(self, x: Array) -> Array:
        """Standardised float64 copy of x (one new array, divided in place)."""
        out = np.subtract(x, self.mean, dtype=np.float64)
        out /= self.scale
        return out


def _row_taker(x: Array, index: Array | None) -> Callable[[int, int], Array]:
    """Rows lo..hi of x (a view), or of x[index], gathering only those rows."""
    if index is None:
        return lambda lo, hi: x[lo:hi]
    return lambda lo, hi: x[index[lo:hi]]


def _moments(
    x: Array, index: Array | None, lo: int, hi: int, *, shift: Array, rows: int
) -> tuple[Array, Array]:
    """Rows lo..hi's shifted sums: by the C loop where it reads x (16 MB in 0.8 ms against
    numpy's 4.9, the same bits), else by numpy's passes."""
    if not recordkernels.takes(x):
        return _shifted_moments(_row_taker(x, index), lo, hi, shift, rows)
    if index is None:
        return recordkernels.shifted_moments(x[lo:hi], None, shift, rows)
    picked = np.ascontiguousarray(index[lo:hi], dtype=np.int64)
    return recordkernels.shifted_moments(x, picked, shift, rows)


def _shifted_moments(
    take: Callable[[int, int], Array], lo: int, hi: int, shift: Array, rows: int
) -> tuple[Array, Array]:
    """Column sums of (x - shift) and of its square over rows lo..hi, `rows` at a time, through
    one scratch buffer."""
    sums, squares = np.zeros(shift.shape), np.zeros(shift.shape)
    scratch = np.empty((max(0, min(rows, hi - lo)), *shift.shape))
    for start in range(lo, hi, rows):
        deviations = scratch[: min(rows, hi - start)]
        np.subtract(take(start, start + len(deviations)), shift, out=deviations)
        sums += deviations.sum(axis=0)
        np.square(deviations, out=deviations)
        squares += deviations.sum(axis=0)
    return sums, squares


def one_hot(y: Array, num_classes: int) -> Array:
    """One-hot float rows: CrypTen's cross-entropy needs one-hot targets."""
    out = np.zeros((len(y), num_classes), dtype=np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


def batch_order(n: int, epoch: int, seed: int) -> Array:
    """The public per-epoch sample order that every party and the owner's shadow follow."""
    return np.random.default_rng([seed, epoch]).permutation(n)
