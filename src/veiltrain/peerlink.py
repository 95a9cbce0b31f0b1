"""A direct TCP link between the two compute parties, for opening masked values.

Every Beaver product, comparison gate and B2A opens masked words (x - a, x ^ a) between the two
parties. Through gloo an exchange of a few words took 386 us and of 2 MiB each way 6.2 ms here;
on one plain TCP connection 94 us and 1.4 ms (gloo's unbound buffers add a handshake per message
and a hop through its I/O thread). A ResNet-style step opens about 280 times, so the parties open
over this link and keep gloo for everything else (the dealer, CrypTen's own collectives).

The link carries exactly what gloo carried (masked words only) and is bound to the gloo peer:
party 1 listens on an ephemeral port and sends its address to party 0 over gloo; party 0 sends a
random 16-byte nonce over gloo and then over the new connection, and party 1 accepts the
connection only if the two agree. Whoever could not read gloo's traffic cannot take party 0's
place on the link; whoever could, learns nothing here that gloo did not already carry. No
encryption, as with gloo: the parties' network is assumed private (see the README's threat model).
"""

from __future__ import annotations

import hmac
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

_NONCE_BYTES = 16
_ADDRESS_BYTES = 255  # the length goes in one byte
_PROOF_S = 5.0
"""How long a new connection has to send the nonce (party 0 sends it at once)."""
_DIRECT_BYTES = 1 << 15
"""Exchanges up to this size are sent then received on one thread: both fit the sockets' buffers,
so neither side can block in its send waiting for the other to receive."""


class PeerLink:
    """One connected socket to the other party; `exchange` sends ours and returns theirs."""

    def __init__(self, sock: socket.socket, rank: int, timeout_s: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout_s)
        self._sock, self._peer, self._timeout_s = sock, 1 - rank, timeout_s
        # Large exchanges send on this thread while the caller receives (full duplex).
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="veiltrain-peerlink")
        self._lock = threading.Lock()

    def exchange(self, mine: torch.Tensor) -> torch.Tensor:
        """The peer's tensor of the same shape, for ours (contiguous int64 on the CPU)."""
        theirs = torch.empty_like(mine)
        out = mine.numpy().data.cast("B")
        into = theirs.numpy().data.cast("B")
        with self._lock:
            try:
                self._swap(out, into)
            except (TimeoutError, OSError) as exc:
                raise self._failed(exc) from exc
        return theirs

    def _swap(self, out: memoryview, into: memoryview) -> None:
        if len(out) <= _DIRECT_BYTES:
            self._sock.sendall(out)
            self._receive(into)
            return
        sending = self._sender.submit(self._sock.sendall, out)
        self._receive(into)
        sending.result(timeout=self._timeout_s)

    def _receive(self, into: memoryview) -> None:
        got = 0
        while got < len(into):
            n = self._sock.recv_into(into[got:])
            if n == 0:
                raise ConnectionError(f"party {self._peer} closed the link mid-opening")
            got += n

    def _failed(self, exc: BaseException) -> OSError:
        if isinstance(exc, TimeoutError):
            return TimeoutError(
                f"no word from party {self._peer} in an opening within {self._timeout_s:.0f} s"
            )
        return ConnectionError(f"the link to party {self._peer} failed in an opening: {exc}")

    def close(self) -> None:
        """Close the socket and stop the sender thread."""
        self._sender.shutdown(wait=False, cancel_futures=True)
        self._sock.close()


_current: PeerLink | None = None


def connect(rank: int, rendezvous: str, timeout_s: float, group: Any) -> None:
    """Party 1 listens, party 0 connects; `group` is the parties' gloo group (ranks 0 and 1).
    The link serves `current()` until `disconnect`."""
    global _current  # noqa: PLW0603 - one link per party process, as one gloo world
    _current = _accept(rendezvous, timeout_s, group) if rank == 1 else _dial(timeout_s, group)


def current() -> PeerLink | None:
    """This process's link to the other party, if a two-party session made one."""
    return _current


def disconnect() -> None:
    """Close the link (the session's end)."""
    global _current  # noqa: PLW0603
    if _current is not None:
        _current.close()
        _current = None


def _accept(rendezvous: str, timeout_s: float, group: Any) -> PeerLink:
    with socket.create_server((_local_address(rendezvous), 0)) as server:
        server.settimeout(timeout_s)
        host, port = server.getsockname()[:2]
        _send_bytes(f"{host} {port}".encode(), _ADDRESS_BYTES, group)
        expected = _recv_bytes(_NONCE_BYTES, group)
        return PeerLink(await_peer(server, expected, timeout_s), 1, timeout_s)


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


def _dial(timeout_s: float, group: Any) -> PeerLink:
    host, port = _recv_bytes(_ADDRESS_BYTES, group).decode().split()
    nonce = secrets.token_bytes(_NONCE_BYTES)
    _send_bytes(nonce, _NONCE_BYTES, group)
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.sendall(nonce)
    return PeerLink(sock, 0, timeout_s)


def _local_address(rendezvous: str) -> str:
    """The address of this host's interface toward the rendezvous host (where the peer is
    known to reach this party); 127.0.0.1 for a local or file rendezvous."""
    host = urlsplit(rendezvous).hostname
    if not host or host in {"localhost", "127.0.0.1"}:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # a UDP connect sends nothing; it only picks the route
        return str(probe.getsockname()[0])


def _send_bytes(data: bytes, size: int, group: Any) -> None:
    padded = torch.zeros(size + 1, dtype=torch.uint8)
    padded[0] = len(data)
    padded[1 : 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.send(padded, 1 - dist.get_rank(), group=group)  # the parties are global ranks 0, 1


def _recv_bytes(size: int, group: Any) -> bytes:
    padded = torch.zeros(size + 1, dtype=torch.uint8)
    dist.recv(padded, 1 - dist.get_rank(), group=group)
    return bytes(padded[1 : 1 + int(padded[0])].tolist())
