"""The .npz fast path: the same arrays as np.load, damage refused, the unusual left to np.load."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from veiltrain import data, npzfile
from veiltrain.errors import ConfigError


def _loaded(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _same(got: dict[str, Any] | None, want: dict[str, Any]) -> None:
    assert got is not None and sorted(got) == sorted(want)
    for key, array in want.items():
        assert got[key].dtype == array.dtype and got[key].shape == array.shape
        assert got[key].flags.f_contiguous == array.flags.f_contiguous
        np.testing.assert_array_equal(got[key], array)


def test_stored_arrays_equal_what_np_load_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.normal(size=(37, 3, 5)).astype(np.float32),
        "y": rng.integers(0, 4, 37),
        "fortran": np.asfortranarray(rng.normal(size=(6, 7))),
        "big_endian": np.arange(9, dtype=">i4"),
        "empty": np.zeros((0, 3)),
        "scalar": np.array(2.5),
        "wide_header": np.zeros(3, dtype=[(f"field{i}", "<f4") for i in range(300)]),
    }
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    _same(npzfile.stored_arrays(path), _loaded(path))


def test_a_compressed_npz_is_left_to_np_load(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=np.ones((4, 2)), y=np.arange(4) % 2)
    assert npzfile.stored_arrays(path) is None
    ds = data.load(str(path), 0.25, seed=0, max_samples=None)  # np.load reads it instead
    assert ds.sample_shape == (2,)


def test_object_arrays_and_foreign_members_are_left_to_np_load(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([None, 1], dtype=object), y=np.arange(2))
    assert npzfile.stored_arrays(path) is None  # np.load then refuses it with allow_pickle
    with zipfile.ZipFile(tmp_path / "text.npz", "w") as archive:
        archive.writestr("x.npy", "not an array")
    assert npzfile.stored_arrays(tmp_path / "text.npz") is None


def _flip_last_byte(path: Path) -> None:
    """Damage the last array byte of member x.npy, leaving the archive readable."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    raw = bytearray(path.read_bytes())
    local = info.header_offset  # local header: 30 bytes, then the name and the extra field
    name_length = int.from_bytes(raw[local + 26 : local + 28], "little")
    extra_length = int.from_bytes(raw[local + 28 : local + 30], "little")
    raw[local + 30 + name_length + extra_length + info.file_size - 1] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_damaged_member_is_refused_by_its_crc(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(40.0).reshape(20, 2), y=np.arange(20) % 2)
    _flip_last_byte(path)
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32 for file 'x.npy'"):
        npzfile.stored_arrays(path)
    with pytest.raises(ConfigError, match=r"d\.npz: a damaged or unreadable \.npz"):
        data.load(str(path), 0.25, seed=0, max_samples=None)


def test_a_truncated_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(4000.0).reshape(2000, 2), y=np.arange(2000) % 2)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        cut = archive.getinfo("x.npy").header_offset + 2000
    path.write_bytes(raw[:cut])  # the directory at the end is gone too: not a zip any more
    with pytest.raises(ConfigError, match="not an .npz file"):
        data.load(str(path), 0.25, seed=0, max_samples=None)
