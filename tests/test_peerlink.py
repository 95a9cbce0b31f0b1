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


def _dealer_pair(timeout_s: float = 5.0) -> tuple[peerlink.DealerClient, peerlink.DealerServer]:
    party0, dealer = _tcp_pair()
    return peerlink.DealerClient(party0, timeout_s), peerlink.DealerServer(dealer, timeout_s)


def test_answers_land_in_order_while_party_0_waits_out_of_order() -> None:
    # Party 0 posts two requests before it waits for either; each answer is 2 MiB, past the
    # sockets' buffers, so a party 0 that read only when it waited would stall the dealer.
    client, server = _dealer_pair()
    answers = [torch.arange(1 << 18) * k for k in (3, 5)]

    def serve() -> None:
        for request, answer in zip(server.requests(1024), answers, strict=False):
            assert request in (b'{"n":0}', b'{"n":1}')
            server.answer(answer)

    dealer = threading.Thread(target=serve)
    dealer.start()
    results = [torch.empty(1 << 18, dtype=torch.int64) for _ in answers]
    waits = [client.post(f'{{"n":{k}}}'.encode(), results[k]) for k in range(2)]
    waits[1]()
    waits[0]()
    assert all(torch.equal(r, a) for r, a in zip(results, answers, strict=True))
    client.close()  # the end frame: the dealer's loop returns
    dealer.join(5)
    assert not dealer.is_alive()
    server.close()


def test_an_oversized_request_is_refused_by_the_dealer() -> None:
    client, server = _dealer_pair()
    client.post(b"x" * 2048, torch.empty(1, dtype=torch.int64))
    with pytest.raises(ConnectionError, match="2048-byte request; at most 1024"):
        next(server.requests(1024))
    server.close()
    client.close()


def test_a_dealer_that_vanishes_fails_party_0s_wait_by_name() -> None:
    client, server = _dealer_pair()
    wait = client.post(b"{}", torch.empty(1024, dtype=torch.int64))
    next(server.requests(1024))
    server.close()  # gone without an answer
    with pytest.raises(ConnectionError, match="the dealer's link failed: the dealer closed"):
        wait()
    client.close()


def test_a_silent_dealer_times_out() -> None:
    client, server = _dealer_pair(timeout_s=0.3)
    wait = client.post(b"{}", torch.empty(4, dtype=torch.int64))
    with pytest.raises(TimeoutError, match="no answer from the dealer"):
        wait()
    server.close()
    client.close()
