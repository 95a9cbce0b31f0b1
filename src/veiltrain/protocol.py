"""CrypTen's protocol randomness on AES-256-CTR keystreams and its dealer channel on JSON.

Stock CrypTen 0.4.1 draws every Beaver triple, PRZS mask, B2A bit, wrap count and random share
from `torch.Generator`s, and torch's CPU generator keeps only 32 bits of `manual_seed`: a party
that sees its own triple seed can search 2^32 dealer states and recover another party's triples,
hence the inputs of every product. Here every such draw comes from a `KeyStream` keyed with 256
bits from `secrets`; keys travel between processes as key bytes. Messages to the dealer (and
CrypTen's other object messages) are JSON instead of pickles.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from veiltrain import peerlink, ringmath, signbits
from veiltrain.errors import PartyError

KEY_BYTES = 32
"""AES-256 keys: 256 bits from the OS CSPRNG."""
_KEY_WORDS = KEY_BYTES // 8
_RING = 2**64
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))
_SLACK = 15  # cryptography's update_into wants block_size - 1 spare bytes
_SLACK_WORDS = 2
MAX_MESSAGE_BYTES = 1 << 20
"""Dealer requests and size messages are a few hundred bytes; refuse anything near this."""

TTP_FUNCTIONS = frozenset(
    {"additive", "square", "binary", "wraps", "B2A", "select", "private_and", "tree_and", "trunc"}
)
"""What the dealer serves: CrypTen's TTP functions and veiltrain's `select`, `private_and`,
`tree_and` and `trunc`, nothing else."""
TTP_OPS = frozenset(
    {"mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "conv2d_weight"}
)
"""The torch products an additive-triple request may name."""


class KeyStream:
    """An AES-256-CTR keystream (128-bit counter from 0): CrypTen's generator, made secure.

    Objects of this class replace every `torch.Generator` CrypTen's protocols draw from. One
    stream serves every device: values are drawn on the CPU and moved, so two holders of the
    same key stay in lockstep whatever device each computes on.
    """

    device = torch.device("cpu")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a protocol key has {KEY_BYTES} bytes, got {len(key)}")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    @classmethod
    def fresh(cls) -> KeyStream:
        """A stream under a new key that nobody else holds."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def words(self, count: int) -> torch.Tensor:
        """The next `count` uniformly random int64 words (little-endian keystream)."""
        total = count * 8
        # Uninitialised (a bytearray zero-fills first: a pass over the output for nothing),
        # with the slack as two spare words at the end.
        out = np.empty(count + _SLACK_WORDS, dtype="<i8")
        view = out.data.cast("B")
        for start in range(0, total, _CHUNK):
            size = min(_CHUNK, total - start)
            self._encryptor.update_into(_ZEROS[:size], view[start : start + size + _SLACK])
        return torch.from_numpy(out[:count].astype(np.int64, copy=False))


_local: KeyStream | None = None


def local_stream() -> KeyStream:
    """This process's private stream, for draws CrypTen makes without naming a generator."""
    global _local  # noqa: PLW0603 - one private stream per process, like CrypTen's "local"
    if _local is None:
        _local = KeyStream.fresh()
    return _local


def _stream(generator: Any) -> KeyStream:
    if generator is None:
        return local_stream()
    if isinstance(generator, KeyStream):
        return generator
    raise TypeError(
        f"protocol randomness from {type(generator).__name__}: veiltrain gives CrypTen only "
        "keyed CSPRNG streams (a torch.Generator keeps 32 bits of its seed)"
    )


def _shape(size: Any) -> tuple[int, ...]:
    if isinstance(size, int):
        return (size,)
    return tuple(int(d) for d in size)


def _place(values: torch.Tensor, device: Any) -> Any:
    if device is None or torch.device(device).type == "cpu":
        return values
    from crypten.cuda import CUDALongTensor

    return CUDALongTensor(values.to(device))


def random_ring_element(
    size: Any, ring_size: int = _RING, generator: Any = None, **kwargs: Any
) -> Any:
    """Uniform elements of Z/2^64 as int64: CrypTen's `generate_random_ring_element`."""
    if ring_size != _RING:
        raise ValueError(f"only the ring Z/2^64 is supported, got ring size {ring_size}")
    shape = _shape(size)
    values = _stream(generator).words(math.prod(shape)).reshape(shape)
    return _place(values, kwargs.get("device"))


def kbit_random_tensor(
    size: Any, bitlength: int | None = None, generator: Any = None, **kwargs: Any
) -> Any:
    """Uniform k-bit values (the low k bits of keystream words): `generate_kbit_random_tensor`."""
    bits = 64 if bitlength is None else int(bitlength)
    if not 1 <= bits <= 64:
        raise ValueError(f"bit length {bits} is outside 1..64")
    shape = _shape(size)
    values = _stream(generator).words(math.prod(shape)).reshape(shape)
    if bits < 64:
        values &= (1 << bits) - 1  # 2^k divides 2^64: the low bits stay uniform
    return _place(values, kwargs.get("device"))


def uniform_floats(*size: Any, generator: Any = None, device: Any = None, **_: Any) -> torch.Tensor:
    """Floats uniform on [0, 1) from 53 keystream bits each (CrypTen's dropout masks)."""
    shape = _shape(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
    words = _stream(generator).words(math.prod(shape))
    values = ((words >> 11) & ((1 << 53) - 1)).double() * 2.0**-53
    return values.float().reshape(shape).to(device or "cpu")


# ----------------------------------------------------------------------------- key exchange


def key_tensor(key: bytes) -> torch.Tensor:
    """A key as four int64 words, the form gloo sends."""
    return torch.frombuffer(bytearray(key), dtype=torch.int64).clone()


def key_bytes(words: torch.Tensor) -> bytes:
    """The key carried by four int64 words."""
    return bytes(words.to(torch.int64).contiguous().numpy().tobytes())


def _empty_key() -> torch.Tensor:
    return torch.zeros(_KEY_WORDS, dtype=torch.int64)


def _ring_keys(comm: Any) -> tuple[bytes, bytes]:
    """Send a fresh key to the next party, receive the previous party's: (prev, next)."""
    mine = secrets.token_bytes(KEY_BYTES)
    world, rank = comm.get_world_size(), comm.get_rank()
    if world < 2:
        return mine, mine
    received, outgoing = _empty_key(), key_tensor(mine)
    sending = comm.isend(outgoing, (rank + 1) % world)
    receiving = comm.irecv(received, src=(rank - 1) % world)
    sending.wait()
    receiving.wait()
    return key_bytes(received), mine


def setup_prng() -> None:
    """Replacement for `crypten._setup_prng`: prev/next/local/global streams under 256-bit keys."""
    import crypten
    import crypten.communicator as comm

    prev_key, next_key = _ring_keys(comm.get())
    # Party 0's key for randomness every party shares (public among parties, e.g. dropout).
    global_key = key_bytes(comm.get().broadcast(key_tensor(secrets.token_bytes(KEY_BYTES)), 0))
    streams = {
        "prev": KeyStream(prev_key),
        "next": KeyStream(next_key),
        "local": local_stream(),
        "global": KeyStream(global_key),
    }
    for name, stream in streams.items():
        crypten.generators[name].clear()
        for device in _devices():
            crypten.generators[name][device] = stream


def _devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
        found += [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return found


# ------------------------------------------------------------------------------- the dealer


def _client_setup_generators(client: Any) -> None:
    """A party receives its 256-bit triple key from the dealer (stock: a 32-bit torch seed)."""
    import crypten.communicator as comm

    received = _empty_key()
    dealer = comm.get().get_ttp_rank()
    dist.recv(tensor=received, src=dealer, group=client.ttp_group)
    dist.barrier(group=client.ttp_group)
    client.generator = KeyStream(key_bytes(received))
    client.generator_cuda = client.generator
    from veiltrain import openings  # it builds on this module

    openings.begin()  # a new dealer: openings kept in an earlier session are not its masks
    if comm.get().get_rank() == 0:  # only party 0 asks the dealer for anything
        peerlink.dial_dealer(_wait.total_seconds(), client.ttp_group, dealer)


def _server_setup_generators(server: Any) -> None:
    """The dealer draws one 256-bit key per party and sends each only to its party."""
    import crypten.communicator as comm

    keys = [secrets.token_bytes(KEY_BYTES) for _ in range(comm.get().get_world_size())]
    for party, key in enumerate(keys):
        dist.send(tensor=key_tensor(key), dst=party, group=server.ttp_group)
    server.generators = [KeyStream(k) for k in keys]
    server.generators_cuda = server.generators
    dist.barrier(group=server.ttp_group)


def checked_request(message: Any) -> tuple[str, list[Any], dict[str, Any]]:
    """Validate a dealer request: a known function, list args, dict kwargs, a known product."""
    if not isinstance(message, dict) or message.get("function") not in TTP_FUNCTIONS:
        raise PartyError(f"the dealer: unexpected request {str(message)[:200]!r} from party 0")
    args, kwargs = message.get("args"), message.get("kwargs")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise PartyError(f"the dealer: malformed request {str(message)[:200]!r} from party 0")
    if message["function"] == "additive" and (len(args) < 3 or args[2] not in TTP_OPS):
        raise PartyError(f"the dealer: unsupported product in {str(message)[:200]!r}")
    if ("masks" in message or "drop" in message) and not _kept_fields_valid(message):
        raise PartyError(f"the dealer: malformed kept masks in {str(message)[:200]!r}")
    return str(message["function"]), args, kwargs


def _kept_fields_valid(message: dict[str, Any]) -> bool:
    """A kept-mask product: two ["new" or "old", handle] specs and a list of handles to drop."""
    masks, drop = message.get("masks"), message.get("drop")

    def handle(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    specs_ok = (
        isinstance(masks, list)
        and len(masks) == 2
        and all(
            isinstance(m, list) and len(m) == 2 and m[0] in {"new", "old"} and handle(m[1])
            for m in masks
        )
    )
    drops_ok = isinstance(drop, list) and all(handle(h) for h in drop)
    return message["function"] == "additive" and specs_ok and drops_ok


def _serve(server: Any) -> None:
    """Replacement for `TTPServer.__init__`: serve party 0 until it says 'terminate'.

    Stock CrypTen logs a RuntimeError (a timeout, a vanished party) and returns, so a failed
    dealer exited 0 and the stage blamed a party; here the error propagates and names the dealer.
    """
    import crypten
    import crypten.communicator as comm

    crypten.init()
    server.ttp_group = comm.get().ttp_group
    server.comm_group = comm.get().ttp_comm_group
    server.device = "cpu"  # the dealer computes on its CPU; parties move values to their device
    _server_setup_generators(server)
    rank = comm.get().get_ttp_rank()
    link = peerlink.accept_party0(os.environ["RENDEZVOUS"], _wait.total_seconds(), server.ttp_group)
    try:  # party 0's requests come over the link until its session ends
        for request in link.requests(MAX_MESSAGE_BYTES):
            link.answer(_answer(server, json.loads(request)))
    finally:
        link.close()
    while True:  # then over gloo, as CrypTen sends its 'terminate'
        message = comm.get().recv_obj(0, server.ttp_group)
        if message == "terminate":
            return
        comm.get().broadcast(_answer(server, message), rank, server.comm_group)


def _answer(server: Any, message: Any) -> torch.Tensor:
    """The dealer's answer to one checked request, of the size party 0 expects."""
    function, args, kwargs = checked_request(message)
    if "masks" in message:
        kept = dealt_masks(server)
        kept.drop(message["drop"])
        result = _dealer_kept(server, kept, message["masks"], *args, **kwargs)
    else:
        result = getattr(server, function)(*args, **kwargs)
    if result.size() != result_size(function, args, kwargs):
        raise PartyError(
            f"the dealer: {function} gave {list(result.size())}, not the size "
            f"party 0 expects; request {str(message)[:200]!r}"
        )
    return result


def result_size(function: str, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Size:
    """The size of the dealer's answer, worked out at both ends instead of being sent (one
    message less per triple) and from shapes alone (CrypTen computed the product on random
    operands for it; torch's meta tensors would import torch._dynamo into a party)."""
    if function == "additive":
        size0, size1, op, *_ = args
        return torch.Size(_product_size(op, tuple(size0), tuple(size1), kwargs))
    if function == "binary":
        return _broadcast(tuple(args[0]), tuple(args[1]))
    if function == "select":
        return torch.Size((3, int(args[0])))
    if function == "tree_and":
        return torch.Size((signbits.tree_rows(), int(args[0])))
    if function == "trunc":
        return torch.Size((2, int(args[0])))
    return torch.Size(tuple(args[0]))


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> torch.Size:
    return ringmath.broadcast_shape(a, b)


def _product_size(
    op: str, a: tuple[int, ...], b: tuple[int, ...], kwargs: dict[str, Any]
) -> tuple[int, ...]:
    if op == "mul":
        return tuple(_broadcast(a, b))
    if op == "matmul":
        return _matmul_size(a, b)
    if op == "conv2d_weight":  # (g, x) to the kernel's (C_out, C_in, kh, kw)
        return (a[1], b[1], *ringmath.pair(kwargs["kernel_size"]))
    return _conv_size(a, b, op.startswith("conv_transpose"), **kwargs)


def _matmul_size(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """torch.matmul's result shape (vectors, matrices, broadcast batches)."""
    if len(a) == 1 and len(b) == 1:
        return ()
    if len(a) == 1:
        return (*b[:-2], b[-1])
    if len(b) == 1:
        return a[:-1]
    return (*_broadcast(a[:-2], b[:-2]), a[-2], b[-1])


def _conv_size(
    x: tuple[int, ...],
    w: tuple[int, ...],
    transpose: bool,
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    output_padding: Any = 0,
) -> tuple[int, ...]:
    """torch's convolution output shape: (N, C_out, *spatial)."""
    dims = len(x) - 2

    def per_dim(value: Any) -> list[int]:
        return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]

    s, p, d, o = (per_dim(v) for v in (stride, padding, dilation, output_padding))
    k = w[2:]
    if transpose:
        spatial = [
            (h - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + o[i] + 1 for i, h in enumerate(x[2:])
        ]
        return (x[0], w[1] * groups, *spatial)
    spatial = [(h + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, h in enumerate(x[2:])]
    return (x[0], w[0], *spatial)


Pending = Callable[[], torch.Tensor]
"""The dealer's answer, once it has arrived: waiting is left for after the parties' opening."""

_wait = dt.timedelta(seconds=120)


def set_timeout(timeout_s: float) -> None:
    """How long a party waits for the dealer's answer (the session's timeout)."""
    global _wait  # noqa: PLW0603 - one setting per process, set by mpc.session
    _wait = dt.timedelta(seconds=timeout_s)


def wait_timeout() -> dt.timedelta:
    """The session's timeout, for every wait on another process."""
    return _wait


def _ttp_post(
    self: Any,
    function: str,
    device: Any,
    *args: Any,
    extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Pending:
    """Party 0's request to the dealer, answered later: the opening of x - a and y - b needs
    only a and b, so it runs while the dealer computes c (CrypTen waits first, and sent the
    answer's size in between, one more round trip per triple). `extra` adds fields to the
    request (a kept-mask product's handles)."""
    import crypten.communicator as comm

    message = {"function": function, "device": None, "args": args, "kwargs": kwargs}
    message.update(extra or {})
    link = peerlink.dealer()
    if link is not None:
        return _posted(link, message, result_size(function, args, kwargs), device)
    dealer = comm.get().get_ttp_rank()
    # Not waiting for the send either: a blocking send returns once the dealer has taken it.
    works = [dist.isend(frame, dealer, group=self.ttp_group) for frame in _frames(message)]
    result = torch.empty(result_size(function, args, kwargs), dtype=torch.long, device=device)
    works.append(dist.broadcast(result.data, dealer, group=self.comm_group, async_op=True))

    def answer() -> torch.Tensor:
        for work in works:
            if work is None:
                raise PartyError("party 0 is not in the dealer's group")
            work.wait(_wait)
        return result

    return answer


def _posted(
    link: peerlink.DealerClient, message: dict[str, Any], size: torch.Size, device: Any
) -> Pending:
    """The request over party 0's link to the dealer; the answer is read into `result` when
    waited for."""
    result = torch.empty(size, dtype=torch.long)
    arrived = link.post(json.dumps(message, separators=(",", ":")).encode(), result)

    def answer() -> torch.Tensor:
        arrived()
        return result if device is None else result.to(device)

    return answer


def _ttp_request(self: Any, function: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Party 0's request to the dealer, waiting for the answer (CrypTen's `ttp_request`)."""
    return _ttp_post(self, function, device, *args, **kwargs)()


def _draws(
    generator: Any,
    rank: int,
    function: str,
    *args: Any,
    extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Pending:
    """c: asked of the dealer by party 0, drawn from the party's own stream by the others."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    if rank == 0:
        return _ttp_post(TTPClient.get(), function, None, *args, extra=extra, **kwargs)
    c = random_ring_element(result_size(function, args, kwargs), generator=generator)
    return lambda: c


def additive_parts(
    size0: Any, size1: Any, op: str, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, Pending]:
    """A CPU additive triple's shares a and b now, c when asked (draws as `_additive_triple`)."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    generator = TTPClient.get().get_generator(device=None)
    a = random_ring_element(size0, generator=generator)
    b = random_ring_element(size1, generator=generator)
    c = _draws(generator, comm.get().get_rank(), "additive", size0, size1, op, *args, **kwargs)
    return a, b, c


def kept_parts(  # noqa: PLR0917 (the shapes, the masks, the op: all needed)
    size0: Any,
    size1: Any,
    specs: tuple[tuple[str, int], tuple[str, int]],
    drop: list[int],
    op: str,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor | None, torch.Tensor | None, Pending]:
    """An additive triple on kept masks (veiltrain.openings): a share of each ("new", handle)
    operand's mask drawn now (None for an ("old", handle) one, whose mask the party kept), and
    c when asked. Party 0's request names the handles and those the dealer may drop."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    generator = TTPClient.get().get_generator(device=None)
    a, b = (
        random_ring_element(size, generator=generator) if kind == "new" else None
        for size, (kind, _) in zip((size0, size1), specs, strict=True)
    )
    extra = {"masks": [list(spec) for spec in specs], "drop": drop}
    rank = comm.get().get_rank()
    c = _draws(generator, rank, "additive", size0, size1, op, *args, extra=extra, **kwargs)
    return a, b, c


def b2a_parts(size: Any) -> tuple[torch.Tensor, Pending]:
    """Shares of a random bit r: binary now, arithmetic when asked (CrypTen's `B2A_rng`)."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    generator = TTPClient.get().get_generator(device=None)
    r_binary = kbit_random_tensor(size, bitlength=1, generator=generator)
    return r_binary, _draws(generator, comm.get().get_rank(), "B2A", size)


def private_and_parts(size: tuple[int, ...]) -> tuple[torch.Tensor, Pending]:
    """This party's part of an AND of private inputs (fastpath._PrivateAnd): party 0's mask u,
    or party 1's mask v; and when asked, the party's XOR share of u & v (party 1 draws w1)."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    generator = TTPClient.get().get_generator(device=None)
    mask = kbit_random_tensor(size, generator=generator)
    return mask, _draws(generator, comm.get().get_rank(), "private_and", size)


def tree_parts(words: int) -> tuple[torch.Tensor, torch.Tensor, Pending]:
    """This party's masks for the carry tree's gates over `words` words a plane: a for the left
    operands (one row per pair, `signbits.left_rows`), b for the right ones (a row per gate),
    and when asked its XOR share of c = spread(a) & b (`signbits.spread_index`)."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    generator = TTPClient.get().get_generator(device=None)
    a = kbit_random_tensor((signbits.left_rows(), words), generator=generator)
    b = kbit_random_tensor((signbits.tree_rows(), words), generator=generator)
    return a, b, _draws(generator, comm.get().get_rank(), "tree_and", words)


def _dealer_tree_and(self: Any, words: Any) -> torch.Tensor:
    """Party 0's c0 = (spread(a) & b) ^ c1 for the masks every party drew (`tree_parts`)."""
    if not isinstance(words, int) or isinstance(words, bool) or words < 0:
        raise PartyError(f"the dealer: carry-tree gates over {words!r} words")
    a = self._get_binary_PRSS((signbits.left_rows(), words))
    b = self._get_binary_PRSS((signbits.tree_rows(), words))
    c: torch.Tensor = a[signbits.spread_index()] & b
    c ^= self._get_binary_PRSS(c.size(), remove_rank=True)
    return c


def _dealer_private_and(self: Any, size: Any) -> torch.Tensor:
    """Party 0's w0 = (u & v) ^ w1: u is party 0's draw, v and w1 party 1's, in that order."""
    streams = self._get_generators(device=self.device)
    if len(streams) != 2:
        raise PartyError(
            f"the dealer: an AND of private inputs needs 2 parties, not {len(streams)}"
        )
    if not isinstance(size, list) or not all(isinstance(d, int) and d >= 0 for d in size):
        raise PartyError(f"the dealer: an AND of private inputs of size {size!r}")
    u: torch.Tensor = kbit_random_tensor(size, generator=streams[0])
    v: torch.Tensor = kbit_random_tensor(size, generator=streams[1])
    w1: torch.Tensor = kbit_random_tensor(size, generator=streams[1])
    return (u & v) ^ w1


def trunc_parts(count: int, bits: int) -> tuple[torch.Tensor, Pending]:
    """This party's part of an exact truncation of `count` values by 2^bits (veiltrain.
    truncation): its share of a random mask r now, and when asked its (2, count) shares of
    r >> bits (logical) and of msb(r) 2^(64 - bits)."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    generator = TTPClient.get().get_generator(device=None)
    r = random_ring_element((count,), generator=generator)
    return r, _draws(generator, comm.get().get_rank(), "trunc", count, bits)


def _dealer_trunc(self: Any, count: Any, bits: Any) -> torch.Tensor:
    """Party 0's shares of r >> bits and msb(r) 2^(64 - bits) for the mask r = r0 + r1 that the
    parties drew (`trunc_parts`), less party 1's draws of the same."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise PartyError(f"the dealer: a truncation of {count!r} values")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 62:
        raise PartyError(f"the dealer: a truncation by 2^{bits!r}")
    r = self._get_additive_PRSS((count,))
    rows = torch.stack([ringmath.shift_right_logical(r, bits), (r < 0).long() << (64 - bits)])
    return rows.sub_(self._get_additive_PRSS(rows.size(), remove_rank=True))


def select_parts(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Pending]:
    """This party's part of a dealt select for `count` values: its XOR share of random bits r
    packed 64 to a word, its shares of two masks a and a' now, and (3, count) shares of r, r a
    and r a' when asked. With e = bit ^ r and d = x - a opened, [bit x] is local (fastpath)."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    generator = TTPClient.get().get_generator(device=None)
    r = kbit_random_tensor((-(-count // 64),), generator=generator)
    a = random_ring_element((count,), generator=generator)
    a_next = random_ring_element((count,), generator=generator)
    return r, a, a_next, _draws(generator, comm.get().get_rank(), "select", count)


def _dealer_select(self: Any, count: int) -> torch.Tensor:
    """Party 0's (3, count) shares of r, r a and r a' for the bits r and masks a, a' that every
    party drew (`select_parts`, the same draws in the same order)."""
    if not isinstance(count, int) or count < 0:
        raise PartyError(f"the dealer: a select of {count!r} values")
    packed = self._get_binary_PRSS((-(-count // 64),))
    a, a_next = self._get_additive_PRSS((count,)), self._get_additive_PRSS((count,))
    r = signbits.from_plane(packed, count)
    rows = torch.stack([r, r * a, r * a_next])
    return rows.sub_(self._get_additive_PRSS(rows.size(), remove_rank=True))


class DealtMasks:
    """The masks the dealer keeps for party 0's kept openings (veiltrain.openings), by handle:
    the sum of the parties' draws, so that a later triple can be built on the same mask."""

    def __init__(self) -> None:
        self._masks: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._masks)

    def drop(self, handles: list[int]) -> None:
        """Forget masks whose shares party 0 no longer holds."""
        for handle in handles:
            self._masks.pop(handle, None)

    def operand(self, server: Any, spec: list[Any], size: Any) -> torch.Tensor:
        """A new mask drawn from the parties' streams and kept, or a kept one of this size."""
        kind, handle = spec
        if kind == "new":
            if handle in self._masks:
                raise PartyError(f"the dealer: party 0 reused the mask handle {handle}")
            self._masks[handle] = server._get_additive_PRSS(size)
            return self._masks[handle]
        mask = self._masks.get(handle)
        if mask is None or tuple(mask.shape) != _shape(size):
            raise PartyError(f"the dealer: no kept mask {handle} of size {list(_shape(size))}")
        return mask


def dealt_masks(server: Any) -> DealtMasks:
    """The dealer's kept masks (made on first use)."""
    kept: DealtMasks | None = getattr(server, "veiltrain_masks", None)
    if kept is None:
        kept = server.veiltrain_masks = DealtMasks()
    return kept


def _dealer_kept(  # noqa: PLR0917 (CrypTen's additive arguments after the specs)
    server: Any,
    kept: DealtMasks,
    specs: list[Any],
    size0: Any,
    size1: Any,
    op: str,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """Party 0's c0 = op(a, b) - c1 with a and b new (drawn as the parties drew) or kept."""
    a = kept.operand(server, specs[0], size0)
    b = kept.operand(server, specs[1], size1)
    c: torch.Tensor = ringmath.product(op)(a, b, *args, **kwargs)
    return c.sub_(server._get_additive_PRSS(c.size(), remove_rank=True))


def _dealer_additive(self: Any, size0: Any, size1: Any, op: str, *args: Any, **kwargs: Any) -> Any:
    """The dealer's c0 = a b - c1 - ... (CrypTen's `TTPServer.additive`, the product in
    veiltrain.ringmath's faster layout; the same draws in the same order)."""
    from veiltrain import ringmath

    a = self._get_additive_PRSS(size0)
    b = self._get_additive_PRSS(size1)
    c = ringmath.product(op)(a, b, *args, **kwargs)
    return c.sub_(self._get_additive_PRSS(c.size(), remove_rank=True))


def _dealer_prss(self: Any, size: Any, remove_rank: bool = False) -> torch.Tensor:
    """The sum of every party's draw of `size` words (CrypTen's `_get_additive_PRSS`, summed in
    place: the dealer spent 44 ms a ResNet-style step allocating the partial sums)."""
    streams = self._get_generators(device=self.device)[1 if remove_rank else 0 :]
    total: torch.Tensor = random_ring_element(size, generator=streams[0])
    for stream in streams[1:]:
        total += random_ring_element(size, generator=stream)
    return total


def _additive_triple(
    self: Any, size0: Any, size1: Any, op: str, device: Any = None, *args: Any, **kwargs: Any
) -> tuple[Any, Any, Any]:
    """CrypTen's TTP triple with the same draws in the same order; parties other than 0 get the
    size of c from shapes instead of computing the product on random operands (CrypTen does)."""
    import crypten.communicator as comm
    from crypten.mpc.primitives import ArithmeticSharedTensor
    from crypten.mpc.provider.ttp_provider import TTPClient

    generator = TTPClient.get().get_generator(device=device)
    a = random_ring_element(size0, generator=generator, device=device)
    b = random_ring_element(size1, generator=generator, device=device)
    if comm.get().get_rank() == 0:
        c = TTPClient.get().ttp_request("additive", device, size0, size1, op, *args, **kwargs)
    else:
        size = result_size("additive", (size0, size1, op, *args), kwargs)
        c = random_ring_element(size, generator=generator, device=device)
    a, b, c = (ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))
    return a, b, c


# --------------------------------------------------------------------- messages without pickle


def _encode(obj: Any) -> torch.Tensor:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def _decode(data: torch.Tensor) -> Any:
    return json.loads(data.numpy().tobytes())


def _checked_length(size: torch.Tensor) -> int:
    length = int(size.item())
    if not 0 < length <= MAX_MESSAGE_BYTES:
        raise PartyError(f"a message of {length} bytes arrived; at most {MAX_MESSAGE_BYTES}")
    return length


FRAME_BYTES = 1024
"""One message to the dealer: an 8-byte length, then JSON (a request is 100-300 bytes). CrypTen
sent the length and the data as two messages; the rare longer message continues in a second."""
_HEADER = 8


def _frames(obj: Any) -> list[torch.Tensor]:
    """obj as JSON in one frame of FRAME_BYTES (length first), and the rest if it is longer."""
    data = _encode(obj)
    frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
    frame[:_HEADER] = torch.tensor([data.numel()], dtype=torch.int64).view(torch.uint8)
    head = data[: FRAME_BYTES - _HEADER]
    frame[_HEADER : _HEADER + head.numel()] = head
    return [frame] if data.numel() == head.numel() else [frame, data[head.numel() :].clone()]


def send_obj(self: Any, obj: Any, dst: int, group: Any = None) -> None:
    """CrypTen's send_obj, as JSON in one fixed-size frame (stock: a pickle after its size)."""
    group = self.main_group if group is None else group
    for frame in _frames(obj):
        dist.send(frame, dst=dst, group=group)


def recv_obj(self: Any, src: int, group: Any = None) -> Any:
    """CrypTen's recv_obj, parsing JSON (stock: a restricted unpickler)."""
    group = self.main_group if group is None else group
    frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
    dist.recv(frame, src=src, group=group)
    length = _checked_length(frame[:_HEADER].view(torch.int64)[0])
    data = frame[_HEADER : _HEADER + length]
    if length > data.numel():
        rest = torch.empty(length - data.numel(), dtype=torch.uint8)
        dist.recv(rest, src=src, group=group)
        data = torch.cat([data, rest])
    return _decode(data)


def broadcast_obj(self: Any, obj: Any, src: int, group: Any = None) -> Any:
    """CrypTen's broadcast_obj, as JSON; every rank gets the decoded value (tuples as lists)."""
    group = self.main_group if group is None else group
    if self.rank == src:
        data = _encode(obj)
        size = torch.tensor(data.numel(), dtype=torch.int64)
    else:
        size = torch.zeros((), dtype=torch.int64)
    dist.broadcast(size, src, group=group)
    if self.rank != src:
        data = torch.empty(_checked_length(size), dtype=torch.uint8)
    dist.broadcast(data, src, group=group)
    return _decode(data)


# ------------------------------------------------------------------------------- installation


class _TorchForDropout:
    """`torch` as CrypTen's gradients module sees it, with `rand` drawing from a KeyStream."""

    rand = staticmethod(uniform_floats)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_RNG_MODULES: Sequence[str] = (
    "crypten.common.rng",
    "crypten.mpc.provider.ttp_provider",
    "crypten.mpc.provider.tfp_provider",
    "crypten.mpc.primitives.arithmetic",
    "crypten.mpc.primitives.binary",
)


def _replace(module_name: str, name: str, value: Callable[..., Any]) -> None:
    import importlib

    module = importlib.import_module(module_name)
    if hasattr(module, name):
        setattr(module, name, value)


def install() -> None:
    """Point every CrypTen module that draws protocol randomness at the keyed streams."""
    import crypten
    import crypten.gradients
    from crypten.communicator.distributed_communicator import DistributedCommunicator
    from crypten.mpc.provider import ttp_provider

    # The draw functions are imported by name into each module: replace every reference.
    for module_name in _RNG_MODULES:
        _replace(module_name, "generate_random_ring_element", random_ring_element)
        _replace(module_name, "generate_kbit_random_tensor", kbit_random_tensor)
    crypten._setup_prng = setup_prng
    client = ttp_provider.TTPClient._TTPClient__TTPClient
    client._setup_generators = _client_setup_generators
    ttp_provider.TTPServer.__init__ = _serve
    client.ttp_request = _ttp_request
    ttp_provider.TrustedThirdParty.generate_additive_triple = _additive_triple
    ttp_provider.TTPServer._setup_generators = _server_setup_generators
    ttp_provider.TTPServer.additive = _dealer_additive
    ttp_provider.TTPServer.select = _dealer_select
    ttp_provider.TTPServer.private_and = _dealer_private_and
    ttp_provider.TTPServer.tree_and = _dealer_tree_and
    ttp_provider.TTPServer.trunc = _dealer_trunc
    ttp_provider.TTPServer._get_additive_PRSS = _dealer_prss
    DistributedCommunicator.send_obj = send_obj
    DistributedCommunicator.recv_obj = recv_obj
    DistributedCommunicator.broadcast_obj = broadcast_obj
    crypten.gradients.torch = _TorchForDropout()
