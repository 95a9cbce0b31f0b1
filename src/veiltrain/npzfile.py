"""The arrays of an uncompressed .npz read straight into place, never unpickling.

`np.load` reads a zip member in 256 KiB blocks, copies each into the array and checks the zip
CRC-32 with zlib: for a 16 MB float32 data set that was 6-7 ms of the owner's 11 ms load, before
any encryption could start. Here each member is read with one `readinto` and its CRC-32 checked
with ISA-L (the same values, 5x faster). zipfile parses the archive's directory and numpy's
`lib.format` the array headers; anything unusual (compressed members, object arrays, a member
that is not an .npy) is left to `np.load`, so this is a fast path, never a second format.
"""

from __future__ import annotations

import struct
import zipfile
from io import BufferedReader
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from isal.isal_zlib import crc32
from numpy.lib import format as npy_format

Array = npt.NDArray[Any]
# A zip local file header: signature, 22 bytes we do not need, name length, extra field length.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_HEADER_READERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}


def stored_arrays(path: Path) -> dict[str, Array] | None:
    """Every array of an .npz whose members are all stored .npy files, keyed as np.load keys
    them; None when np.load has to read it. A damaged member raises zipfile.BadZipFile."""
    with zipfile.ZipFile(path) as archive, path.open("rb") as file:
        infos = archive.infolist()
        if not all(_plain(info) for info in infos):
            return None
        arrays = {}
        for info in infos:
            array = _stored_array(file, info)
            if array is None:
                return None
            arrays[info.filename.removesuffix(".npy")] = array
    return arrays


def _plain(info: zipfile.ZipInfo) -> bool:
    encrypted = bool(info.flag_bits & 0x1)
    stored = info.compress_type == zipfile.ZIP_STORED
    return stored and not encrypted and info.filename.endswith(".npy")


def _stored_array(file: BufferedReader, info: zipfile.ZipInfo) -> Array | None:
    """One member read into a new array, its CRC-32 checked; None for what np.load must read."""
    start = _data_start(file, info)
    if file.read(len(npy_format.MAGIC_PREFIX)) != npy_format.MAGIC_PREFIX:
        return None  # not an .npy inside: np.load hands its bytes back, and data.py says so
    file.seek(start)
    version = npy_format.read_magic(file)
    if version not in _HEADER_READERS:
        return None
    shape, fortran_order, dtype = _HEADER_READERS[version](file)
    if dtype.hasobject:
        return None  # np.load refuses it with allow_pickle=False, in its own words
    header_bytes = file.tell() - start
    array = np.empty(shape, dtype=dtype, order="F" if fortran_order else "C")
    if header_bytes + array.nbytes != info.file_size:
        raise zipfile.BadZipFile(f"{info.filename}: its array header does not match its size")
    file.seek(start)
    head = file.read(header_bytes)
    body = array.reshape(-1, order="A").data.cast("B")  # a view, in storage order
    if file.readinto(body) != array.nbytes:
        raise zipfile.BadZipFile(f"{info.filename}: the archive ends inside this member")
    if crc32(body, crc32(head)) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
    return array


def _data_start(file: BufferedReader, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes begin: after its local header, whose lengths can differ from the
    central directory's (extra fields)."""
    file.seek(info.header_offset)
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    if signature != _LOCAL_SIGNATURE:
        raise zipfile.BadZipFile(f"{info.filename}: no local file header where the index says")
    start: int = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    file.seek(start)
    return start
