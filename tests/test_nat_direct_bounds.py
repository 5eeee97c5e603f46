"""The direct upgrade's bounds against a peer that advertises without end
(p2pfl/transport/_nat.py, ``NatTraversal._untried_direct``).

A relayed peer's direct addresses come from what it (or anyone) put in our peerstore:
identify, peer exchange, the DHT. A hostile peer can advertise thousands; the upgrade
dials at most ``_DIRECT_ADDRS_PER_PEER`` of them per peer, ever, skips relayed, non-TCP
and our own addresses, and remembers at most ``_DIRECT_PEERS`` peers.
"""

from __future__ import annotations

import pytest
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from p2pfl.transport import _nat
from p2pfl.transport._nat import NatSettings, NatTraversal


def traversal() -> NatTraversal:
    host = new_host(key_pair=create_new_key_pair(b"\x01" * 32))
    return NatTraversal(host, NatSettings(reachability="private"), lambda addrs: None)


def peer(number: int) -> ID:
    return ID.from_pubkey(create_new_key_pair(number.to_bytes(32, "big")).public_key)


def test_a_peer_advertising_thousands_of_addresses_is_dialled_at_most_eight_times() -> None:
    nat = traversal()
    flooder = peer(7)
    store = nat.host.get_peerstore()
    junk = [f"/ip4/10.0.{i // 250}.{i % 250}/tcp/4001" for i in range(2000)]
    store.add_addrs(flooder, [Multiaddr(a) for a in junk], 600)
    first = nat._untried_direct(flooder)
    assert len(first) == _nat._DIRECT_ADDRS_PER_PEER == 8
    assert len({str(a) for a in first}) == 8  # eight different ones
    for _ in range(50):  # later ticks, and more addresses: nothing more for that peer
        store.add_addrs(flooder, [Multiaddr(f"/ip4/10.9.9.{i}/tcp/4001") for i in range(100)], 600)
        assert nat._untried_direct(flooder) == []
    assert len(nat._direct_tried[flooder]) == 8


def test_relayed_non_tcp_and_loopback_addresses_are_never_dialled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nat = traversal()
    other = peer(8)
    relay = peer(9)
    store = nat.host.get_peerstore()
    skipped = [
        f"/ip4/203.0.113.5/tcp/4001/p2p/{relay}/p2p-circuit",  # through a relay
        "/ip4/203.0.113.6/udp/4001/quic-v1",  # not TCP
        "/ip4/127.0.0.1/tcp/4001",  # loopback, while this host listens elsewhere
        "/ip6/::1/tcp/4001",
    ]
    store.add_addrs(other, [Multiaddr(a) for a in [*skipped, "/ip4/203.0.113.7/tcp/4001"]], 600)
    # not loopback only
    monkeypatch.setattr(nat.host, "get_addrs", lambda: [Multiaddr("/ip4/192.0.2.1/tcp/4001")])
    assert [str(a) for a in nat._untried_direct(other)] == ["/ip4/203.0.113.7/tcp/4001"]
    assert nat._untried_direct(other) == []  # each at most once


def test_our_own_address_is_not_dialled_as_someone_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two homes' nodes may share a private address and port: dialling it reaches us."""
    nat = traversal()
    other = peer(10)
    mine = "/ip4/192.168.1.20/tcp/4001"
    monkeypatch.setattr(nat.host, "get_addrs", lambda: [Multiaddr(f"{mine}/p2p/{nat.me}")])
    nat.host.get_peerstore().add_addrs(other, [Multiaddr(mine), Multiaddr("/ip4/192.168.1.21/tcp/4001")], 600)
    assert [str(a) for a in nat._untried_direct(other)] == ["/ip4/192.168.1.21/tcp/4001"]


def test_many_relayed_peers_are_remembered_up_to_the_bound() -> None:
    """Peers the peerstore does not know (never identified, or their addresses expired:
    py-libp2p raises for those) get nothing to dial, and end no background task."""
    nat = traversal()
    limit = 64
    original = _nat._DIRECT_PEERS
    _nat._DIRECT_PEERS = limit  # the bound's logic, at a size a test can fill quickly
    try:
        for number in range(limit * 3):
            nat._untried_direct(peer(1000 + number))
            assert len(nat._direct_tried) <= limit
    finally:
        _nat._DIRECT_PEERS = original
    assert len(nat._direct_tried) == limit
    assert peer(1000 + limit * 3 - 1) in nat._direct_tried  # the newest kept, the oldest gone
    assert peer(1000) not in nat._direct_tried
