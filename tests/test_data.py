"""Owner-side data loading: digits, .npz files, image folders, standardisation, batch order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from veiltrain import data
from veiltrain.errors import ConfigError


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _xy(n: int = 30, features: int = 4, classes: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {"x": rng.normal(size=(n, features)), "y": np.arange(n) % classes}


# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_and_classes() -> None:
    ds = data.load("digits", 0.2, seed=0, max_samples=None)
    assert ds.sample_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.classes == [str(c) for c in range(10)]
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == round(1797 * 0.2)
    assert ds.x_train.dtype == np.float64 and ds.y_train.dtype == np.int64
    assert ds.y_train.shape == (len(ds.x_train),)
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_digits_max_samples_and_seed() -> None:
    a = data.load("digits", 0.25, seed=3, max_samples=120)
    b = data.load("digits", 0.25, seed=3, max_samples=120)
    c = data.load("digits", 0.25, seed=4, max_samples=120)
    assert len(a.x_train) == 90 and len(a.x_test) == 30
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


# ------------------------------------------------------------------------------------- npz


def test_npz_with_x_and_y(tmp_path: Path) -> None:
    arrays = _xy(40, 5, 4)
    ds = data.load(str(_npz(tmp_path / "d.npz", **arrays)), 0.25, seed=0, max_samples=None)
    assert ds.sample_shape == (5,) and ds.num_classes == 4
    assert len(ds.x_train) == 30 and len(ds.x_test) == 10
    # Every sample is kept with its own label (shuffled, not mixed up).
    both = np.concatenate([ds.x_train, ds.x_test])
    labels = np.concatenate([ds.y_train, ds.y_test])
    for row, label in zip(both, labels, strict=True):
        i = int(np.flatnonzero((arrays["x"] == row).all(axis=1))[0])
        assert arrays["y"][i] == label


def test_npz_with_test_split_keeps_it_as_given(tmp_path: Path) -> None:
    arrays = _xy(30, 2, 3)
    xt = np.arange(12, dtype=np.float32).reshape(6, 2)
    yt = np.array([2, 1, 0, 2, 1, 0])
    path = _npz(tmp_path / "d.npz", **arrays, x_test=xt, y_test=yt)
    ds = data.load(str(path), 0.5, seed=0, max_samples=None)
    assert len(ds.x_train) == 30  # no hold-out taken from the training arrays
    np.testing.assert_array_equal(ds.x_test, xt.astype(np.float64))
    np.testing.assert_array_equal(ds.y_test, yt)
    assert ds.num_classes == 3


def test_npz_class_count_includes_test_labels(tmp_path: Path) -> None:
    path = _npz(
        tmp_path / "d.npz",
        x=np.ones((10, 2)),
        y=np.arange(10) % 2,
        x_test=np.ones((3, 2)),
        y_test=np.array([4, 2, 3]),
    )
    assert data.load(str(path), 0.2, 0, None).num_classes == 5


def _refused(path: Path, *fragments: str) -> None:
    with pytest.raises(ConfigError) as info:
        data.load(str(path), 0.2, seed=0, max_samples=None)
    assert str(path) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_npz_without_y_is_refused(tmp_path: Path) -> None:
    _refused(_npz(tmp_path / "d.npz", x=np.ones((10, 2))), "'y'")


def test_npz_with_only_one_test_array_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", **_xy(), x_test=np.ones((3, 4)))
    _refused(path, "y_test")


def test_npz_with_float_labels_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=np.ones((10, 2)), y=np.linspace(0, 1, 10))
    _refused(path, "integer")


def test_npz_with_negative_labels_is_refused(tmp_path: Path) -> None:
    y, yt = np.arange(10) - 1, np.array([0, 1])
    path = _npz(tmp_path / "d.npz", x=np.ones((10, 2)), y=y, x_test=np.ones((2, 2)), y_test=yt)
    _refused(path, "0..K-1")


def test_npz_with_mismatched_lengths_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=np.ones((10, 2)), y=np.arange(9) % 2)
    _refused(path, "rows")


def test_npz_with_mismatched_test_lengths_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", **_xy(), x_test=np.ones((3, 4)), y_test=np.array([0, 1]))
    _refused(path, "x_test", "rows")


def test_npz_with_nan_features_is_refused(tmp_path: Path) -> None:
    arrays = _xy()
    arrays["x"][3, 1] = np.nan
    path = _npz(tmp_path / "d.npz", **arrays, x_test=np.ones((2, 4)), y_test=np.array([0, 1]))
    _refused(path, "NaN")


def test_npz_with_infinite_test_features_is_refused(tmp_path: Path) -> None:
    xt = np.ones((2, 4))
    xt[0, 0] = np.inf
    path = _npz(tmp_path / "d.npz", **_xy(), x_test=xt, y_test=np.array([0, 1]))
    _refused(path, "x_test")


def test_finite_features_whose_sum_overflows_load(tmp_path: Path) -> None:
    arrays = _xy()
    arrays["x"] = np.full(arrays["x"].shape, 3e38, dtype=np.float32)  # the float32 sum is inf
    path = _npz(tmp_path / "d.npz", **arrays)
    assert np.isfinite(data.load(str(path), 0.25, 0, None).x_train).all()


class _Bomb:
    """Unpickling this would run code; the loader must never get that far."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (pytest.fail, ("the .npz was unpickled",))


@pytest.mark.parametrize("key", ["x", "y"])
def test_npz_with_pickled_object_array_is_refused(tmp_path: Path, key: str) -> None:
    arrays: dict[str, Any] = {"x": np.ones((10, 2)), "y": np.arange(10) % 2}
    bad = np.empty(10, dtype=object)
    bad[:] = [_Bomb() for _ in range(10)]
    arrays[key] = bad if key == "y" else bad.reshape(10, 1)
    _refused(_npz(tmp_path / "d.npz", **arrays))


def test_npz_with_pickled_object_array_is_never_unpickled(tmp_path: Path) -> None:
    bad = np.empty((10, 1), dtype=object)
    bad[:, 0] = [_Bomb() for _ in range(10)]
    path = _npz(tmp_path / "d.npz", x=bad, y=np.arange(10) % 2)
    with pytest.raises(ValueError, match="allow_pickle|[Oo]bject"):
        data.load(str(path), 0.2, seed=0, max_samples=None)


def test_missing_npz_is_refused(tmp_path: Path) -> None:
    _refused(tmp_path / "absent.npz", "no such file")


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--dataset"):
        data.load(str(tmp_path / "table.csv"), 0.2, 0, None)


# --------------------------------------------------------------------------- image folder


def _png(path: Path, value: int, size: tuple[int, int] = (6, 5), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def test_image_folder(tmp_path: Path) -> None:
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(4):
            _png(tmp_path / name / f"{i}.png", 10 * c + i)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = data.load(str(tmp_path), 0.25, seed=0, max_samples=None)
    assert ds.classes == ["cat", "dog", "eel"] and ds.num_classes == 3
    assert ds.sample_shape == (1, 5, 6)
    assert len(ds.x_train) == 9 and len(ds.x_test) == 3
    for x, y in zip(
        np.concatenate([ds.x_train, ds.x_test]),
        np.concatenate([ds.y_train, ds.y_test]),
        strict=True,
    ):
        assert int(x[0, 0, 0]) // 10 == y  # each image keeps its class


def test_rgb_image_folder_is_channels_first(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", i, mode="RGB")
    assert data.load(str(tmp_path), 0.3, 0, None).sample_shape == (3, 5, 6)


def test_image_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", i)
    odd = tmp_path / "b" / "odd.png"
    _png(odd, 0, size=(7, 7))
    with pytest.raises(ConfigError, match="odd.png"):
        data.load(str(tmp_path), 0.2, 0, None)


def test_corrupt_image_is_refused(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", i)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png"):
        data.load(str(tmp_path), 0.2, 0, None)


def test_image_folder_needs_two_classes(tmp_path: Path) -> None:
    _png(tmp_path / "only" / "0.png", 1)
    with pytest.raises(ConfigError, match="sub-folder"):
        data.load(str(tmp_path), 0.2, 0, None)


def test_image_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        data.load(str(tmp_path), 0.2, 0, None)


# ---------------------------------------------------------------- standardising and batches


def test_standardizer_uses_training_statistics_only() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, size=(200, 1, 2, 2))
    test = rng.normal(-50.0, 9.0, size=(20, 1, 2, 2))
    scaler = data.Standardizer.fit(train)
    assert scaler.mean.shape == (1, 2, 2)
    np.testing.assert_allclose(scaler.mean, train.mean(axis=0))
    np.testing.assert_allclose(scaler.scale, train.std(axis=0))
    z = scaler.apply(train)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(scaler.apply(test), (test - train.mean(0)) / train.std(0))


def test_the_one_pass_standardizer_holds_up_far_from_zero_and_past_an_outlier() -> None:
    rng = np.random.default_rng(1)
    train = np.column_stack([1e6 + rng.normal(0, 1e-2, 3000), rng.normal(0, 1, 3000)])
    train[0, 1] = 1e6  # the first chunk's mean, the shift, is far from the rest
    scaler = data.Standardizer.fit(train, rows=64)
    np.testing.assert_allclose(scaler.mean, train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scaler.scale, train.std(axis=0), rtol=1e-9)


def test_the_standardizer_fits_the_rows_it_is_given_as_if_gathered() -> None:
    x = np.random.default_rng(2).normal(5.0, 3.0, size=(700, 3, 2)).astype(np.float32)
    rows = np.random.default_rng(3).permutation(700)[:450]
    picked, gathered = data.Standardizer.fit(x, index=rows), data.Standardizer.fit(x[rows])
    np.testing.assert_allclose(picked.mean, gathered.mean, rtol=1e-12)
    np.testing.assert_allclose(picked.scale, gathered.scale, rtol=1e-12)
    assert not np.allclose(picked.mean, data.Standardizer.fit(x).mean, rtol=1e-6)


def test_standardizer_keeps_constant_features_finite() -> None:
    train = np.column_stack([np.full(10, 7.0), np.arange(10.0)])
    scaler = data.Standardizer.fit(train)
    assert scaler.scale[0] == 1.0
    z = scaler.apply(train)
    assert np.isfinite(z).all()
    np.testing.assert_array_equal(z[:, 0], 0.0)


def test_identity_standardizer() -> None:
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(data.Standardizer.identity((3,)).apply(x), x)


def test_one_hot() -> None:
    out = data.one_hot(np.array([2, 0, 1]), 4)
    np.testing.assert_array_equal(out, np.eye(4)[[2, 0, 1]])
    assert out.dtype == np.float64


def test_batch_order_is_a_deterministic_permutation_per_epoch() -> None:
    n = 97
    order = data.batch_order(n, epoch=1, seed=5)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    np.testing.assert_array_equal(order, data.batch_order(n, epoch=1, seed=5))
    assert not np.array_equal(order, data.batch_order(n, epoch=2, seed=5))
    assert not np.array_equal(order, data.batch_order(n, epoch=1, seed=6))
    epochs = {tuple(data.batch_order(n, e, 5)) for e in range(1, 11)}
    assert len(epochs) == 10
