"""Fixed-point encoding and additive secret sharing over Z/2^64 with ChaCha20 keystream masks."""

from __future__ import annotations

import math
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from veiltrain.errors import ConfigError, InsecureSetupError, IntegrityError

if TYPE_CHECKING:
    import torch

Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]

DEFAULT_PRECISION_BITS = 16
"""CrypTen's default number of fractional bits."""

MAX_ENCODED_BITS = 24
"""Every encoded value must satisfy |encoded| < 2^MAX_ENCODED_BITS.

Why 24: CrypTen multiplies two encoded values into e1 * e2 (scale 2^(2f)) and only then truncates
by 2^f, and a matmul or convolution sums many such products before truncating. With |e| < 2^24 a
single product stays below 2^48, leaving 15 bits (sums of 32768 worst-case terms) before the int64
sign bit at 2^63. With two parties CrypTen truncates each share locally, which fails with a
probability of about |v| / 2^63 per element, so keeping v <= 2^48 keeps that below 2^-15 even in
the worst case (and far lower for typical values). At 16 fractional bits this admits |x| < 256:
ample for standardised data and still enough for raw 8-bit pixel values (0..255).
"""
MAX_ENCODED_ABS = 1 << MAX_ENCODED_BITS

SEED_BYTES = 32
"""A seed is a ChaCha20 key: 256 bits from the operating system's CSPRNG."""
NONCE_BYTES = 12
"""The RFC 8439 nonce; the other 4 bytes of cryptography's 16-byte nonce are the block counter."""
DEFAULT_NONCE = bytes(NONCE_BYTES)
"""Every tensor and party gets a fresh seed, so one stream per key (nonce 0) never repeats a pad."""

_WORD_BYTES = 8
_BLOCK_BYTES = 64
_WORDS_PER_BLOCK = _BLOCK_BYTES // _WORD_BYTES
_MAX_BLOCKS = 1 << 32
MAX_STREAM_WORDS = _MAX_BLOCKS * _WORDS_PER_BLOCK
"""The 32-bit block counter bounds one (seed, nonce) stream to 2^35 words (256 GiB)."""

_CHUNK_WORDS = 1 << 17
"""Work in 1 MiB chunks: big enough to amortise Python calls, small enough to stay in cache."""
_ZEROS = bytes(_CHUNK_WORDS * _WORD_BYTES)
"""Encrypting zeros yields the raw keystream; one shared immutable buffer serves every call."""
_BIG_ENDIAN = sys.byteorder == "big"

_JSON_CIPHER = "chacha20-rfc8439/le-int64"
"""Stored with every SeedShare so a reader can refuse a stream layout it does not know."""


def new_seed() -> bytes:
    """Return a fresh 32-byte seed from the OS CSPRNG (never torch's or numpy's generators)."""
    return secrets.token_bytes(SEED_BYTES)


# --------------------------------------------------------------------------- torch helpers


def to_numpy(x: npt.ArrayLike | torch.Tensor) -> npt.NDArray[Any]:
    """Return x as a numpy array; torch tensors are detached and moved to the CPU first."""
    detach = getattr(x, "detach", None)
    if detach is not None:
        # A torch tensor: np.asarray would fail on requires_grad or on a GPU tensor.
        return np.asarray(detach().cpu().numpy())
    return np.asarray(x)


def to_torch(a: npt.NDArray[Any]) -> torch.Tensor:
    """Return a numpy array as a CPU torch tensor sharing its memory (int64 stays int64)."""
    import torch  # imported lazily: the core itself needs only numpy

    return torch.from_numpy(np.require(a, requirements="C"))


# --------------------------------------------------------------------------- encoding


def _check_precision(precision_bits: int) -> None:
    if isinstance(precision_bits, bool) or not isinstance(precision_bits, int):
        raise ConfigError(f"precision_bits must be an int, got {precision_bits!r}")
    if not 0 <= precision_bits < MAX_ENCODED_BITS:
        raise ConfigError(
            f"precision_bits={precision_bits} is outside 0..{MAX_ENCODED_BITS - 1}; "
            f"CrypTen's default is {DEFAULT_PRECISION_BITS}"
        )


def _as_float64(x: npt.ArrayLike | torch.Tensor) -> Float64Array:
    arr = to_numpy(x)
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"encode needs real numbers, got an array of dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.float64)


def _refuse_non_finite(scaled: Float64Array) -> None:
    n_nan = int(np.count_nonzero(np.isnan(scaled)))
    n_inf = int(np.count_nonzero(np.isinf(scaled)))
    raise ConfigError(
        f"encode: {n_nan} value(s) are NaN and {n_inf} are infinite out of {scaled.size}; "
        "clean or impute the input before sharing it"
    )


def _refuse_out_of_range(scaled: Float64Array, precision_bits: int) -> None:
    bad = np.abs(scaled) >= MAX_ENCODED_ABS - 0.5  # check_scaled's bound, rounded or not
    limit = math.ldexp(1.0, MAX_ENCODED_BITS - precision_bits)
    largest = math.ldexp(float(np.max(np.abs(scaled))), -precision_bits)
    raise ConfigError(
        f"encode: {int(np.count_nonzero(bad))} of {scaled.size} value(s) are outside the safe "
        f"fixed-point range |x| < {limit:g} (2^{MAX_ENCODED_BITS} / 2^{precision_bits}); "
        f"the largest magnitude is {largest:g}. Standardise the input "
        "(e.g. zero mean, unit variance) or lower precision_bits (each bit less doubles the range)"
    )


def encode(
    x: npt.ArrayLike | torch.Tensor, precision_bits: int = DEFAULT_PRECISION_BITS
) -> Int64Array:
    """Encode reals as int64 fixed point, round(x * 2^precision_bits), refusing unsafe values."""
    _check_precision(precision_bits)
    xf = _as_float64(x)
    # float64 scaling by a power of two is exact, so rounding is the only error (<= 2^-(f+1)).
    scaled = np.asarray(np.ldexp(xf, precision_bits))  # 0-d input: ldexp gives a scalar
    check_scaled(np.rint(scaled, out=scaled), precision_bits)
    return scaled.astype(np.int64)


def check_scaled(scaled: Float64Array, precision_bits: int) -> None:
    """Refuse scaled values (x * 2^precision_bits) that are not finite or not safely in range.

    Rounded or not: v rounds to a word of magnitude MAX_ENCODED_ABS or more exactly when |v| >=
    MAX_ENCODED_ABS - 1/2 (round half to even, and MAX_ENCODED_ABS is even), so the owner's
    record encoder checks before it rounds and `encode` after, with the same outcome.
    """
    if scaled.size == 0:
        return
    lo, hi = float(scaled.min()), float(scaled.max())  # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _refuse_non_finite(scaled)
    if hi >= MAX_ENCODED_ABS - 0.5 or -lo >= MAX_ENCODED_ABS - 0.5:
        _refuse_out_of_range(scaled, precision_bits)


def decode(
    e: npt.ArrayLike | torch.Tensor, precision_bits: int = DEFAULT_PRECISION_BITS
) -> Float64Array:
    """Decode int64 fixed point back to float64: e / 2^precision_bits."""
    _check_precision(precision_bits)
    arr = _as_int64(e, "decode")
    return np.ldexp(arr.astype(np.float64), -precision_bits)


def _as_int64(x: npt.ArrayLike | torch.Tensor, what: str) -> Int64Array:
    arr = to_numpy(x)
    if arr.dtype != np.int64:
        raise ConfigError(f"{what} needs an int64 array (encoded values), got dtype {arr.dtype}")
    return np.require(arr, requirements="C")  # keeps 0-d shapes, unlike ascontiguousarray


# --------------------------------------------------------------------------- keystream


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ConfigError(f"a seed must be {SEED_BYTES} bytes (use new_seed())")


def _check_nonce(nonce: bytes) -> None:
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ConfigError(f"a nonce must be {NONCE_BYTES} bytes, got {nonce!r}")


def _check_span(offset_words: int, count: int) -> None:
    for name, value in (("offset_words", offset_words), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a non-negative int, got {value!r}")
    if offset_words + count > MAX_STREAM_WORDS:
        raise ConfigError(
            f"mask stream span [{offset_words}, {offset_words + count}) passes its end at "
            f"{MAX_STREAM_WORDS} words (2^32 ChaCha20 blocks); use a fresh seed per tensor"
        )


class MaskStream:
    """A random-access ChaCha20 keystream read as little-endian int64 mask words.

    ChaCha20 rather than AES-CTR: the 32-byte seed is the key as it is, it is constant time
    without AES hardware, and RFC 8439 puts the block counter in the nonce, so seeking to any
    64-byte block is just a different starting counter. Both run at several GB/s here.
    """

    __slots__ = ("_nonce", "_seed")

    def __init__(self, seed: bytes, nonce: bytes = DEFAULT_NONCE) -> None:
        _check_seed(seed)
        _check_nonce(nonce)
        self._seed = seed
        self._nonce = nonce

    def __repr__(self) -> str:
        return "MaskStream(<seed hidden>)"  # never print a seed into a log

    def fill(self, out: Int64Array, offset_words: int = 0) -> None:
        """Write the mask words starting at offset_words into the C-contiguous int64 array out."""
        if out.dtype != np.int64 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ConfigError("MaskStream.fill needs a writeable C-contiguous int64 array")
        _check_span(offset_words, out.size)
        if out.size == 0:
            return
        enc = _encryptor(self._seed, self._nonce, offset_words)
        flat = out.reshape(-1)
        for start in range(0, flat.size, _CHUNK_WORDS):
            _fill_chunk(enc, flat[start : start + _CHUNK_WORDS])

    def words(self, offset_words: int, count: int) -> Int64Array:
        """Return count mask words starting at word offset_words (random access, deterministic)."""
        _check_span(offset_words, count)
        out = np.empty(count, dtype=np.int64)
        self.fill(out, offset_words)
        return out


def _encryptor(seed: bytes, nonce: bytes, offset_words: int) -> Any:
    """A ChaCha20 encryptor positioned at word offset_words of the (seed, nonce) stream."""
    block, skip_words = divmod(offset_words, _WORDS_PER_BLOCK)
    counter = block.to_bytes(4, "little")
    enc = Cipher(algorithms.ChaCha20(seed, counter + nonce), mode=None).encryptor()
    if skip_words:
        enc.update(bytes(skip_words * _WORD_BYTES))  # drop the head of the first block
    return enc


def _fill_chunk(enc: Any, chunk: Int64Array) -> None:
    """Encrypt zeros straight into chunk's memory: the keystream lands with no extra copy."""
    n_bytes = chunk.size * _WORD_BYTES
    enc.update_into(_ZEROS[:n_bytes], chunk.data.cast("B"))
    if _BIG_ENDIAN:
        chunk.byteswap(inplace=True)  # the words are defined little-endian on every host


# --------------------------------------------------------------------------- seed shares


@dataclass(frozen=True)
class SeedShare:
    """A seed-compressed share: the party expands its mask from (seed, nonce) at offset_words."""

    seed: bytes = field(repr=False)
    offset_words: int = 0
    nonce: bytes = DEFAULT_NONCE

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        _check_nonce(self.nonce)
        _check_span(self.offset_words, 0)

    def stream(self) -> MaskStream:
        """Return this share's keystream."""
        return MaskStream(self.seed, self.nonce)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (bytes as hex). It holds the secret seed: store it as such."""
        return {
            "cipher": _JSON_CIPHER,
            "seed": self.seed.hex(),
            "nonce": self.nonce.hex(),
            "offset_words": self.offset_words,
        }

    @classmethod
    def from_json(cls, data: object) -> SeedShare:
        """Rebuild a SeedShare from to_json's dict; malformed stored data raises IntegrityError."""
        if not isinstance(data, dict):
            raise IntegrityError(
                f"a stored seed share must be a JSON object, got {type(data).__name__}"
            )
        if data.get("cipher") != _JSON_CIPHER:
            raise IntegrityError(
                f"stored seed share has cipher {data.get('cipher')!r}, expected {_JSON_CIPHER!r}"
            )
        try:
            seed = bytes.fromhex(data["seed"])
            nonce = bytes.fromhex(data["nonce"])
            offset = data["offset_words"]
            if isinstance(offset, bool) or not isinstance(offset, int):
                raise TypeError("offset_words is not an int")
            return cls(seed=seed, offset_words=offset, nonce=nonce)
        except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
            raise IntegrityError(f"stored seed share is malformed: {exc}") from exc


def expand(seed_share: SeedShare, shape: int | Sequence[int], offset_words: int = 0) -> Int64Array:
    """Expand a seed share into its mask of the given shape (or count).

    offset_words is added to the share's own offset, so record j of r words is
    expand(s, r, offset_words=j * r): random access without expanding records 0..j-1.
    """
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise ConfigError(f"shape must be non-negative ints, got {shape!r}")
    out = np.empty(dims, dtype=np.int64)
    seed_share.stream().fill(out, seed_share.offset_words + offset_words)
    return out


# --------------------------------------------------------------------------- splitting


def _party_seeds(n_parties: int, seeds: Sequence[bytes] | None) -> list[bytes]:
    if isinstance(n_parties, bool) or not isinstance(n_parties, int):
        raise ConfigError(f"n_parties must be an int, got {n_parties!r}")
    if n_parties < 2:
        raise InsecureSetupError(
            f"n_parties={n_parties}: a single share IS the data (times 2^f); "
            "use at least 2 non-colluding parties"
        )
    if seeds is None:
        return [new_seed() for _ in range(n_parties - 1)]  # fresh per party and per call
    seeds = list(seeds)
    if len(seeds) != n_parties - 1:
        raise ConfigError(f"need {n_parties - 1} seeds (one per party 1..n-1), got {len(seeds)}")
    for seed in seeds:
        _check_seed(seed)
    if len(set(seeds)) != len(seeds):
        raise InsecureSetupError("two parties were given the same seed: every party needs its own")
    return seeds


def _mask_party0(
    flat: Int64Array,
    share0: Int64Array,
    encs: Sequence[Any],
    masks: Sequence[Int64Array],
    copy: bool = True,
) -> None:
    """share0 = flat - sum(masks) chunk by chunk, writing each mask chunk into masks[i].

    With copy=False share0 is flat itself, masked where it lies."""
    for start in range(0, flat.size, _CHUNK_WORDS):
        stop = min(start + _CHUNK_WORDS, flat.size)
        out = share0[start:stop]
        if copy:
            np.copyto(out, flat[start:stop])
        for enc, mask in zip(encs, masks, strict=True):
            # A mask that is a full share is filled in place; a scratch buffer is reused per chunk.
            chunk = mask[start:stop] if mask.size == flat.size else mask[: stop - start]
            _fill_chunk(enc, chunk)
            np.subtract(out, chunk, out=out)  # int64 arrays wrap mod 2^64 silently


def _split_into(
    encoded: npt.ArrayLike | torch.Tensor,
    n_parties: int,
    seeds: Sequence[bytes] | None,
    full: bool,
) -> tuple[Int64Array, list[SeedShare], list[Int64Array]]:
    seed_list = _party_seeds(n_parties, seeds)
    arr = _as_int64(encoded, "split")
    flat = arr.reshape(-1)
    if flat.size > MAX_STREAM_WORDS:
        raise ConfigError(
            f"{flat.size} words exceed one mask stream ({MAX_STREAM_WORDS}); split it up"
        )
    share0 = np.empty_like(arr)
    shares = [SeedShare(seed) for seed in seed_list]
    encs = [_encryptor(s.seed, s.nonce, s.offset_words) for s in shares]
    scratch = min(flat.size, _CHUNK_WORDS)
    masks = [np.empty(flat.size if full else scratch, dtype=np.int64) for _ in shares]
    _mask_party0(flat, share0.reshape(-1), encs, masks)
    full_masks = [m.reshape(arr.shape) for m in masks] if full else []
    return share0, shares, full_masks


def split(
    encoded: npt.ArrayLike | torch.Tensor, n_parties: int, seeds: Sequence[bytes] | None = None
) -> tuple[Int64Array, list[SeedShare]]:
    """Split encoded values into party 0's full share and seed shares for parties 1..n-1."""
    share0, seed_shares, _ = _split_into(encoded, n_parties, seeds, full=False)
    return share0, seed_shares


def split_full(
    encoded: npt.ArrayLike | torch.Tensor, n_parties: int, seeds: Sequence[bytes] | None = None
) -> list[Int64Array]:
    """Split encoded values into every party's full int64 share (party 0 first)."""
    share0, _, masks = _split_into(encoded, n_parties, seeds, full=True)
    return [share0, *masks]


class StreamSplitter:
    """Splits one long encoded stream chunk by chunk, as `split` would split it whole.

    Parties 1..n-1 get one seed share each for the whole stream; `share0` returns party 0's
    share of the next chunk, so the owner holds one chunk at a time, never the data set.
    """

    def __init__(self, n_parties: int, seeds: Sequence[bytes] | None = None) -> None:
        self.seed_shares = [SeedShare(seed) for seed in _party_seeds(n_parties, seeds)]
        self._encs = [_encryptor(s.seed, s.nonce, s.offset_words) for s in self.seed_shares]
        self._scratch = [np.empty(_CHUNK_WORDS, dtype=np.int64) for _ in self.seed_shares]
        self.words = 0

    def __repr__(self) -> str:
        return f"StreamSplitter(<{len(self.seed_shares)} seeds hidden>, words={self.words})"

    def share0(self, encoded: npt.ArrayLike | torch.Tensor, in_place: bool = False) -> Int64Array:
        """Party 0's share of the next chunk (any shape; the stream continues where it was).

        `in_place` masks a writeable contiguous int64 `encoded` where it lies: the caller's array
        becomes the share (anything else is copied first, as without it).
        """
        arr = _as_int64(encoded, "split")
        if self.words + arr.size > MAX_STREAM_WORDS:
            raise ConfigError(
                f"{self.words + arr.size} words exceed one mask stream ({MAX_STREAM_WORDS})"
            )
        in_place = in_place and arr.flags.c_contiguous and arr.flags.writeable
        share0 = arr if in_place else np.empty_like(arr)
        flat = arr.reshape(-1)
        _mask_party0(flat, share0.reshape(-1), self._encs, self._scratch, copy=not in_place)
        self.words += arr.size
        return share0


def reconstruct(shares: Sequence[npt.ArrayLike | torch.Tensor]) -> Int64Array:
    """Sum the shares mod 2^64 and return the encoded int64 values."""
    if len(shares) == 0:
        raise ConfigError("reconstruct needs at least one share")
    arrays = [_as_int64(s, "reconstruct") for s in shares]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ConfigError(f"shares differ in shape: {[a.shape for a in arrays]}")
    total = arrays[0].copy()
    for a in arrays[1:]:
        np.add(total, a, out=total)  # wraps mod 2^64
    return total
