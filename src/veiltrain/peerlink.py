"""Direct TCP links: between the two compute parties for openings, and party 0 to the dealer.

Every Beaver product, comparison gate and B2A opens masked words (x - a, x ^ a) between the two
parties. Through gloo an exchange of a few words took 386 us and of 2 MiB each way 6.2 ms here;
on one plain TCP connection 94 us and 1.4 ms (gloo's unbound buffers add a handshake per message
and a hop through its I/O thread). A ResNet-style step opens about 280 times, so the parties open
over this link and keep gloo for everything else (CrypTen's own collectives, set-up, shutdown).
Party 0 sends its triple requests (about 100 a step) to the dealer and gets each answer, its share
of c, over a second link: a request cost 0.5 ms of gloo's send alone; a product of 512 values went
from 2.4 to 1.5 ms.

Each link carries exactly what gloo carried (masked words; requests naming shapes; party 0's c)
and is bound to the gloo peer: the listening side (party 1; the dealer) binds an ephemeral port
and sends its address over gloo; the dialling side (party 0) sends a random 16-byte nonce over
gloo and then over the new connection, and the listener takes the connection only if the two
agree. Whoever could not read gloo's traffic cannot take party 0's place; whoever could learns
nothing here that gloo did not already carry. No encryption, as with gloo: the parties' network
is assumed private (the README's threat model).
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

_NONCE_BYTES = 16
_ADDRESS_BYTES = 255  # the length goes in one byte
_PROOF_S = 5.0
"""How long a new connection has to send the nonce (party 0 sends it at once)."""


class PeerLink:
    """One connected socket to the other party; `exchange` sends ours and returns theirs."""

    def __init__(self, sock: socket.socket, rank: int, timeout_s: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Non-blocking: one thread sends and receives at once (both sides send megabytes, past
        # the sockets' buffers); a sender thread cost a wake-up and a GIL hand-over each time.
        sock.setblocking(False)
        self._sock, self._peer, self._timeout_s = sock, 1 - rank, timeout_s

    def exchange(self, mine: torch.Tensor) -> torch.Tensor:
        """The peer's tensor of the same shape, for ours (contiguous int64 on the CPU)."""
        theirs = torch.empty_like(mine)
        try:
            self._swap(mine.numpy().data.cast("B"), theirs.numpy().data.cast("B"))
        except OSError as exc:
            raise self._failed(exc) from exc
        return theirs

    def _swap(self, out: memoryview, into: memoryview) -> None:
        sent = got = 0
        while sent < len(out) or got < len(into):
            before = sent + got
            if sent < len(out):
                with contextlib.suppress(BlockingIOError):
                    sent += self._sock.send(out[sent:])
            if got < len(into):
                with contextlib.suppress(BlockingIOError):
                    n = self._sock.recv_into(into[got:])
                    if n == 0:
                        raise ConnectionError(f"party {self._peer} closed the link mid-opening")
                    got += n
            if sent + got == before:
                self._await(reading=got < len(into), writing=sent < len(out))

    def _await(self, *, reading: bool, writing: bool) -> None:
        ready = select.select(
            [self._sock] if reading else [], [self._sock] if writing else [], [], self._timeout_s
        )
        if not ready[0] and not ready[1]:
            raise TimeoutError

    def _failed(self, exc: BaseException) -> OSError:
        if isinstance(exc, TimeoutError):
            return TimeoutError(
                f"no word from party {self._peer} in an opening within {self._timeout_s:.0f} s"
            )
        return ConnectionError(f"the link to party {self._peer} failed in an opening: {exc}")

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


_current: PeerLink | None = None
_dealer: DealerClient | None = None


def connect(rank: int, rendezvous: str, timeout_s: float, group: Any) -> None:
    """Party 1 listens, party 0 connects; `group` is the parties' gloo group (ranks 0 and 1).
    The link serves `current()` until `disconnect`."""
    global _current  # noqa: PLW0603 - one link per party process, as one gloo world
    peer = 1 - rank
    if rank == 1:
        sock = _accept(rendezvous, timeout_s, group, peer)
    else:
        sock = _dial(timeout_s, group, peer)
    _current = PeerLink(sock, rank, timeout_s)


def current() -> PeerLink | None:
    """This process's link to the other party, if a two-party session made one."""
    return _current


def dial_dealer(timeout_s: float, group: Any, dealer_rank: int) -> None:
    """Party 0's link to the dealer for triple requests and answers (`dealer()`)."""
    global _dealer  # noqa: PLW0603 - one dealer link per party-0 process
    _dealer = DealerClient(_dial(timeout_s, group, dealer_rank), timeout_s)


def dealer() -> DealerClient | None:
    """Party 0's link to the dealer, if its session made one."""
    return _dealer


def accept_party0(rendezvous: str, timeout_s: float, group: Any) -> DealerServer:
    """The dealer's end of party 0's link (the dealer is the last rank of `group`)."""
    return DealerServer(_accept(rendezvous, timeout_s, group, 0), timeout_s)


def disconnect() -> None:
    """Close this process's links (the session's end); the dealer is told to go back to gloo."""
    global _current, _dealer  # noqa: PLW0603
    if _current is not None:
        _current.close()
        _current = None
    if _dealer is not None:
        _dealer.close()
        _dealer = None


def _accept(rendezvous: str, timeout_s: float, group: Any, peer: int) -> socket.socket:
    with socket.create_server((_local_address(rendezvous), 0)) as server:
        server.settimeout(timeout_s)
        host, port = server.getsockname()[:2]
        _send_bytes(f"{host} {port}".encode(), _ADDRESS_BYTES, group, peer)
        expected = _recv_bytes(_NONCE_BYTES, group, peer)
        return await_peer(server, expected, timeout_s)


def await_peer(server: socket.socket, expected: bytes, timeout_s: float) -> socket.socket:
    """The first connection to `server` that sends `expected` first; others are closed. Raises
    TimeoutError if none has within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            server.settimeout(max(left, 1e-3))
            sock, _ = server.accept()
        except TimeoutError:
            raise TimeoutError(
                f"party 0 did not connect to the parties' link within {timeout_s:.0f} s"
            ) from None
        try:
            if _proves(sock, expected, min(left, _PROOF_S)):
                return sock
        except OSError:
            pass  # a stranger that stalled or reset: not party 0, keep waiting for it
        sock.close()


def _proves(sock: socket.socket, expected: bytes, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    got = b""
    while len(got) < _NONCE_BYTES:
        chunk = sock.recv(_NONCE_BYTES - len(got))
        if not chunk:
            return False
        got += chunk
    return hmac.compare_digest(got, expected)


def _dial(timeout_s: float, group: Any, peer: int) -> socket.socket:
    host, port = _recv_bytes(_ADDRESS_BYTES, group, peer).decode().split()
    nonce = secrets.token_bytes(_NONCE_BYTES)
    _send_bytes(nonce, _NONCE_BYTES, group, peer)
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.sendall(nonce)
    return sock


def _local_address(rendezvous: str) -> str:
    """The address of this host's interface toward the rendezvous host (where the peer is
    known to reach this party); 127.0.0.1 for a local or file rendezvous."""
    host = urlsplit(rendezvous).hostname
    if not host or host in {"localhost", "127.0.0.1"}:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # a UDP connect sends nothing; it only picks the route
        return str(probe.getsockname()[0])


def _send_bytes(data: bytes, size: int, group: Any, peer: int) -> None:
    padded = torch.zeros(size + 1, dtype=torch.uint8)
    padded[0] = len(data)
    padded[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.send(padded, peer, group=group)


def _recv_bytes(size: int, group: Any, peer: int) -> bytes:
    padded = torch.zeros(size + 1, dtype=torch.uint8)
    dist.recv(padded, peer, group=group)
    return bytes(padded[1 : 1 + int(padded[0])].tolist())


# ------------------------------------------------------------------------------- the dealer

_LENGTH = struct.Struct("<Q")
"""A request frame: its length in 8 bytes, then the JSON request; length 0 ends the link."""


def _receive_exactly(sock: socket.socket, into: memoryview, who: str) -> None:
    got = 0
    while got < len(into):
        n = sock.recv_into(into[got:])
        if n == 0:
            raise ConnectionError(f"{who} closed the dealer's link mid-message")
        got += n


class DealerClient:
    """Party 0's end: requests go out as frames, and answers are read in order when one is
    waited for, each into the tensor its request named, so party 0 can post, open and only then
    wait. Requests are a few hundred bytes: posting never blocks on an unread answer."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout_s)
        self._sock, self._timeout_s = sock, timeout_s
        self._unread: collections.deque[torch.Tensor] = collections.deque()
        self._posted = self._read = 0

    def post(self, request: bytes, into: torch.Tensor) -> Callable[[], None]:
        """Send a request; the returned call waits until `into` holds the dealer's answer."""
        try:
            self._sock.sendall(_LENGTH.pack(len(request)) + request)
        except OSError as exc:
            raise ConnectionError(f"the dealer's link failed sending a request: {exc}") from exc
        self._unread.append(into)
        ticket = self._posted
        self._posted += 1

        def wait() -> None:
            while self._read <= ticket:
                self._read_next()

        return wait

    def _read_next(self) -> None:
        into = self._unread.popleft()
        try:
            _receive_exactly(self._sock, into.numpy().data.cast("B"), "the dealer")
        except TimeoutError:
            raise TimeoutError(
                f"no answer from the dealer within {self._timeout_s:.0f} s"
            ) from None
        except OSError as exc:
            raise ConnectionError(f"the dealer's link failed: {exc}") from exc
        self._read += 1

    def close(self) -> None:
        """Tell the dealer the link ends (it goes back to gloo for CrypTen's shutdown), reading
        the answers nobody waited for so that the dealer is not left blocked sending them."""
        with contextlib.suppress(OSError):  # the dealer is gone already: CrypTen's shutdown says
            self._sock.sendall(_LENGTH.pack(0))
            while self._unread:
                self._read_next()
        self._sock.close()


class DealerServer:
    """The dealer's end: `requests` yields each request's bytes until party 0 ends the link."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout_s)
        self._sock = sock

    def requests(self, limit: int) -> Iterator[bytes]:
        """Each request frame's payload (at most `limit` bytes), until the end frame."""
        header = bytearray(_LENGTH.size)
        while True:
            _receive_exactly(self._sock, memoryview(header), "party 0")
            (length,) = _LENGTH.unpack(header)
            if length == 0:
                return
            if length > limit:
                raise ConnectionError(f"party 0 sent a {length}-byte request; at most {limit}")
            payload = bytearray(length)
            _receive_exactly(self._sock, memoryview(payload), "party 0")
            yield bytes(payload)

    def answer(self, result: torch.Tensor) -> None:
        """Send an answer's words (party 0 knows its size from the request)."""
        self._sock.sendall(result.contiguous().numpy().data.cast("B"))

    def close(self) -> None:
        """Close the dealer's end."""
        self._sock.close()
