"""veiltrain.peerlink: the parties' own link for openings, its failures and who may take it.

The link between real parties is exercised by every two-party test (test_signbits, test_chains,
test_secrecy's openings attack, the training runs); these tests drive its sockets directly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from veiltrain import peerlink


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        left = socket.create_connection(server.getsockname())
        right, _ = server.accept()
    return left, right


@pytest.fixture
def pair() -> Iterator[tuple[peerlink.PeerLink, peerlink.PeerLink]]:
    left, right = _tcp_pair()
    links = peerlink.PeerLink(left, 0, 5.0), peerlink.PeerLink(right, 1, 5.0)
    yield links
    for link in links:
        link.close()


def _both(
    links: tuple[peerlink.PeerLink, peerlink.PeerLink], mine: torch.Tensor, theirs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    peer = threading.Thread(target=lambda: got.update(right=links[1].exchange(theirs)))
    peer.start()
    got["left"] = links[0].exchange(mine)
    peer.join(10)
    return got["left"], got["right"]


@pytest.mark.parametrize("words", [0, 1, 8, 1 << 12, 1 << 20])
def test_each_side_gets_the_others_words(pair: tuple, words: int) -> None:
    # 1M words each way is past both sockets' buffers: the sides must send and receive at once.
    mine = torch.randint(-(2**62), 2**62, (words,))
    theirs = torch.randint(-(2**62), 2**62, (words,))
    left, right = _both(pair, mine, theirs)
    assert torch.equal(left, theirs) and torch.equal(right, mine)


def test_a_silent_peer_times_out_by_name() -> None:
    left, right = _tcp_pair()
    link = peerlink.PeerLink(left, 0, 0.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no word from party 1 in an opening within 0 s"):
        link.exchange(torch.zeros(4, dtype=torch.int64))
    assert time.monotonic() - started < 5
    link.close()
    right.close()


def test_a_peer_that_closes_fails_the_opening_by_name() -> None:
    left, right = _tcp_pair()
    link = peerlink.PeerLink(left, 1, 5.0)
    right.close()
    with pytest.raises(ConnectionError, match="party 0"):
        link.exchange(torch.zeros(4, dtype=torch.int64))
    link.close()


def test_only_the_connection_with_the_nonce_is_taken() -> None:
    # The attack: a process that can reach party 1's port connects first, silent or with a
    # guess, to take party 0's place in the openings. Party 1 waits for the nonce party 0 sent
    # over gloo, and keeps waiting for the real party 0.
    nonce = b"n" * 16
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()
        guesser = socket.create_connection(address)
        guesser.sendall(b"x" * 16)
        silent = socket.create_connection(address)
        silent.close()
        real = socket.create_connection(address)
        real.sendall(nonce + b"after")
        taken = peerlink.await_peer(server, nonce, 10.0)
        assert taken.recv(5) == b"after"
        for sock in (taken, guesser, real):
            sock.close()


def test_no_connection_times_out() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        pytest.raises(TimeoutError, match="party 0 did not connect"),
    ):
        peerlink.await_peer(server, b"n" * 16, 0.3)


def test_the_link_listens_where_the_rendezvous_is_reached() -> None:
    assert peerlink._local_address("tcp://127.0.0.1:29500") == "127.0.0.1"
    assert peerlink._local_address("file:///tmp/rendezvous") == "127.0.0.1"
