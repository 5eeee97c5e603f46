"""NAT traversal on 127.0.0.1: a relay R, a peer A that acts as unreachable, a peer B.

A is told (``reachability = "private"``) that it is behind NAT: it reserves a slot on R
and advertises its address through R; B dials that address, and payloads go both ways.
With hole punching off the connection stays relayed (and says so); with it on, DCUtR
turns it into a direct one. AutoNAT tells a peer that R can reach that it is public.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from libp2p.relay.circuit_v2.resources import RelayLimits

from p2pfl.transport.base import TransportError
from p2pfl.transport.libp2p import Libp2pTransport
from tests.transport_kit import Factory, Inbox, eventually, nat_transports

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]



@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    async for factory in nat_transports(punch_grace=2.0):
        yield factory


def relayed_addr(transport: Libp2pTransport) -> str | None:
    return next((a for a in transport.listen_addrs if "/p2p-circuit" in a), None)


RELAY_LIMITS = RelayLimits(duration=600, data=8 << 20, max_circuit_conns=8, max_reservations=8)


async def relay_pair(make: Factory, *, punch: bool) -> tuple[Any, ...]:
    relay = await make(reachability="public", relay=True, limits=RELAY_LIMITS)
    inbox_a, inbox_b = Inbox(), Inbox()
    a = await make(inbox_a, reachability="private", hole_punching=punch)
    b = await make(inbox_b, reachability="public", hole_punching=punch)
    await a.connect(relay.listen_addrs[0], timeout=5)
    circuit = await eventually(lambda: relayed_addr(a), 15, "A advertises a relayed address")
    assert circuit.startswith(relay.listen_addrs[0].partition("/p2p/")[0])
    assert circuit.endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{a.peer_id}")
    assert await b.connect(circuit, timeout=10) == a.peer_id
    return relay, a, b, inbox_a, inbox_b


async def test_an_unreachable_peer_is_reached_through_the_relay(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfl.transport.nat")
    relay, a, b, inbox_a, inbox_b = await relay_pair(make, punch=False)
    assert b.connection_kinds()[a.peer_id] == "relayed"
    assert a.connection_kinds()[b.peer_id] == "relayed"
    assert b.connection_kinds()[relay.peer_id] == "direct"
    await b.send(a.peer_id, b"over the relay", timeout=10)
    assert await inbox_a.get() == (b.peer_id, b"over the relay")
    assert kept_stream_kinds(b, a.peer_id) == ["relayed"]
    big = bytes(range(256)) * 4096  # 1 MiB: several yamux windows through the circuit
    await a.send(b.peer_id, big, timeout=20)
    assert await inbox_b.get() == (a.peer_id, big)
    assert a.reachability() == "private"
    assert b.connection_kinds()[a.peer_id] == "relayed"

    def stays_relayed() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "stays relayed" in r.getMessage()
        ]

    await eventually(lambda: len(stays_relayed()) >= 2, 10, "one warning on each side")
    assert len(stays_relayed()) == 2  # one line per peer, not one per tick
    assert any(f"connection to {a.peer_id}: relayed" in r.getMessage() for r in caplog.records)
    # A's relay carries 8 MiB per connection, less than A's largest message: A says so
    small = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "carries at most 8388608" in r.getMessage()
    ]
    assert len(small) == 1 and "cannot reach this node through it" in small[0]


async def test_hole_punching_turns_a_relayed_connection_direct(make: Factory) -> None:
    relay, a, b, inbox_a, _ = await relay_pair(make, punch=True)
    await b.send(a.peer_id, b"first", timeout=10)
    assert await inbox_a.get() == (b.peer_id, b"first")
    await eventually(
        lambda: b.connection_kinds().get(a.peer_id) == "direct", 30, "DCUtR upgrades B-A"
    )
    await eventually(
        lambda: a.connection_kinds().get(b.peer_id) == "direct", 10, "A sees it direct too"
    )
    await b.send(a.peer_id, b"second", timeout=10)
    assert await inbox_a.get() == (b.peer_id, b"second")
    assert kept_stream_kinds(b, a.peer_id) == ["direct"]  # the model went the direct way


def kept_stream_kinds(transport: Libp2pTransport, peer: str) -> list[str]:
    """How the connections under ``transport``'s kept streams to ``peer`` reach it."""
    from libp2p.peer.id import ID

    from p2pfl.transport._nat import connection_kind

    def read() -> list[str]:
        assert transport._host is not None
        peer_id = ID.from_base58(peer)
        conns = transport._host.get_network().get_connections(peer_id)
        kind = {id(c.muxed_conn): connection_kind(c) for c in conns}
        return [kind[id(s.muxed_conn)] for s, _ in transport._idle.get(peer_id, [])]

    assert transport._bridge is not None
    return transport._bridge.run_sync(read)


async def test_autonat_finds_a_peer_the_relay_can_reach_public(make: Factory) -> None:
    relay = await make(reachability="public", relay=True)
    c = await make(reachability="auto")
    assert c.reachability() == "unknown"
    await c.connect(relay.listen_addrs[0], timeout=5)
    await eventually(lambda: c.reachability() == "public", 15, "AutoNAT verdict")
    assert relayed_addr(c) is None  # reachable: no reservation, no relayed address


async def test_a_circuit_the_relay_cuts_at_its_data_limit_is_dialled_again(make: Factory) -> None:
    limits = RelayLimits(duration=600, data=3 << 20, max_circuit_conns=8, max_reservations=8)
    relay = await make(reachability="public", relay=True, limits=limits)
    inbox = Inbox()
    a = await make(inbox, reachability="private", hole_punching=False)
    b = await make(reachability="public", hole_punching=False)
    await a.connect(relay.listen_addrs[0], timeout=5)
    circuit = await eventually(lambda: relayed_addr(a), 15, "A advertises a relayed address")
    await b.connect(circuit, timeout=10)
    chunk = bytes(1 << 20)
    delivered = failed = 0
    for attempt in range(8):  # 8 MiB through a relay that cuts each circuit after 3 MiB
        try:
            await b.send(a.peer_id, chunk + bytes([attempt]), timeout=10)
        except TransportError:
            failed += 1  # the frame the relay cut: the node's send fails, the next redials
            continue
        delivered += 1
        sender, data = await inbox.get()
        assert (sender, data[-1]) == (b.peer_id, attempt)
    assert delivered >= 5 and failed >= 1  # (2 delivered, 1 cut, 2, 1 cut, 2 on loopback)
    assert b.connection_kinds()[a.peer_id] == "relayed"
