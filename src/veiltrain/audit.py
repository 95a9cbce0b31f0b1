"""`veiltrain audit`: scan stored artifacts for anything a compute party should not be able to read.

Every object is recognised by its bytes, never by its name, and nothing is ever loaded: pickles are
walked with `pickletools.genops` (which executes nothing), zip archives are listed, `.npy` and
safetensors headers are parsed, FFRecord headers are read like the reader does. Content checks
read a bounded sample of each object (SAMPLE_BYTES); the manifest check hashes every object a
manifest or checkpoint record lists, in one streamed read, unless asked not to.

Thresholds, and what they cost on a real share (uniform over 2^64, or CrypTen's 2-party
truncation, which leaves a share uniform over +-2^(63 - f) with sign-extended top bits):

- data-like: at least 8 words, over 90 % of them |w| < 2^(8 + f) for some f in 8..23 (the union is
  |w| < 2^31). A uniform word is that small with probability 2^-32, a truncated one 2^-16 or less.
- plaintext floats: at least 16 values, over 90 % finite and zero or of magnitude 2^-24..2^24 when
  read as float64 or float32 (uniform words: about 2 % and 19 %).
- uniformity: at least 1280 words (5 per bin); a chi-square test of the byte histogram at each of
  the low five byte positions (bits 0-39: the top bits may be sign extension after truncation),
  flagged when one p-value is below 1e-6 / 5, so a real share is flagged with probability at most
  1e-6 per object (Bonferroni).
- a pickle signature (0x80, protocol 2-5) is confirmed by walking the opcodes: a STOP or 8 valid
  opcodes; random bytes pass both steps with probability about 1e-8.
"""

from __future__ import annotations

import io
import json
import pickletools
import posixpath
import re
import secrets
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from scipy.stats import chisquare  # type: ignore[import-untyped]  # scipy ships no type stubs

from veiltrain import contract
from veiltrain.errors import IntegrityError, StoreError, VeiltrainError
from veiltrain.store import (
    STORE_FAILURES,
    Location,
    check_objects,
    sha256_bytes,
    store_error,
)

SAMPLE_BYTES: Final = 8 << 20
"""At most this much of one object's content is read for the content checks."""
HEAD_BYTES: Final = 4 << 20
"""The first bytes of every object are read (whole objects up to this size)."""
RANGES: Final = 4
RANGE_BYTES: Final = 256 << 10
"""Beyond the head, raw objects are sampled at RANGES random offsets of RANGE_BYTES each."""
FIRST_RECORDS: Final = 64
RANDOM_RECORDS: Final = 16
RECORD_BYTES: Final = 256 << 10
"""FFRecord: the first 64 records and 16 random ones, at most 256 KiB of each."""

SMALL_REAL_BITS: Final = 8
PRECISIONS: Final = range(8, 24)
DATA_FRACTION: Final = 0.9
MIN_DATA_WORDS: Final = 8
FLOAT_FRACTION: Final = 0.9
MIN_FLOATS: Final = 16
MODERATE: Final = (2.0**-24, 2.0**24)
UNIFORM_P: Final = 1e-6
UNIFORM_BYTES: Final = 5
MIN_UNIFORM_WORDS: Final = 256 * 5
MIN_PICKLE_OPS: Final = 8
MAX_JSON_NUMBERS: Final = 256
MAX_DEPTH: Final = 3
_SNIFF: Final = 64 << 10
_JSON_BYTES: Final = 16 << 20
_ZIP_ENTRIES: Final = 32
_PICKLE_BLOBS: Final = 8
_CHECKPOINT_RECORD: Final = "checkpoint.json"
"""checkpoints.RECORD, named here because veiltrain.checkpoints imports torch (5 s)."""
_CHECKPOINT_FILES: Final = ("params.safetensors", "losses.safetensors")
_CHECKPOINT_FOLDER: Final = re.compile(r"(^|/)checkpoints/epoch-\d+$")
_PRIVATE_NAMES: Final = (
    contract.PRIVATE_TRAIN,
    contract.PRIVATE_TEST,
    contract.PRIVATE_SCALER,
    contract.PRIVATE_INITIAL,
    contract.PRIVATE_MODEL_SPEC,
    contract.PRIVATE_ORDER,
)
_PRIVATE_FOLDERS: Final = ("private", "staging")
_FLOAT_DTYPES: Final = ("F", "BF", "C")
_NUMBER = re.compile(rb"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")

Kind = Literal["data-like", "code", "plaintext", "non-uniform", "manifest", "owner-private"]
Words = npt.NDArray[np.int64]


class Finding(BaseModel):
    """One reason a store is not clean: the object, the kind of problem, a plain reason."""

    model_config = ConfigDict(frozen=True)

    object: str
    kind: Kind
    reason: str


class AuditResult(BaseModel):
    """What an audit of one location found, and what it shows by design."""

    model_config = ConfigDict(frozen=True)

    location: str
    role: str
    findings: list[Finding]
    visible: list[str]
    """Shapes, counts and hyperparameters: visible to a party by design, not findings."""
    notes: list[str]
    objects: int
    bytes: int
    bytes_sampled: int
    bytes_hashed: int
    hashed: bool
    sample_limit: int = SAMPLE_BYTES

    @property
    def clean(self) -> bool:
        """Whether nothing was found."""
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict, with `clean`."""
        return {**self.model_dump(), "clean": self.clean}


class _Exhausted(Exception):
    """An object's sampling limit is reached: its remaining content is not read."""


# ------------------------------------------------------------------------------ byte access


class _Blob:
    """Random access to a payload's bytes; store reads count against the object's limit."""

    def __init__(self, size: int, fetch: Callable[[int, int], bytes], limit: int | None) -> None:
        self.size = size
        self._fetch = fetch
        self._left = limit
        self.read_bytes = 0

    @classmethod
    def of(cls, data: bytes) -> _Blob:
        """A payload already in memory (a record, a zip entry, a pickled bytes value)."""
        return cls(len(data), lambda start, end: data[start:end], None)

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end), clipped to the payload; _Exhausted past the sampling limit."""
        start, end = max(0, start), min(end, self.size)
        if end <= start:
            return b""
        if self._left is not None:
            if end - start > self._left:
                raise _Exhausted
            self._left -= end - start
        self.read_bytes += end - start
        return self._fetch(start, end)


class _Cached(_Blob):
    """A store object whose head is read once; later reads inside it cost nothing."""

    def __init__(self, size: int, fetch: Callable[[int, int], bytes]) -> None:
        super().__init__(size, fetch, SAMPLE_BYTES)
        self.head = super().read(0, min(size, HEAD_BYTES))

    def read(self, start: int, end: int) -> bytes:
        if end <= len(self.head):
            return self.head[max(0, start) : end]
        return super().read(start, end)


class _BlobFile(io.RawIOBase):
    """A seekable file over a blob, for zipfile (it reads the central directory at the end)."""

    def __init__(self, blob: _Blob) -> None:
        super().__init__()
        self._blob, self._pos = blob, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._blob.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._blob.read(self._pos, self._pos + len(view))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _ranged(loc: Location, name: str) -> Callable[[int, int], bytes]:
    path, where = loc.path(name), f"{loc.url}/{name} ({loc.role})"

    def fetch(start: int, end: int) -> bytes:
        try:
            return bytes(loc.fs.cat_file(path, start=start, end=end))
        except STORE_FAILURES as exc:
            raise store_error(where, exc) from exc

    return fetch


# ------------------------------------------------------------------------------ word checks


def _view(chunks: Iterable[bytes], itemsize: int, dtype: str) -> npt.NDArray[Any]:
    arrays = [np.frombuffer(c, dtype=dtype, count=len(c) // itemsize) for c in chunks]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)


def data_like(words: Words, precision_bits: int = 16) -> str | None:
    """Why int64 words look like fixed-point data (mostly |x| < 2^8 at some precision), or None.

    The run's precision is tried first, then 8..23 fractional bits; a share made in a world of
    one party is exactly the data times 2^f, so it fails here.
    """
    if len(words) < MIN_DATA_WORDS:
        return None
    magnitude = np.abs(words.astype(np.float64))
    for bits in (precision_bits, *PRECISIONS):
        share = float(np.mean(magnitude < 2.0 ** (SMALL_REAL_BITS + bits)))
        if share > DATA_FRACTION:
            return (
                f"{share:.0%} of {len(words)} int64 words decode at {bits} fractional bits to "
                f"|x| < {2**SMALL_REAL_BITS}: data in the clear, or a CrypTen share made in a "
                "world of one party (a real share is uniform over 2^64, where about one word in "
                "2^32 is that small)"
            )
    return None


def float_like(chunks: Sequence[bytes]) -> str | None:
    """Why bytes look like a plaintext float64 or float32 array, or None."""
    for itemsize, dtype, label in ((8, "<f8", "float64"), (4, "<f4", "float32")):
        with np.errstate(invalid="ignore", over="ignore"):
            values = _view(chunks, itemsize, dtype).astype(np.float64)
            if len(values) < MIN_FLOATS:
                continue
            size = np.abs(values)
            moderate = np.isfinite(values) & (
                (values == 0) | ((size >= MODERATE[0]) & (size <= MODERATE[1]))
            )
        share = float(np.mean(moderate))
        if share > FLOAT_FRACTION:
            return (
                f"{share:.0%} of {len(values)} values read as {label} are finite and zero or "
                "of magnitude 2^-24..2^24: a plaintext float array (random words would give "
                "about 2 % as float64, 19 % as float32)"
            )
    return None


def byte_pvalues(words: Words) -> list[float]:
    """Chi-square p-values of the byte histogram at byte positions 0..4 of the words (LE).

    The top three bytes are left out: after CrypTen's 2-party truncation they are sign
    extension in a perfectly good share (loss values, BatchNorm statistics).
    """
    raw = words.astype("<i8").view(np.uint8).reshape(-1, 8)
    pvalues = []
    for position in range(UNIFORM_BYTES):
        counts = np.bincount(raw[:, position], minlength=256)
        pvalues.append(float(chisquare(counts).pvalue))
    return pvalues


def non_uniform(words: Words) -> str | None:
    """Why int64 words are not a uniformly random share, or None (too few words to tell)."""
    if len(words) < MIN_UNIFORM_WORDS:
        return None
    pvalues = byte_pvalues(words)
    worst = min(range(len(pvalues)), key=pvalues.__getitem__)
    if pvalues[worst] >= UNIFORM_P / UNIFORM_BYTES:
        return None
    return (
        f"{len(words)} int64 words fail a uniformity test (chi-square of byte {worst}: "
        f"p = {pvalues[worst]:.1e}, threshold {UNIFORM_P:g} per object): not a uniformly "
        "random share"
    )


# ------------------------------------------------------------------------------ one payload


@dataclass(frozen=True)
class _At:
    """Where in an object a payload is: a part merged across findings, and its nesting."""

    part: str = ""
    context: str = ""
    depth: int = 0

    def inside(self, context: str) -> _At:
        return _At(self.part, f"{self.context}{context}: ", self.depth + 1)

    def at(self, part: str) -> _At:
        return _At(part, self.context, self.depth + 1)


@dataclass
class _Scan:
    """The findings and notes of one object; equal findings of many parts are merged."""

    name: str
    precision: int
    found: dict[tuple[Kind, str], list[str]] = field(default_factory=dict)
    visible: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def flag(self, kind: Kind, reason: str, at: _At) -> None:
        self.found.setdefault((kind, at.context + reason), []).append(at.part)

    def findings(self) -> list[Finding]:
        return [
            Finding(object=self.name, kind=kind, reason=_with_parts(parts, reason))
            for (kind, reason), parts in self.found.items()
        ]


def _with_parts(parts: list[str], reason: str) -> str:
    """'records 0, 1, 2 and 77 more: reason' (parts like 'record 0', 'tensor fc.weight')."""
    named = [p for p in dict.fromkeys(parts) if p]
    if not named:
        return reason
    labels = {p.split(" ", 1)[0] for p in named}
    if len(named) > 1 and len(labels) == 1:
        named = [p.split(" ", 1)[-1] for p in named]
        named[0] = f"{labels.pop()}s {named[0]}"
    more = f" and {len(named) - 3} more" if len(named) > 3 else ""
    return f"{', '.join(named[:3])}{more}: {reason}"


def _raw(scan: _Scan, chunks: Sequence[bytes], at: _At) -> None:
    """Content that is no known format: shares must be uniform int64 words."""
    words = _view(chunks, 8, "<i8")
    why = data_like(words, scan.precision)
    if why:
        scan.flag("data-like", why, at)
        return
    why = float_like(chunks)
    if why:
        scan.flag("plaintext", why, at)
        return
    why = non_uniform(words)
    if why:
        scan.flag("non-uniform", why, at)


def _payload(scan: _Scan, blob: _Blob, at: _At) -> bool:
    """Check a payload by what its bytes are; False when it is none of the known formats."""
    if at.depth > MAX_DEPTH or blob.size == 0:
        return True
    head = blob.read(0, min(blob.size, _SNIFF))
    checks = (_pickle, _zip, _npy, _safetensors, _ffrecord, _json, _text)
    return any(check(scan, blob, head, at) for check in checks)


def _nested(scan: _Scan, data: bytes, at: _At) -> None:
    if not _payload(scan, _Blob.of(data), at):
        _raw(scan, [data], at)


def _pickle(scan: _Scan, blob: _Blob, head: bytes, at: _At) -> bool:
    if not _pickle_signature(head):
        return False
    data = blob.read(0, min(blob.size, HEAD_BYTES))
    ops, end, values = _walk_pickle(data)
    # Random words start 0x80 0x0N one time in 2^14 and then reach a STOP about one time in
    # 200: a STOP counts only at the very end or before the next pickle (legacy torch.save).
    ends = end is not None and (end == len(data) or _pickle_signature(data[end:]))
    if not ends and ops < MIN_PICKLE_OPS:
        return False
    scan.flag(
        "code",
        f"a pickle (protocol {head[1]}): loading it runs code; shares must be int64 words "
        "(FFRecord or safetensors), metadata JSON",
        at,
    )
    # torch.save's legacy format is a few pickles back to back, then the raw storages.
    for _ in range(_PICKLE_BLOBS):
        if end is None or not _pickle_signature(data[end:]):
            break
        start = end
        _, more, found = _walk_pickle(data[start:])
        values += found
        end = None if more is None else start + more
    for value in values[:_PICKLE_BLOBS]:
        _nested(scan, value, at.inside("inside the pickle"))
    if end is not None and end < len(data):
        _nested(scan, data[end:], at.inside("after the pickle"))
    return True


def _pickle_signature(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _walk_pickle(data: bytes) -> tuple[int, int | None, list[bytes]]:
    """Opcodes parsed, where the STOP ends (None if none), large bytes values; runs nothing."""
    ops, end, values = 0, None, list[bytes]()
    try:
        for op, arg, position in pickletools.genops(io.BytesIO(data)):
            ops += 1
            if op.name == "STOP" and position is not None:  # always set when reading BytesIO
                end = position + 1
            if isinstance(arg, bytes | bytearray) and len(arg) >= 64:
                values.append(bytes(arg))
    except (ValueError, EOFError, struct.error, OverflowError):
        pass  # not (or no longer) a pickle: what was parsed so far decides
    return ops, end, values


def _zip(scan: _Scan, blob: _Blob, head: bytes, at: _At) -> bool:
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return False
    try:
        with zipfile.ZipFile(_BlobFile(blob)) as archive:
            infos = archive.infolist()
            pickles = [i.filename for i in infos if i.filename.endswith(".pkl")]
            if pickles:
                scan.flag(
                    "code",
                    f"a zip archive holding the pickle {pickles[0]}"
                    f"{' (the torch.save format)' if pickles[0].endswith('data.pkl') else ''}: "
                    "loading it runs code",
                    at,
                )
            for info in [i for i in infos if not i.filename.endswith(".pkl")][:_ZIP_ENTRIES]:
                with archive.open(info) as entry:
                    data = entry.read(RECORD_BYTES)
                _nested(scan, data, at.inside(f"zip entry {info.filename}"))
    except _ZIP_ERRORS as exc:
        scan.flag("code", f"a zip archive that cannot be listed ({exc})", at)
    return True


_ZIP_ERRORS: Final = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,  # a compression method this Python lacks
    RuntimeError,  # an encrypted entry
    ValueError,
    EOFError,
    OSError,
    zlib.error,
)


def _npy(scan: _Scan, blob: _Blob, head: bytes, at: _At) -> bool:
    if not head.startswith(b"\x93NUMPY"):
        return False
    header = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(header)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(header)
    except (ValueError, SyntaxError) as exc:
        scan.flag("plaintext", f"a .npy array with an unreadable header ({exc})", at)
        return True
    what = f"a .npy array ({dtype}, shape {tuple(shape)})"
    if dtype.hasobject:
        scan.flag("code", f"{what} of Python objects: pickles; loading them runs code", at)
    elif dtype.kind in "fc":
        scan.flag("plaintext", f"{what}: plaintext floats", at)
    elif dtype.kind in "iu" and dtype.itemsize == 8:
        start = header.tell()
        data = blob.read(start, start + min(RECORD_BYTES * 4, blob.size - start))
        _raw(scan, [np.frombuffer(data, dtype=dtype).astype("<i8").tobytes()], at)
    else:
        scan.flag("plaintext", f"{what}: plaintext values; shares are int64 words", at)
    return True


def _safetensors(scan: _Scan, blob: _Blob, head: bytes, at: _At) -> bool:
    if len(head) < 10 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack_from("<Q", head)
    if length > blob.size - 8:
        return False
    try:
        header = json.loads(blob.read(8, 8 + length))
    except ValueError:
        return False
    except _Exhausted:
        scan.flag("plaintext", "a safetensors header too large to sample", at)
        return True
    if not isinstance(header, dict):
        return False
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    try:
        _tensors(scan, blob, 8 + length, tensors, at)
    except (TypeError, ValueError) as exc:
        scan.flag("plaintext", f"a safetensors file with a malformed header ({exc})", at)
    return True


def _tensors(scan: _Scan, blob: _Blob, base: int, tensors: dict[str, Any], at: _At) -> None:
    pooled: list[bytes] = []
    values, sampled = 0, 0
    per_tensor = max(16 << 10, (SAMPLE_BYTES - HEAD_BYTES) // max(1, len(tensors)))
    for name, meta in tensors.items():
        dtype, shape = str(meta.get("dtype")), meta.get("shape", [])
        part = at.at(f"tensor {name}")
        if dtype.startswith(_FLOAT_DTYPES):
            scan.flag("plaintext", f"a plaintext {dtype} tensor of shape {shape}", part)
        elif dtype != "I64":
            scan.flag("plaintext", f"a {dtype} tensor: plaintext values? shares are I64", part)
        else:
            begin, end = (int(v) for v in meta.get("data_offsets", (0, 0)))
            values += (end - begin) // 8
            try:
                data = blob.read(base + begin, base + min(end, begin + per_tensor))
            except _Exhausted:
                continue
            sampled += 1
            why = data_like(_view([data], 8, "<i8"), scan.precision)
            if why:
                scan.flag("data-like", why, part)
            else:
                pooled.append(data)
    if at.depth == 0 and values and not _CHECKPOINT_FOLDER.search(posixpath.dirname(scan.name)):
        scan.visible.append(f"{scan.name}: {sampled} int64 tensors, {values} values")
        if sampled < sum(1 for m in tensors.values() if m.get("dtype") == "I64"):
            scan.notes.append(f"{scan.name}: sampled {sampled} tensors (the per-object limit)")
    words = _view(pooled, 8, "<i8")
    why = non_uniform(words)
    if why:
        scan.flag("non-uniform", why, at)


def _ffrecord(scan: _Scan, blob: _Blob, head: bytes, at: _At) -> bool:
    named = at.depth == 0 and scan.name.endswith(".ffr")
    count = struct.unpack_from("<q", head, 4)[0] if len(head) >= 12 else -1
    data_start = 12 + 12 * count
    consistent = count >= 0 and data_start <= blob.size
    if consistent and count:
        offset0 = blob.read(12 + 4 * count, 20 + 4 * count)
        consistent = struct.unpack("<q", offset0)[0] == data_start
    if not consistent:
        if named:
            scan.flag("plaintext", "named .ffr but its FFRecord header is inconsistent", at)
        return named
    pooled: list[bytes] = []
    lengths: list[int] = []
    try:
        for index in _record_indices(count):
            span = _record_span(blob, count, index)
            if span is None:
                scan.flag("plaintext", f"FFRecord offsets of record {index} are inconsistent", at)
                break
            lengths.append(span[1] - span[0])
            record = blob.read(span[0], min(span[1], span[0] + RECORD_BYTES))
            if not _payload(scan, _Blob.of(record), at.at(f"record {index}")):
                pooled.append(record)
    except _Exhausted:
        scan.notes.append(f"{scan.name}: records sampled up to the per-object limit")
    _raw(scan, pooled, at.inside("records"))
    if at.depth == 0:
        sizes = "/".join(str(n) for n in sorted(set(lengths))[:3])
        scan.visible.append(
            f"{scan.name}: FFRecord file of {count} records of {sizes} bytes "
            f"({len(lengths)} sampled)"
        )
    return True


def _record_indices(count: int) -> list[int]:
    first = list(range(min(count, FIRST_RECORDS)))
    rest = range(FIRST_RECORDS, count)
    # Random records from the OS's CSPRNG: a writer cannot tell which ones will be read.
    extra = secrets.SystemRandom().sample(rest, min(len(rest), RANDOM_RECORDS))
    return first + sorted(extra)


def _record_span(blob: _Blob, count: int, index: int) -> tuple[int, int] | None:
    base = 12 + 4 * count + 8 * index
    raw = blob.read(base, base + (16 if index + 1 < count else 8))
    offsets = struct.unpack(f"<{len(raw) // 8}q", raw)
    start, end = offsets[0], offsets[1] if len(offsets) > 1 else blob.size
    if not 12 + 12 * count <= start <= end <= blob.size:
        return None
    return start, end


def _json(scan: _Scan, blob: _Blob, head: bytes, at: _At) -> bool:
    if head.lstrip()[:1] not in (b"{", b"[") or blob.size > _JSON_BYTES:
        return False
    try:
        value = json.loads(blob.read(0, blob.size))
    except (ValueError, _Exhausted):
        return False
    _json_secrets(scan, value, at)
    numbers = _count_numbers(value)
    if numbers > MAX_JSON_NUMBERS:
        scan.flag("data-like", f"JSON holding {numbers} numbers: values in the clear", at)
    if at.depth == 0:
        _describe_json(scan, value)
    return True


def _json_secrets(scan: _Scan, value: Any, at: _At) -> None:
    if isinstance(value, dict) and "key" in value:
        scan.flag("owner-private", "JSON with a 'key' field, like the owner's run record", at)
    if _has_int_seed(value):
        scan.flag(
            "owner-private",
            "JSON with an integer 'seed' (--seed fixes the initial weights; parties never get it)",
            at,
        )


def _has_int_seed(value: Any) -> bool:
    if isinstance(value, dict):
        seed = value.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            return True
        return any(_has_int_seed(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_int_seed(v) for v in value)
    return False


def _count_numbers(value: Any, key: str = "") -> int:
    # Shapes are visible by design (and a big model's spec lists hundreds of dimensions).
    if key in ("parameters", "sample_shape", "shape"):
        return 0
    if isinstance(value, dict):
        return sum(_count_numbers(v, str(k)) for k, v in value.items())
    if isinstance(value, list):
        return sum(_count_numbers(v) for v in value)
    return int(isinstance(value, int | float) and not isinstance(value, bool))


def _describe_json(scan: _Scan, value: Any) -> None:
    base = posixpath.basename(scan.name)
    try:
        if base == posixpath.basename(contract.INFO):
            _describe_info(scan, contract.DatasetInfo.model_validate(value))
        elif base == posixpath.basename(contract.SPEC):
            spec = contract.ModelSpec.model_validate(value)
            count = sum(int(np.prod(s)) for s in spec.parameters.values())
            scan.visible.append(
                f"{scan.name}: model {spec.factory} {json.dumps(spec.kwargs, sort_keys=True)}, "
                f"{len(spec.parameters)} parameter tensors, {count} values, "
                f"sample shape {list(spec.sample_shape)}, {spec.num_classes} classes"
            )
    except ValidationError:
        scan.notes.append(f"{scan.name}: not in the format veiltrain writes")


def _describe_info(scan: _Scan, info: contract.DatasetInfo) -> None:
    share = "FFRecord shards of int64 words"
    if info.format == "keystream":
        seed = _seed_bytes(info.seed_share)
        share = "a 32-byte ChaCha20 seed (this party's own share)"
        if len(set(seed)) < 16:
            scan.flag(
                "non-uniform",
                f"the seed share's {len(seed)} bytes take only {len(set(seed))} distinct values: "
                "not from a CSPRNG (a random 32-byte seed has about 30)",
                _At(),
            )
    scan.visible.append(
        f"{scan.name}: {info.count} records of {info.record_words} words, sample shape "
        f"{list(info.sample_shape)}, {info.num_classes} classes; the share is {share}"
    )


def _seed_bytes(seed_share: dict[str, Any] | None) -> bytes:
    try:
        return bytes.fromhex(str((seed_share or {}).get("seed", "")))
    except ValueError:
        return b""


def _text(scan: _Scan, blob: _Blob, head: bytes, at: _At) -> bool:
    printable = sum(1 for b in head if 32 <= b < 127 or b in (9, 10, 13))
    if len(head) < 16 or printable < 0.95 * len(head):
        return False
    numbers = len(_NUMBER.findall(head))
    if numbers >= 16:
        scan.flag("data-like", f"plain text holding {numbers} numbers in its first bytes", at)
    return True


def _raw_sample(blob: _Cached) -> list[bytes]:
    """The head and a few random 8-aligned ranges past it."""
    chunks = [blob.head]
    room = blob.size - len(blob.head) - RANGE_BYTES
    for _ in range(RANGES if room > 0 else 0):
        start = len(blob.head) + secrets.randbelow(room // 8 + 1) * 8
        chunks.append(blob.read(start, start + RANGE_BYTES))
    return chunks


# ------------------------------------------------------------------------------ one store


@dataclass
class _Store:
    """The audit of one location: manifests and records, then every object."""

    loc: Location
    hashes: bool
    names: list[str]
    findings: list[Finding] = field(default_factory=list)
    visible: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    listed: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Object -> (the manifest or record that lists it, its size and sha256)."""
    vouching: set[str] = field(default_factory=set)
    precision: int = 16
    size_total: int = 0
    sampled: int = 0
    hashed: int = 0

    def flag(self, name: str, kind: Kind, reason: str) -> None:
        self.findings.append(Finding(object=name, kind=kind, reason=reason))

    def manifests(self) -> list[str]:
        """Read every manifest; returns the folders they cover ('' for the root)."""
        folders = []
        for name in self.names:
            if posixpath.basename(name) != contract.MANIFEST:
                continue
            folder = posixpath.dirname(name)
            folders.append(folder)
            self.vouching.add(name)
            self._manifest(name, folder)
        return folders

    def _manifest(self, name: str, folder: str) -> None:
        try:
            manifest = contract.read_manifest(self.loc.child(folder) if folder else self.loc)
        except IntegrityError as exc:
            self.flag(name, "manifest", f"unreadable manifest ({exc})")
            return
        self.precision = manifest.precision_bits
        self._expect(name, folder, manifest.table())
        total = sum(m.size for m in manifest.objects.values())
        self.visible.append(
            f"{name}: run {manifest.run_id}, party {manifest.party} of {manifest.parties}, "
            f"{manifest.precision_bits} fractional bits, {len(manifest.objects)} objects, "
            f"{total} bytes"
        )

    def _expect(self, source: str, folder: str, table: dict[str, dict[str, Any]]) -> None:
        present = set(self.names)
        for obj, meta in table.items():
            full = posixpath.join(folder, obj) if folder else obj
            if full in present:
                self.listed[full] = (source, meta)
            else:
                self.flag(full, "manifest", f"listed in {source} but missing from the store")

    def checkpoint_records(self) -> None:
        """Checkpoint files are listed by their epoch's record, not by the manifest."""
        epochs: dict[str, list[str]] = {}
        for name in self.names:
            if posixpath.basename(name) != _CHECKPOINT_RECORD:
                continue
            self.vouching.add(name)
            folder = posixpath.dirname(name)
            try:
                record = self.loc.read_json(name)
                table = _OBJECTS.validate_python(record.get("objects"))
            except (IntegrityError, ValidationError, AttributeError) as exc:
                self.flag(name, "manifest", f"malformed checkpoint record ({exc})")
                continue
            self._expect(name, folder, {k: v.model_dump() for k, v in table.items()})
            line = f"epoch {record.get('epoch')} (step {record.get('step')})"
            epochs.setdefault(posixpath.dirname(folder), []).append(line)
        for folder, lines in epochs.items():
            self.visible.append(f"{folder}/: {', '.join(lines)}")

    def unlisted(self, folders: list[str]) -> None:
        """Objects no manifest or checkpoint record lists."""
        loose = [n for n in self.names if n not in self.listed and n not in self.vouching]
        if not folders:
            if loose:
                self.flag(
                    contract.MANIFEST,
                    "manifest",
                    f"no {contract.MANIFEST} at this location: {len(loose)} objects are listed "
                    "nowhere (veiltrain's upload writes one at each party store's root)",
                )
            return
        for name in loose:
            self._loose(name, folders)

    def _loose(self, name: str, folders: list[str]) -> None:
        folder, base = posixpath.split(name)
        if (
            _CHECKPOINT_FOLDER.search(folder)
            and base in _CHECKPOINT_FILES
            and posixpath.join(folder, _CHECKPOINT_RECORD) not in self.vouching
        ):
            self.visible.append(f"{name}: an unfinished checkpoint (no record: interrupted)")
            return
        covering = [f for f in folders if not f or name.startswith(f + "/")]
        where = (
            posixpath.join(max(covering, key=len), contract.MANIFEST)
            if covering
            else "any manifest"
        )
        self.flag(name, "manifest", f"not listed in {where}: nothing vouches for it")

    def scan(self, name: str) -> None:
        """Owner-private names, the manifest's size and hash, then the content."""
        self._private(name)
        size = self.loc.size(name)
        self.size_total += size
        blob = _Cached(size, _ranged(self.loc, name))
        if name in self.listed:
            self._verify(name, size, blob)
        scan = _Scan(name, self.precision)
        try:
            if not _payload(scan, blob, _At()):
                _raw(scan, _raw_sample(blob), _At())
        except _Exhausted:
            scan.notes.append(f"{name}: content sampled up to the {SAMPLE_BYTES >> 20} MiB limit")
        self.sampled += blob.read_bytes
        self.findings.extend(scan.findings())
        self.visible.extend(scan.visible)
        self.notes.extend(scan.notes)

    def _private(self, name: str) -> None:
        parts = name.split("/")
        if any(name == p or name.endswith("/" + p) for p in _PRIVATE_NAMES) or any(
            p in _PRIVATE_FOLDERS for p in parts[:-1]
        ):
            self.flag(name, "owner-private", "an owner-private object (private/ or staging/)")

    def _verify(self, name: str, size: int, blob: _Cached) -> None:
        source, meta = self.listed[name]
        try:
            check_objects(self.loc, {name: meta}, deep=False)
        except IntegrityError:
            self.flag(name, "manifest", f"{size} bytes, {source} says {meta['size']}")
            return
        if not self.hashes:
            return
        whole = len(blob.head) == size
        digest = sha256_bytes(blob.head) if whole else self.loc.sha256(name)
        self.hashed += size
        if digest != meta["sha256"]:
            self.flag(name, "manifest", f"SHA-256 differs from {source}")


_OBJECTS: Final = TypeAdapter(dict[str, contract.ObjectMeta])


def audit(location: Location | str, role: str = "owner", hashes: bool = True) -> AuditResult:
    """Audit every object at a location (a party store, or a folder of several).

    `hashes=False` checks sizes only and reads no more than the content sample of each object.
    A location with no objects is a StoreError: a mistyped URL must not pass as clean.
    """
    loc = location if isinstance(location, Location) else Location(location, role=role)
    names = [n for n in loc.list() if n]
    if not names:
        raise StoreError(
            f"{loc.url} ({loc.role}): no objects to audit; check the URL (a party store is "
            "<store>/party-<i>/<run id> or <party store>/<run id>)"
        )
    store = _Store(loc, hashes, names)
    folders = store.manifests()
    store.checkpoint_records()
    store.unlisted(folders)
    for name in names:
        store.scan(name)
    return AuditResult(
        location=loc.url,
        role=loc.role,
        findings=store.findings,
        visible=store.visible,
        notes=store.notes,
        objects=len(names),
        bytes=store.size_total,
        bytes_sampled=store.sampled,
        bytes_hashed=store.hashed,
        hashed=hashes,
    )


def party_results(locations: Sequence[Location]) -> list[dict[str, Any]]:
    """For the run report: each party store's verdict; a store that cannot be read is not clean."""
    results: list[dict[str, Any]] = []
    for party, loc in enumerate(locations):
        try:
            found = audit(loc)
        except VeiltrainError as exc:
            results.append({"party": party, "clean": False, "findings": [], "error": str(exc)})
            continue
        findings = [f.model_dump() for f in found.findings]
        results.append({"party": party, "clean": found.clean, "findings": findings})
    return results


# ------------------------------------------------------------------------------ output


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def describe(result: AuditResult) -> list[str]:
    """The human report of one location: headline, findings, what is visible, notes."""
    verdict = "clean" if result.clean else f"{len(result.findings)} finding(s)"
    hashing = (
        f"{_mib(result.bytes_hashed)} hashed against manifests"
        if result.hashed
        else "sizes checked, hashes skipped (--no-hash)"
    )
    lines = [
        f"audit {result.location} (role {result.role}): {verdict}",
        f"  {result.objects} objects, {_mib(result.bytes)}; {hashing}; content sampled: "
        f"{_mib(result.bytes_sampled)} read, at most {_mib(result.sample_limit)} per object "
        f"(the first {HEAD_BYTES >> 20} MiB, {RANGES} random ranges or "
        f"{FIRST_RECORDS}+{RANDOM_RECORDS} records)",
    ]
    lines += [f"  FINDING {f.object}: [{f.kind}] {f.reason}" for f in result.findings]
    lines += [f"  visible by design: {v}" for v in result.visible]
    lines += [f"  note: {n}" for n in result.notes]
    return lines


def run(locations: Sequence[str], role: str, as_json: bool, hashes: bool) -> int:
    """The `veiltrain audit` command: 0 clean, 1 on a finding, 2 if a location cannot be read."""
    results: list[AuditResult] = []
    errors: list[dict[str, str]] = []
    for url in locations:
        try:
            results.append(audit(url, role=role, hashes=hashes))
        except VeiltrainError as exc:
            errors.append({"location": url, "error": str(exc)})
            print(f"veiltrain: error: {exc}", file=sys.stderr)
    clean = not errors and all(r.clean for r in results)
    if as_json:
        document = {"clean": clean, "locations": [r.to_json() for r in results], "errors": errors}
        print(json.dumps(document, indent=1))
    else:
        for result in results:
            print("\n".join(describe(result)))
    if errors:
        return 2
    return 0 if clean else 1
