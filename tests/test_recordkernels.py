"""veiltrain.recordkernels: the C loops give numpy's words and bits, refuse what they must, and
read only rows of their source."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from veiltrain import data, owner, recordkernels, sharing
from veiltrain.errors import ConfigError

LIMIT = sharing.MAX_ENCODED_ABS - 0.5


def _source(dtype: Any, rows: int = 300, seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 2, 3, 3)) * 40 + 7).astype(dtype)


def _encode(
    x: Any, rows: Any, labels: Any, mean: Any, scale: float = 1.0, classes: int = 1
) -> tuple[Any, int]:
    """The loop with mean `mean` and every feature's quantum 1 / scale."""
    quantum = np.full(np.size(mean), 1.0 / scale)
    return recordkernels.encode_records(
        x, rows, labels, mean=mean, quantum=quantum, limit=LIMIT, classes=classes, one=1
    )


def test_the_extension_is_built() -> None:
    assert recordkernels.built(), "veiltrain._recordkernels is missing: run make venv"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("picked", [False, True])
def test_records_equal_numpy_passes_word_for_word(dtype: Any, picked: bool) -> None:
    x, y = _source(dtype), np.random.default_rng(1).integers(0, 5, 300)
    rows = np.random.default_rng(2).permutation(300)[:170] if picked else None
    chosen, labels = (x, y) if rows is None else (x[rows], y[rows])
    scaler = data.Standardizer.fit(x)
    fused = owner.encode_records(x, labels, scaler, 5, 16, rows=rows)
    standardised = scaler.apply(chosen).reshape(len(chosen), -1)
    expected = np.concatenate([standardised, data.one_hot(labels, 5)], axis=1)
    assert np.array_equal(fused, sharing.encode(expected, 16))


def test_halves_round_to_even_as_rint() -> None:
    """v = k + 1/2 exactly (x = v / 2^16, mean 0, scale 1): rint rounds these to even."""
    halves = np.arange(-40, 40) + 0.5
    x = np.ldexp(np.concatenate([halves, [2.0**24 - 0.75, -(2.0**24 - 0.75)]]), -16)[:, None]
    out, bad = _encode(x, np.arange(len(x)), np.zeros(len(x), dtype=np.int64), np.zeros(1), 2**16)
    assert bad == 0
    assert np.array_equal(out[:, 0], np.rint(np.ldexp(x[:, 0], 16)).astype(np.int64))
    assert out[0, 0] == -40 and out[1, 0] == -38  # -39.5 and -38.5 go to the even neighbour


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 2.0**24 - 0.5, -(2.0**24 - 0.5)])
def test_unsafe_values_are_counted_and_the_owner_names_them(value: float) -> None:
    x, y = np.array([[0.25], [np.ldexp(value, -16)]]), np.array([0, 1])
    _, bad = _encode(x, np.arange(2), y, np.zeros(1), 2**16, classes=2)
    assert bad == 1
    named = "1 of 2 value.s. are outside|1 are infinite|1 value.s. are NaN"
    with pytest.raises(ConfigError, match=named):
        owner.encode_records(x, y, data.Standardizer.identity((1,)), 2, 16)


def test_labels_and_rows_are_checked_before_the_loop_reads() -> None:
    x = _source(np.float32, rows=10)
    mean = np.zeros(18)
    with pytest.raises(ValueError, match="label outside 0..2"):
        _encode(x, np.arange(2), np.array([0, 3]), mean, classes=3)
    with pytest.raises(ValueError, match="label outside"):
        _encode(x, np.arange(2), np.array([-1, 0]), mean, classes=3)
    for rows in (np.array([0, 10]), np.array([-1, 2])):
        with pytest.raises(IndexError, match="outside 10"):
            _encode(x, rows, np.array([0, 0]), mean, classes=3)
        with pytest.raises(IndexError, match="outside 10"):
            recordkernels.shifted_moments(x, rows, np.zeros((2, 3, 3)), 4)
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        _encode(x, np.arange(3), np.zeros(2), mean, classes=3)
    with pytest.raises(ValueError, match="17 per-feature values for 18"):
        _encode(x, np.arange(2), np.zeros(2), mean[1:], classes=3)
    with pytest.raises(ValueError, match="int64"):
        recordkernels.shifted_moments(x, np.arange(2, dtype=np.int32), np.zeros((2, 3, 3)), 4)


def test_sources_the_loops_do_not_read_go_through_numpy() -> None:
    x = _source(np.float32).reshape(300, -1)
    assert not recordkernels.takes(x.astype(np.uint8))
    assert not recordkernels.takes(x.astype(np.float16))
    assert not recordkernels.takes(np.asfortranarray(x))
    scaler, y = data.Standardizer.fit(x), np.zeros(300, dtype=np.int64)
    fortran = owner.encode_records(np.asfortranarray(x), y, scaler, 2, 16)
    assert np.array_equal(fortran, owner.encode_records(x, y, scaler, 2, 16))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 63, 64, 65, 300])
def test_moments_equal_numpy_passes_bit_for_bit(dtype: Any, count: int) -> None:
    """Chunk boundaries on both sides of `count` (chunks of 64), gathered and in place."""
    x = _source(dtype) * 1000 + 1e5  # far from zero: the order of additions shows in the bits
    shift = x[:64].mean(axis=0, dtype=np.float64)
    rows = np.random.default_rng(5).permutation(300)[:count].astype(np.int64)
    for picked, take in ((rows, lambda lo, hi: x[rows[lo:hi]]), (None, lambda lo, hi: x[lo:hi])):
        expected = data._shifted_moments(take, 0, count, shift, 64)
        got = recordkernels.shifted_moments(x[:count] if picked is None else x, picked, shift, 64)
        for a, b in zip(got, expected, strict=True):
            assert a.shape == shift.shape and np.array_equal(a, b)


def test_the_fit_is_the_same_with_or_without_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _source(np.float32, rows=1000) + 300
    index = np.random.default_rng(6).permutation(1000)[:777]
    with_loop = [data.Standardizer.fit(x), data.Standardizer.fit(x, index=index)]
    monkeypatch.setattr(recordkernels, "takes", lambda x: False)
    without = [data.Standardizer.fit(x), data.Standardizer.fit(x, index=index)]
    for a, b in zip(with_loop, without, strict=True):
        assert np.array_equal(a.mean, b.mean) and np.array_equal(a.scale, b.scale)
