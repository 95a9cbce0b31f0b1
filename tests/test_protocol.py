"""veiltrain.protocol in one process: keyed streams, draw functions, the dealer's request check."""

from __future__ import annotations

import functools
import json
import operator
import secrets
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from veiltrain import mpc, protocol, signbits  # mpc imports CrypTen, which installs the patches
from veiltrain.errors import PartyError


def test_one_key_gives_one_stream_whatever_the_call_sizes() -> None:
    key = bytes(range(32))
    a, b = protocol.KeyStream(key), protocol.KeyStream(key)
    # Two holders of a key stay in lockstep even if one draws in other chunk sizes.
    joined = torch.cat([a.words(3), a.words(5), a.words(1 << 18)])
    assert torch.equal(joined, b.words(8 + (1 << 18)))
    assert not torch.equal(protocol.KeyStream(bytes(32)).words(8), protocol.KeyStream(key).words(8))


def test_keys_must_be_256_bits() -> None:
    for size in (0, 8, 16, 31, 33):
        with pytest.raises(ValueError, match="32 bytes"):
            protocol.KeyStream(bytes(size))


def test_words_are_uniform_bytes() -> None:
    words = protocol.KeyStream.fresh().words(1 << 15).numpy()
    assert chisquare(np.bincount(words.view(np.uint8), minlength=256)).pvalue > 1e-6
    assert words.min() < -(2**62) and words.max() > 2**62  # the full signed range


def test_draw_functions_follow_cryptens_signatures() -> None:
    stream = protocol.KeyStream.fresh()
    ring = protocol.random_ring_element(torch.Size([3, 4]), generator=stream, device="cpu")
    assert ring.shape == (3, 4) and ring.dtype == torch.int64
    bits = protocol.kbit_random_tensor((1000,), bitlength=1, generator=stream)
    assert set(bits.unique().tolist()) == {0, 1}
    small = protocol.kbit_random_tensor([500], bitlength=7, generator=stream)
    assert int(small.min()) >= 0 and int(small.max()) < 128
    floats = protocol.uniform_floats(2, 300, generator=stream)
    assert floats.shape == (2, 300) and float(floats.min()) >= 0 and float(floats.max()) < 1
    assert protocol.random_ring_element(5).shape == (5,)  # no generator: the private stream


def test_torch_generators_are_refused_everywhere_cryptens_draws_go() -> None:
    import crypten.common.rng as rng
    from crypten.mpc.primitives import arithmetic, binary
    from crypten.mpc.provider import tfp_provider, ttp_provider

    assert mpc.MPCTensor is not None
    for module in (rng, ttp_provider, tfp_provider, arithmetic):
        assert module.generate_random_ring_element is protocol.random_ring_element
    for module in (rng, ttp_provider, tfp_provider, binary):
        assert module.generate_kbit_random_tensor is protocol.kbit_random_tensor
    with pytest.raises(TypeError, match="32 bits"):
        protocol.random_ring_element((4,), generator=torch.Generator())
    # Dropout masks: CrypTen's gradients module sees a torch whose rand takes a KeyStream.
    import crypten.gradients

    seen = crypten.gradients.torch
    assert seen.rand((2, 3), generator=protocol.KeyStream.fresh()).shape == (2, 3)
    assert seen.zeros is torch.zeros
    with pytest.raises(ValueError, match="Z/2\\^64"):
        protocol.random_ring_element((4,), ring_size=2**32)


def test_the_dealer_serves_only_cryptens_functions_and_products() -> None:
    good = {"function": "additive", "device": None, "args": [[2], [2], "mul"], "kwargs": {}}
    assert protocol.checked_request(good) == ("additive", [[2], [2], "mul"], {})
    bad = [
        "terminate-now",
        {**good, "function": "__init__"},
        {**good, "function": "_get_generators"},
        {**good, "args": [[2], [2], "__import__"]},
        {**good, "args": "not a list"},
        {**good, "kwargs": []},
    ]
    for message in bad:
        with pytest.raises(PartyError, match="the dealer"):
            protocol.checked_request(message)


def test_messages_are_json_with_a_size_cap() -> None:
    value = {"function": "square", "args": [[3, 4]], "kwargs": {"stride": [1, 1]}}
    assert protocol._decode(protocol._encode(value)) == value
    with pytest.raises(PartyError, match="bytes"):
        protocol._checked_length(torch.tensor(protocol.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(TypeError):
        protocol._encode(object())  # nothing that JSON cannot carry: no pickles


@pytest.mark.parametrize(
    ("function", "args", "kwargs"),
    [
        ("additive", [[4, 3], [4, 3], "mul"], {}),
        ("additive", [[1, 3], [4, 3], "mul"], {}),
        ("additive", [[5, 7], [7, 2], "matmul"], {}),
        ("additive", [[2, 3, 9, 9], [8, 3, 3, 3], "conv2d"], {"stride": 2, "padding": 1}),
        ("additive", [[2, 3, 9], [4, 3, 5], "conv1d"], {"dilation": 2}),
        ("additive", [[2, 4, 9, 9], [8, 2, 3, 3], "conv2d"], {"groups": 2, "padding": [1, 0]}),
        ("additive", [[2, 4, 5, 5], [4, 3, 3, 3], "conv_transpose2d"], {"stride": 2}),
        (
            "additive",
            [[2, 4, 5], [4, 3, 3], "conv_transpose1d"],
            {"output_padding": 1, "stride": 2},
        ),
        ("additive", [[7], [7], "matmul"], {}),
        ("additive", [[7], [3, 7, 2], "matmul"], {}),
        ("additive", [[2, 1, 5, 7], [3, 7, 2], "matmul"], {}),
        ("binary", [[1, 6], [5, 1]], {}),
        ("square", [[3, 4]], {}),
        ("wraps", [[7]], {}),
        ("B2A", [[2, 2, 2]], {}),
    ],
)
def test_both_ends_agree_on_the_size_of_the_dealer_s_answer(
    function: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    # The dealer no longer sends the size: party 0 and the dealer must compute the same one.
    if function == "additive":
        a, b = (torch.ones(s) for s in args[:2])
        expected = getattr(torch, args[2])(a, b, **kwargs).size()
    elif function == "binary":
        expected = (torch.ones(args[0]) + torch.ones(args[1])).size()
    else:
        expected = torch.Size(args[0])
    as_sent = json.loads(json.dumps(args))  # the dealer sees lists, party 0 torch sizes
    assert protocol.result_size(function, as_sent, kwargs) == expected
    sizes = [torch.Size(a) if isinstance(a, list) else a for a in args]
    assert protocol.result_size(function, sizes, kwargs) == expected


def test_the_dealer_s_select_answers_three_rows_and_takes_only_a_count() -> None:
    assert protocol.result_size("select", [10], {}) == torch.Size((3, 10))
    request = {"function": "select", "device": None, "args": [10], "kwargs": {}}
    assert protocol.checked_request(request) == ("select", [10], {})
    for count in ("10", -1, [10], 2.5):  # checked before any draw
        with pytest.raises(PartyError, match="select"):
            protocol._dealer_select(None, count)


@pytest.mark.parametrize("extra", [0, 2000])
def test_a_message_travels_in_one_frame_or_continues_in_a_second(
    monkeypatch: pytest.MonkeyPatch, extra: int
) -> None:
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(protocol.dist, "send", lambda t, dst, group: sent.append(t.clone()))
    value = {"function": "square", "args": [[3, 4]], "kwargs": {"pad": "x" * extra}}

    class Channel:
        main_group = None

    protocol.send_obj(Channel(), value, dst=1)
    assert len(sent) == (1 if extra == 0 else 2)
    assert sent[0].numel() == protocol.FRAME_BYTES  # the receiver knows the first size

    def recv(tensor: torch.Tensor, src: int, group: Any) -> None:
        tensor.copy_(sent.pop(0))  # raises on a size mismatch, as gloo does

    monkeypatch.setattr(protocol.dist, "recv", recv)
    assert protocol.recv_obj(Channel(), src=0) == value
    assert not sent


def _kept(masks: Any, drop: Any = None, function: str = "additive") -> dict[str, Any]:
    args: list[Any] = [[2], [2], "mul"] if function == "additive" else [[2]]
    message = {"function": function, "device": None, "args": args, "kwargs": {}}
    return {**message, "masks": masks, "drop": [] if drop is None else drop}


def test_kept_mask_requests_are_checked_before_any_draw() -> None:
    good = _kept([["new", 0], ["old", 3]], drop=[1, 2])
    assert protocol.checked_request(good) == ("additive", [[2], [2], "mul"], {})
    bad = [
        _kept([["new", 0]]),
        _kept([["new", 0], ["again", 1]]),
        _kept([["new", -1], ["new", 1]]),
        _kept([["new", True], ["new", 1]]),
        _kept([["new", "0"], ["new", 1]]),
        _kept([["new", 0], ["new", 1]], drop="all"),
        _kept([["new", 0], ["new", 1]], drop=[-2]),
        _kept([["new", 0], ["new", 1]], function="square"),
        {**_kept([["new", 0], ["new", 1]]), "drop": None},
    ]
    for message in bad:
        with pytest.raises(PartyError, match="kept masks"):
            protocol.checked_request(message)


class _Dealer:
    """The dealer's state that kept triples use: one stream per party, as TTPServer has."""

    device = "cpu"
    _get_additive_PRSS = protocol._dealer_prss
    private_and = protocol._dealer_private_and
    tree_and = protocol._dealer_tree_and
    trunc = protocol._dealer_trunc

    def __init__(self, keys: list[bytes]) -> None:
        self.generators = [protocol.KeyStream(k) for k in keys]

    def _get_generators(self, device: Any = None) -> list[protocol.KeyStream]:
        return self.generators

    def _get_binary_PRSS(self, size: Any, remove_rank: bool = False) -> torch.Tensor:
        """The XOR of the parties' draws (CrypTen's TTPServer method of this name)."""
        draws = [s.words(int(np.prod(size))).reshape(size) for s in self.generators[remove_rank:]]
        return functools.reduce(operator.xor, draws)


def test_kept_triples_are_built_on_the_masks_the_parties_kept() -> None:
    # Both parties draw a fresh operand's mask share from their stream with the dealer, keep
    # it, and later products name it: c0 + c1 must be op(a, b) of the masks the parties hold.
    keys = [secrets.token_bytes(protocol.KEY_BYTES) for _ in range(2)]
    dealer, streams = _Dealer(keys), [protocol.KeyStream(k) for k in keys]
    held: dict[int, list[torch.Tensor]] = {}

    def product(specs: list[list[Any]], sizes: list[list[int]], op: str) -> None:
        masks = []
        for (kind, handle), size in zip(specs, sizes, strict=True):
            if kind == "new":
                held[handle] = [s.words(int(np.prod(size))).reshape(size) for s in streams]
            masks.append(held[handle])
        message = {"function": "additive", "args": [*sizes, op], "kwargs": {}}
        c0 = protocol._answer(dealer, {**message, "masks": specs, "drop": []})
        c1 = streams[1].words(c0.numel()).reshape(c0.shape)
        a, b = (m[0] + m[1] for m in masks)
        assert torch.equal(c0 + c1, getattr(torch, op)(a, b))

    product([["new", 0], ["new", 1]], [[3, 4], [4, 2]], "matmul")
    product([["old", 0], ["new", 2]], [[3, 4], [4]], "mul")  # x's mask again, a fresh b
    product([["old", 1], ["old", 1]], [[4, 2], [4, 2]], "mul")  # a square of a kept mask
    product([["new", 3], ["old", 3]], [[5], [5]], "mul")  # x * x: one mask, drawn once
    assert len(protocol.dealt_masks(dealer)) == 4
    wrong = [
        ([["new", 3], ["new", 4]], [[5], [5]], "handle 3"),  # a handle given twice
        ([["old", 0], ["new", 5]], [[4, 3], [4, 3]], "no kept mask 0"),  # another size
        ([["old", 9], ["new", 5]], [[5], [5]], "no kept mask 9"),
    ]
    for specs, sizes, error in wrong:
        message = {"function": "additive", "args": [*sizes, "mul"], "kwargs": {}}
        with pytest.raises(PartyError, match=error):
            protocol._answer(dealer, {**message, "masks": specs, "drop": []})
    dropped = {"function": "additive", "args": [[5], [5], "mul"], "kwargs": {}, "drop": [0, 3]}
    protocol._answer(dealer, {**dropped, "masks": [["new", 6], ["new", 7]]})
    assert len(protocol.dealt_masks(dealer)) == 4  # 0 and 3 went, 6 and 7 came


def test_an_and_of_private_inputs_gives_xor_shares_of_the_and() -> None:
    # Party 0 holds s0 and party 1 s1 (the carry tree's generate bits); each opens only its own
    # input, masked by a mask that only it and the dealer drew (fastpath._PrivateAnd).
    keys = [secrets.token_bytes(protocol.KEY_BYTES) for _ in range(2)]
    dealer, streams = _Dealer(keys), [protocol.KeyStream(k) for k in keys]
    s0, s1 = (protocol.KeyStream.fresh().words(12).reshape(3, 4) for _ in range(2))
    request = {"function": "private_and", "device": None, "args": [[3, 4]], "kwargs": {}}
    assert protocol.checked_request(request) == ("private_and", [[3, 4]], {})
    w0 = protocol._answer(dealer, request)
    u = streams[0].words(12).reshape(3, 4)
    v, w1 = (streams[1].words(12).reshape(3, 4) for _ in range(2))
    e, f = s0 ^ u, s1 ^ v  # what party 0 sends, what party 1 sends
    assert torch.equal(((s0 & f) ^ w0) ^ ((e & v) ^ w1), s0 & s1)
    for size in ("3x4", [3, -4], [3, 4.0]):
        with pytest.raises(PartyError, match="private inputs"):
            protocol._dealer_private_and(dealer, size)
    dealer.generators.append(protocol.KeyStream.fresh())
    with pytest.raises(PartyError, match="2 parties"):
        protocol._dealer_private_and(dealer, [3, 4])


def test_carry_tree_gates_share_each_left_mask_between_its_two_gates() -> None:
    # Every party draws the left masks (a row per pair), then the right ones (a row per gate),
    # party 1 its c1; the dealer's c0 completes c = spread(a) & b, the mask of a pair's P_hi
    # serving both of its gates (fastpath._PlaneGates).
    keys = [secrets.token_bytes(protocol.KEY_BYTES) for _ in range(2)]
    dealer, streams = _Dealer(keys), [protocol.KeyStream(k) for k in keys]
    request = {"function": "tree_and", "device": None, "args": [5], "kwargs": {}}
    assert protocol.checked_request(request) == ("tree_and", [5], {})
    c0 = protocol._answer(dealer, request)
    left, rows = signbits.left_rows(), signbits.tree_rows()
    a = [s.words(left * 5).reshape(left, 5) for s in streams]
    b = [s.words(rows * 5).reshape(rows, 5) for s in streams]
    c1 = streams[1].words(rows * 5).reshape(rows, 5)
    assert torch.equal(c0 ^ c1, (a[0] ^ a[1])[signbits.spread_index()] & (b[0] ^ b[1]))
    for words in ("5", -1, 2.5, True, [5]):  # checked before any draw
        with pytest.raises(PartyError, match="carry-tree"):
            protocol._dealer_tree_and(dealer, words)
