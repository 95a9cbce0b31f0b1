"""Owner-side data loading: digits, an .npz of arrays or an image folder, split and standardised."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veiltrain.errors import ConfigError

Array = npt.NDArray[Any]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Dataset:
    """Plaintext train/test split as the owner holds it (never uploaded)."""

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array
    classes: list[str]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one feature sample (e.g. (1, 8, 8) or (13,))."""
        return tuple(int(d) for d in self.x_train.shape[1:])

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
    x, y = _shuffled(x, y, seed, max_samples)
    if xt is None or yt is None:
        x, y, xt, yt = _holdout(x, y, test_fraction, source)
    return Dataset(
        x.astype(np.float64),
        y.astype(np.int64),
        xt.astype(np.float64),
        yt.astype(np.int64),
        classes,
    )


def _digits() -> tuple[Array, Array, None, None, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64).reshape(-1, 1, 8, 8)
    return x, np.asarray(bunch.target), None, None, [str(c) for c in range(10)]


def _npz(path: Path) -> tuple[Array, Array, Array | None, Array | None, list[str]]:
    if not path.is_file():
        raise ConfigError(f"--dataset {path}: no such file")
    # allow_pickle=False: an .npz from elsewhere must not be able to run code here.
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise ConfigError(
            f"--dataset {path}: not a readable .npz of numeric arrays ({exc}); object arrays "
            "are refused because loading them would unpickle"
        ) from exc
    for key in ("x", "y"):
        if key not in arrays:
            raise ConfigError(f"--dataset {path}: needs arrays 'x' and 'y', has {sorted(arrays)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ConfigError(f"--dataset {path}: give both 'x_test' and 'y_test' or neither")
    test_labels = arrays.get("y_test", np.empty(0, dtype=arrays["y"].dtype))
    labels = np.concatenate([arrays["y"].ravel(), test_labels.ravel()])
    classes = _check_labels(labels, path)
    xt, yt = arrays.get("x_test"), arrays.get("y_test")
    _check_features(arrays["x"], arrays["y"], path, "x")
    if xt is not None and yt is not None:
        _check_features(xt, yt, path, "x_test")
    return arrays["x"], arrays["y"].ravel(), xt, None if yt is None else yt.ravel(), classes


def _check_labels(labels: Array, path: Path) -> list[str]:
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"--dataset {path}: 'y' must hold integer class labels")
    if labels.min() < 0:
        raise ConfigError(f"--dataset {path}: labels must be 0..K-1, found {labels.min()}")
    return [str(c) for c in range(int(labels.max()) + 1)]


def _check_features(x: Array, y: Array, path: Path, key: str) -> None:
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
        raise ConfigError(f"--dataset {path}: {key!r} must be a numeric array of shape N x ...")
    if len(x) != len(y.ravel()):
        raise ConfigError(f"--dataset {path}: {key!r} has {len(x)} rows but its labels {len(y)}")
    if not np.isfinite(x).all():
        raise ConfigError(f"--dataset {path}: {key!r} holds NaN or infinite values")


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


def _shuffled(x: Array, y: Array, seed: int, limit: int | None) -> tuple[Array, Array]:
    order = np.random.default_rng(seed).permutation(len(x))
    if limit is not None:
        order = order[:limit]
    return x[order], y[order]


def _holdout(x: Array, y: Array, fraction: float, source: str) -> tuple[Array, Array, Array, Array]:
    n_test = max(1, round(len(x) * fraction))
    if len(x) - n_test < 2:
        raise ConfigError(f"--dataset {source}: {len(x)} samples leave too few to train on")
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean and scale, computed on the owner's training split; never uploaded."""

    mean: Array
    scale: Array

    @classmethod
    def fit(cls, x: Array) -> Standardizer:
        """Statistics of the training features (constant features keep scale 1)."""
        scale = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(scale > 1e-12, scale, 1.0))

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> Standardizer:
        """No scaling: features are used as they are."""
        return cls(np.zeros(shape), np.ones(shape))

    def apply(self, x: Array) -> Array:
        """Standardised copy of x."""
        return (x - self.mean) / self.scale


def one_hot(y: Array, num_classes: int) -> Array:
    """One-hot float rows: CrypTen's cross-entropy needs one-hot targets."""
    out = np.zeros((len(y), num_classes), dtype=np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


def batch_order(n: int, epoch: int, seed: int) -> Array:
    """The public per-epoch sample order that every party and the owner's shadow follow."""
    return np.random.default_rng([seed, epoch]).permutation(n)
