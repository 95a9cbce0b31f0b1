"""veiltrain.signbits: the carry tree on plain words, then the comparison between real parties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from test_mpc import MISSING_PARTY_TIMEOUT_S, PARTY_TIMEOUT_S, PRECISION_BITS, _report, _run
from veiltrain import sharing, signbits

# Pairs of addends whose carries run the whole word, or stop just short of the sign bit.
EDGE_PAIRS = [
    (2**63 - 1, 1),
    (-1, 1),
    (1, -1),
    (0, 0),
    (-(2**63), -(2**63)),
    (2**62, 2**62),
    (-(2**62), -(2**62)),
    (2**62 - 1, 2**62),
    (5, -6),
    (-5, 4),
    (0x5555555555555555, 0x2AAAAAAAAAAAAAAB),
    (-0x5555555555555555, 0x2AAAAAAAAAAAAAAA),
]


def _words(count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, generator=gen)


@pytest.mark.parametrize("count", [1, 63, 64, 65, 1000])
def test_planes_pack_each_bit_and_unpack_back(count: int) -> None:
    words = _words(count, seed=count)
    planes = signbits.to_planes(words)
    assert planes.shape == (64, -(-count // 64))
    for bit in range(64):
        assert torch.equal(signbits.from_plane(planes[bit], count), (words >> bit) & 1), bit


def test_the_carry_tree_gives_the_sign_of_the_sum() -> None:
    first, second = _words(2000, seed=1), _words(2000, seed=2)
    edges = torch.tensor(EDGE_PAIRS, dtype=torch.int64)
    first, second = torch.cat([edges[:, 0], first]), torch.cat([edges[:, 1], second])
    a, b = signbits.to_planes(first), signbits.to_planes(second)
    rows: list[int] = []

    def plain_and(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        rows.append(right.shape[0])
        return signbits.spread(left) & right

    carry = signbits.carry_into_top(a[:63] & b[:63], a[:63] ^ b[:63], plain_and)
    sign = signbits.from_plane(a[63] ^ b[63] ^ carry, first.numel())
    assert torch.equal(sign, ((first + second) < 0).long())  # int64 addition wraps mod 2^64
    assert rows == signbits.triple_rows()[1:]  # the gates each level spends, as budgeted


def test_the_tree_spends_about_a_fifth_of_a_full_adders_gates() -> None:
    # CrypTen's adder: one AND of 64 bits, then 6 rounds of two 64-bit ANDs per value.
    assert sum(signbits.triple_rows()) == 181
    assert len(signbits.triple_rows()) == 7
    assert sum(signbits.triple_rows()) < (64 + 6 * 128) / 4


def test_each_gate_finds_its_left_mask_where_the_dealer_put_it() -> None:
    # The parties spread each level's left masks over its gates (signbits.spread); the dealer
    # builds the whole tree's triples through spread_index. Both must pick the same mask row.
    left = torch.arange(signbits.left_rows())
    levels, start = [], 0
    for rows in signbits.triple_rows()[1:]:
        pairs = (rows + 1) // 2
        spread = signbits.spread(left[start : start + pairs])
        assert spread.shape[0] == rows
        levels.append(spread)
        start += pairs
    assert start == signbits.left_rows()
    assert torch.equal(torch.cat(levels), left[signbits.spread_index()])


def test_each_propagate_pair_is_opened_once_for_its_two_gates() -> None:
    # Opened planes of the tree: a left operand a pair and a right operand a gate, against two
    # operands a gate when every gate had its own triple.
    assert signbits.tree_rows() == 118
    assert signbits.left_rows() == 62
    assert signbits.left_rows() + signbits.tree_rows() == 180 < 2 * signbits.tree_rows()


def _edge_shares(encoded: np.ndarray) -> list[np.ndarray]:
    """Two-party shares whose party-1 share takes each edge value in turn."""
    edges = np.array([b for _, b in EDGE_PAIRS], dtype=np.int64)
    second = np.resize(edges, encoded.shape)
    with np.errstate(over="ignore"):
        return [encoded - second, second]


@pytest.mark.slow
def test_parties_compute_signs_and_relu_as_crypten_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate(
        [
            [0.0, 2.0**-16, -(2.0**-16), 1.0, -1.0, 2.0**30, -(2.0**30)],
            rng.normal(0.0, 50.0, size=993),
        ]
    ).reshape(10, 4, 25)  # 1000 values: not a multiple of 64, three dimensions
    encoded = np.rint(values * 2.0**PRECISION_BITS).astype(np.int64)
    random_half = sharing.split_full(encoded[:5], 2)
    edge_half = _edge_shares(encoded[5:])
    for rank in range(2):
        share = np.concatenate([random_half[rank], edge_half[rank]])
        np.savez(tmp_path / f"in_{rank}.npz", a=share)
    finished, _ = _run([0, 1, 2], 2, tmp_path, PARTY_TIMEOUT_S, 120, mode="signs")
    assert all(f.returncode == 0 for f in finished), _report(finished)
    outputs = [np.load(tmp_path / f"out_{rank}.npz") for rank in range(2)]
    ltz, stock = (sharing.reconstruct([o[key] for o in outputs]) for key in ("ltz", "stock_ltz"))
    np.testing.assert_array_equal(ltz, (values < 0).astype(np.int64))
    np.testing.assert_array_equal(stock, ltz)
    relu = sharing.decode(sharing.reconstruct([o["relu"] for o in outputs]), PRECISION_BITS)
    np.testing.assert_allclose(relu, np.maximum(values, 0.0), atol=2.0**-15)
    assert not np.array_equal(outputs[0]["ltz"], ltz)  # a party's share is not the bit itself


@pytest.mark.slow
def test_relu_by_dealt_select_is_crypten_exactly_and_opens_only_uniform_words(
    tmp_path: Path,
) -> None:
    """Forward and gradient equal CrypTen's ReLU word for word once decrypted; and the attack: a
    party gets e = [x > 0] ^ r and masked words only. With every x positive (all bits 1), e is
    still half ones, and no opened word is x, g, or their share."""
    rng = np.random.default_rng(8)
    values = np.abs(rng.normal(0.0, 10.0, size=(6, 250))) + 2.0**-16  # all positive: bits all 1
    values[0, :7] = [2.0**-16, 1.0, 2.0**30, 3.5, 2.0**-15, 7.25, 100.0]
    values[1] = -values[1]  # and a row of negatives
    grads = rng.normal(0.0, 1.0, size=values.shape)
    plain = [np.rint(v * 2.0**PRECISION_BITS).astype(np.int64) for v in (values, grads)]
    shares = [sharing.split_full(v, 2) for v in plain]
    for rank in range(2):
        np.savez(tmp_path / f"in_{rank}.npz", a=shares[0][rank], g=shares[1][rank])
    finished, _ = _run([0, 1, 2], 2, tmp_path, PARTY_TIMEOUT_S, 120, mode="relu")
    assert all(f.returncode == 0 for f in finished), _report(finished)
    outputs = [np.load(tmp_path / f"out_{rank}.npz") for rank in range(2)]
    got = {k: sharing.reconstruct([o[k] for o in outputs]) for k in ("out", "grad")}
    stock = {k: sharing.reconstruct([o[f"stock_{k}"] for o in outputs]) for k in ("out", "grad")}
    np.testing.assert_array_equal(got["out"], stock["out"])
    np.testing.assert_array_equal(got["grad"], stock["grad"])
    np.testing.assert_array_equal(got["out"], np.where(values > 0, plain[0], 0))
    np.testing.assert_array_equal(got["grad"], np.where(values > 0, plain[1], 0))
    bits = np.unpackbits(outputs[0]["bits"].view(np.uint8))[: values.size]
    assert abs(bits.mean() - 0.5) < 0.05  # 5 of 6 rows are 1s: unmasked, this would be 0.83
    masked = outputs[0]["masked"]
    for secret in (plain[0], plain[1], shares[0][1], shares[1][1]):
        assert not np.isin(secret.reshape(-1), masked).any()


@pytest.mark.slow
def test_a_party_waiting_in_an_opening_times_out_by_name(tmp_path: Path) -> None:
    encoded = np.arange(-50, 50, dtype=np.int64) << PRECISION_BITS
    for rank, share in enumerate(sharing.split_full(encoded, 2)):
        np.savez(tmp_path / f"in_{rank}.npz", a=share)
    finished, elapsed = _run(
        [0, 1, 2], 2, tmp_path, MISSING_PARTY_TIMEOUT_S, 90, mode="signs-stalled"
    )
    assert finished[0].returncode == 3, _report(finished)
    assert "PartyError: party 0: the multi-party computation failed or timed out" in (
        finished[0].stderr
    ), _report(finished)
    assert "Traceback" not in finished[0].stderr
    assert elapsed < 60
