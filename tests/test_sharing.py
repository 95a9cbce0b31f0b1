"""Properties of fixed-point encoding, additive sharing and the ChaCha20 mask stream."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from veiltrain import sharing
from veiltrain.errors import ConfigError, InsecureSetupError, IntegrityError
from veiltrain.sharing import (
    MAX_ENCODED_BITS,
    MAX_STREAM_WORDS,
    MaskStream,
    SeedShare,
    decode,
    encode,
    expand,
    new_seed,
    reconstruct,
    split,
    split_full,
)

PROPS = settings(max_examples=60, deadline=None)
seeds_st = st.binary(min_size=32, max_size=32)
shapes_st = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)


def fixed_seed(label: str) -> bytes:
    """A deterministic seed, so the statistical tests below never flake."""
    return hashlib.sha256(label.encode()).digest()


def fixed_seeds(label: str, n: int) -> list[bytes]:
    return [fixed_seed(f"{label}/{i}") for i in range(n)]


@st.composite
def real_arrays(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(st.sampled_from([0, 8, 12, 16, 20]))
    limit = 2.0 ** (MAX_ENCODED_BITS - bits) - 1.0
    elements = st.floats(-limit, limit, allow_nan=False, allow_infinity=False)
    x = draw(hnp.arrays(np.float64, shapes_st, elements=elements))
    return x, bits


# ----------------------------------------------------------------------------- reconstruction


@PROPS
@given(real_arrays(), st.integers(2, 5))
def test_reconstruction_is_exact(data: tuple[np.ndarray, int], n: int) -> None:
    x, bits = data
    e = encode(x, bits)
    shares = split_full(e, n)
    assert len(shares) == n
    assert all(s.shape == x.shape and s.dtype == np.int64 for s in shares)
    back = reconstruct(shares)
    assert np.array_equal(back, e)
    # Rounding to nearest: the only error is at most half a fixed-point step.
    assert np.all(np.abs(decode(back, bits) - x) <= 2.0 ** -(bits + 1))


@PROPS
@given(real_arrays(), st.integers(2, 5), st.data())
def test_split_full_and_seed_compressed_agree(
    data: tuple[np.ndarray, int], n: int, more: st.DataObject
) -> None:
    x, bits = data
    e = encode(x, bits)
    seeds = more.draw(st.lists(seeds_st, min_size=n - 1, max_size=n - 1, unique=True))
    share0, seed_shares = split(e, n, seeds=seeds)
    full = split_full(e, n, seeds=seeds)
    assert np.array_equal(share0, full[0])
    assert [s.seed for s in seed_shares] == seeds
    expanded = [expand(s, e.shape) for s in seed_shares]
    for got, want in zip(expanded, full[1:], strict=True):
        assert np.array_equal(got, want)
    assert np.array_equal(reconstruct([share0, *expanded]), e)


def test_split_crosses_chunk_boundaries() -> None:
    # More than one internal chunk, with a ragged tail, for both forms.
    e = encode(np.linspace(-100, 100, 5 * 60001).reshape(-1, 5))
    share0, seed_shares = split(e, 3)
    assert np.array_equal(reconstruct([share0, *(expand(s, e.shape) for s in seed_shares)]), e)
    assert np.array_equal(reconstruct(split_full(e, 3)), e)


@PROPS
@given(real_arrays(), st.integers(2, 4), st.data())
def test_a_stream_split_in_chunks_equals_one_split(
    data: tuple[np.ndarray, int], n: int, more: st.DataObject
) -> None:
    x, bits = data
    e = encode(x, bits).reshape(-1)
    seeds = more.draw(st.lists(seeds_st, min_size=n - 1, max_size=n - 1, unique=True))
    cuts = sorted(more.draw(st.lists(st.integers(0, e.size), max_size=4)))
    splitter = sharing.StreamSplitter(n, seeds)
    in_place = more.draw(st.booleans())
    spans = zip([0, *cuts], [*cuts, e.size], strict=True)
    pieces = [splitter.share0(e[a:b].copy(), in_place=in_place) for a, b in spans]
    share0, seed_shares = split(e, n, seeds=seeds)
    assert np.array_equal(np.concatenate(pieces), share0)
    assert splitter.seed_shares == seed_shares and splitter.words == e.size
    assert "seed" not in repr(splitter).replace("seeds hidden", "")


def test_a_stream_split_crosses_chunk_boundaries() -> None:
    e = encode(np.linspace(-100, 100, 3 * 200_001)).reshape(3, -1)
    splitter = sharing.StreamSplitter(2)
    share0 = np.concatenate([splitter.share0(row) for row in e])
    mask = expand(splitter.seed_shares[0], (e.size,))
    assert np.array_equal(reconstruct([share0, mask]), e.reshape(-1))


def test_an_in_place_share_masks_the_callers_array() -> None:
    e = encode(np.linspace(-5, 5, 300_000))
    chunk = e.copy()
    share0 = sharing.StreamSplitter(2, [b"k" * 32]).share0(chunk, in_place=True)
    assert share0 is chunk and not np.array_equal(chunk, e)
    assert np.array_equal(share0, sharing.StreamSplitter(2, [b"k" * 32]).share0(e))
    readonly = e.copy()
    readonly.flags.writeable = False  # refused quietly: a copy is masked instead
    masked = sharing.StreamSplitter(2, [b"k" * 32]).share0(readonly, in_place=True)
    assert np.array_equal(masked, share0) and np.array_equal(readonly, e)


def test_torch_tensors_in_and_out() -> None:
    t = torch.linspace(-3, 3, 50, requires_grad=True)
    e = encode(t)
    back = sharing.to_torch(reconstruct([sharing.to_torch(s) for s in split_full(e, 2)]))
    assert back.dtype == torch.int64
    assert torch.allclose(back.double() / 2**16, t.detach().double(), atol=2**-17)


# ----------------------------------------------------------------------------- the keystream


def test_keystream_matches_rfc8439_test_vector() -> None:
    # RFC 8439 section 2.3.2: key 00..1f, nonce 000000090000004a00000000, block counter 1.
    stream = MaskStream(bytes(range(32)), bytes.fromhex("000000090000004a00000000"))
    words = stream.words(8, 8)  # counter 1 = words 8..15
    assert words.astype("<i8").tobytes().hex() == (
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    )


@PROPS
@given(seeds_st, st.integers(0, 5000), st.integers(0, 700))
def test_random_access_equals_slicing(seed: bytes, offset: int, count: int) -> None:
    stream = MaskStream(seed)
    whole = stream.words(0, offset + count)
    assert np.array_equal(stream.words(offset, count), whole[offset:])
    assert np.array_equal(MaskStream(seed).words(offset, count), whole[offset:])  # deterministic


@PROPS
@given(seeds_st, st.integers(1, 40), st.integers(1, 30), st.integers(0, 99), st.data())
def test_expand_by_record_index(
    seed: bytes, n_records: int, record_words: int, base: int, more: st.DataObject
) -> None:
    share = SeedShare(seed, offset_words=base)
    everything = expand(share, (n_records, record_words))
    j = more.draw(st.integers(0, n_records - 1))
    assert np.array_equal(expand(share, record_words, offset_words=j * record_words), everything[j])
    assert np.array_equal(everything.reshape(-1), MaskStream(seed).words(base, everything.size))


def test_nonce_selects_a_different_stream() -> None:
    seed = fixed_seed("nonce")
    a = MaskStream(seed).words(0, 64)
    b = MaskStream(seed, (1).to_bytes(12, "little")).words(0, 64)
    assert not np.array_equal(a, b)


def test_stream_end_is_guarded() -> None:
    stream = MaskStream(fixed_seed("end"))
    assert stream.words(MAX_STREAM_WORDS - 4, 4).shape == (4,)
    with pytest.raises(ConfigError, match="passes its end"):
        stream.words(MAX_STREAM_WORDS - 4, 5)
    with pytest.raises(ConfigError):
        stream.words(-1, 3)
    with pytest.raises(ConfigError):
        MaskStream(b"short")


# ----------------------------------------------------------------------------- statistics


def byte_chi_square_p(share: np.ndarray) -> float:
    counts = np.bincount(share.astype("<i8").view(np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


STRUCTURED = {
    "constant": np.full(16384, 7.25),
    "zeros": np.zeros(16384),
    "ramp": np.linspace(-100, 100, 16384),
    "pattern": np.tile([0.0, 1.0, -1.0, 255.0], 4096),
}


@pytest.mark.parametrize("name", sorted(STRUCTURED))
@pytest.mark.parametrize("n", [2, 3])
def test_every_single_share_passes_chi_square(name: str, n: int) -> None:
    e = encode(STRUCTURED[name])  # 16384 words = 128 KiB of share per party
    assert byte_chi_square_p(e) < 1e-100  # the test has power: the data itself fails it
    for share in split_full(e, n, seeds=fixed_seeds(f"chi/{name}/{n}", n - 1)):
        assert byte_chi_square_p(share) > 1e-4


@pytest.mark.parametrize("name", ["ramp", "pattern"])
def test_share_is_uncorrelated_with_data(name: str) -> None:
    x = STRUCTURED[name]
    for share in split_full(encode(x), 2, seeds=fixed_seeds(f"corr/{name}", 1)):
        # 16384 samples: |r| has a standard deviation of about 0.008, so 0.05 is ~6 sigma.
        assert abs(stats.pearsonr(share.astype(np.float64), x).statistic) < 0.05
        # Read naively as fixed point, a share is nowhere near the data.
        assert np.mean(np.abs(decode(share) - x) < 1.0) < 1e-3
        assert float(np.median(np.abs(decode(share)))) > 2.0**30


# ----------------------------------------------------------------------------- seeds


def test_new_seed_never_repeats() -> None:
    seeds = [new_seed() for _ in range(20000)]
    assert all(len(s) == 32 for s in seeds)
    assert len(set(seeds)) == len(seeds)


def test_split_uses_fresh_seeds_per_party_and_call() -> None:
    e = encode(np.ones(100))
    seen: list[bytes] = []
    firsts = set()
    for _ in range(50):
        share0, seed_shares = split(e, 4)
        seen += [s.seed for s in seed_shares]
        firsts.add(share0.tobytes())
    assert len(seen) == 150
    assert len(set(seen)) == 150
    assert len(firsts) == 50


def test_generator_is_not_torch_or_numpy_or_random() -> None:
    e = encode(np.arange(64, dtype=np.float64))
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)  # the legacy global generator, on purpose
        random.seed(0)
        outputs.append(split_full(e, 2)[1])
    assert not np.array_equal(outputs[0], outputs[1])


# ----------------------------------------------------------------------------- refusals


def test_out_of_range_refused_with_count_and_magnitude() -> None:
    x = np.array([0.0, 300.0, -1000.5, 1.0, 255.99])
    with pytest.raises(ConfigError) as info:
        encode(x)
    message = str(info.value)
    assert "2 of 5" in message
    assert "1000.5" in message
    assert "precision_bits" in message
    assert "Standardise" in message
    # Fewer fractional bits buy range: the same values fit at 12 bits (|x| < 4096).
    assert np.array_equal(decode(encode(x, 12), 12), np.round(x * 4096) / 4096)


def test_range_boundary() -> None:
    limit = 2.0 ** (MAX_ENCODED_BITS - 16)
    encode(np.array([limit - 2.0**-16, -(limit - 2.0**-16)]))
    with pytest.raises(ConfigError, match="1 of 1"):
        encode(np.array([limit]))
    with pytest.raises(ConfigError, match="1 of 1"):
        encode(np.array([-limit]))


def test_nan_and_inf_refused() -> None:
    with pytest.raises(ConfigError, match=r"2 value\(s\) are NaN and 1 are infinite"):
        encode(np.array([np.nan, 1.0, np.inf, np.nan]))
    with pytest.raises(ConfigError, match="NaN"):
        encode(torch.tensor([float("nan")]))


def test_bad_inputs_refused() -> None:
    with pytest.raises(ConfigError):
        encode(np.array(["a"]))
    with pytest.raises(ConfigError):
        encode(np.ones(3), precision_bits=MAX_ENCODED_BITS)
    with pytest.raises(ConfigError):
        decode(np.ones(3))
    with pytest.raises(ConfigError):
        split(np.ones(3), 2)  # floats, not encoded int64
    with pytest.raises(ConfigError):
        reconstruct([np.zeros(3, np.int64), np.zeros(4, np.int64)])


@pytest.mark.parametrize("n", [1, 0, -2])
def test_fewer_than_two_parties_is_insecure(n: int) -> None:
    e = encode(np.ones(4))
    with pytest.raises(InsecureSetupError):
        split(e, n)
    with pytest.raises(InsecureSetupError):
        split_full(e, n)


def test_seed_list_checked() -> None:
    e = encode(np.ones(4))
    seed = fixed_seed("dup")
    with pytest.raises(InsecureSetupError):
        split(e, 3, seeds=[seed, seed])
    with pytest.raises(ConfigError, match="need 2 seeds"):
        split(e, 3, seeds=[seed])
    with pytest.raises(ConfigError):
        split(e, 2, seeds=[b"too short"])


# ----------------------------------------------------------------------------- SeedShare


@PROPS
@given(seeds_st, st.integers(0, MAX_STREAM_WORDS), st.binary(min_size=12, max_size=12))
def test_seed_share_json_round_trip(seed: bytes, offset: int, nonce: bytes) -> None:
    share = SeedShare(seed, offset_words=offset, nonce=nonce)
    stored = json.loads(json.dumps(share.to_json()))
    assert SeedShare.from_json(stored) == share
    assert seed.hex() not in repr(share)  # a seed never lands in a log via repr


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("seed"),
        lambda d: d.update(seed="zz"),
        lambda d: d.update(seed="00" * 31),
        lambda d: d.update(nonce="00"),
        lambda d: d.update(offset_words=-1),
        lambda d: d.update(offset_words="3"),
        lambda d: d.update(offset_words=True),
        lambda d: d.update(cipher="aes"),
    ],
)
def test_bad_stored_seed_share_is_an_integrity_error(mutate: object) -> None:
    data = SeedShare(fixed_seed("json")).to_json()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(IntegrityError):
        SeedShare.from_json(data)
    with pytest.raises(IntegrityError):
        SeedShare.from_json([1, 2])
