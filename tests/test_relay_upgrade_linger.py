"""A relayed peer with a known direct address is dialled there; a relay that closes
keeps relaying while circuits through it are in use (p2pfl/transport/_nat.py).

On 127.0.0.1: a relay R, a peer A that acts as unreachable (``reachability =
"private"``: it reserves a slot on R) and a peer B that dials A through R. Hole punching
(DCUtR) is off in both tests, so nothing but the behaviour under test changes how they
are connected.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.resources import RelayLimits

from p2pfl.transport._nat import connection_kind
from p2pfl.transport.libp2p import PROTOCOL_ID, Libp2pTransport
from tests.transport_kit import Factory, Inbox, eventually, nat_transports_fixture

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LIMITS = RelayLimits(duration=600, data=64 << 20, max_circuit_conns=8, max_reservations=8)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


make = nat_transports_fixture(punch_grace=60.0, hole_punching=False)


def relayed_addr(transport: Libp2pTransport) -> str | None:
    return next((a for a in transport.listen_addrs if "/p2p-circuit" in a), None)


def connection_kinds_to(transport: Libp2pTransport, peer: str) -> list[str]:
    """The kind of every open connection of ``transport`` to ``peer``."""

    def read() -> list[str]:
        assert transport._host is not None
        conns = transport._host.get_network().get_connections(ID.from_base58(peer))
        return sorted(connection_kind(c) for c in conns if not getattr(c, "is_closed", False))

    assert transport._bridge is not None
    return transport._bridge.run_sync(read)


async def through_relay(
    make: Factory, *, upgrade: bool, linger: float = 0.0
) -> tuple[Libp2pTransport, Libp2pTransport, Libp2pTransport, Inbox]:
    relay = await make(reachability="public", relay=True, limits=LIMITS, linger=linger)
    inbox = Inbox()
    a = await make(inbox, reachability="private", direct_upgrade=upgrade)
    b = await make(reachability="public", direct_upgrade=upgrade)
    await a.connect(relay.listen_addrs[0], timeout=5)
    circuit = await eventually(lambda: relayed_addr(a), 15, "A advertises a relayed address")
    assert await b.connect(circuit, timeout=10) == a.peer_id
    return relay, a, b, inbox


async def test_a_relayed_peer_with_a_known_direct_address_is_dialled_there(make: Factory) -> None:
    """Two nodes of one home that met through the relayed address first: the direct
    address (from identify) is dialled although a connection exists, and the next
    message takes the direct connection."""
    relay, a, b, inbox = await through_relay(make, upgrade=True)
    await eventually(
        lambda: b.connection_kinds().get(a.peer_id) == "direct", 10, "B dials A directly"
    )
    assert a.connection_kinds().get(b.peer_id) == "direct"
    assert "direct" in connection_kinds_to(b, a.peer_id)
    await b.send(a.peer_id, b"the direct way", timeout=10)
    assert await inbox.get() == (b.peer_id, b"the direct way")

    def kept() -> list[str]:
        peer = ID.from_base58(a.peer_id)

        def read() -> list[str]:
            return [connection_kind(s.muxed_conn) for s, _ in b._idle.get(peer, [])]  # type: ignore[arg-type]

        assert b._bridge is not None
        return b._bridge.run_sync(read)

    assert kept() == ["direct"]


async def test_without_the_upgrade_the_connection_stays_relayed(make: Factory) -> None:
    """The control: the same pair with the upgrade off is still relayed after the time
    the upgrade takes above (so the test above is about the upgrade, not DCUtR)."""
    relay, a, b, inbox = await through_relay(make, upgrade=False)
    await b.send(a.peer_id, b"relayed", timeout=10)
    assert await inbox.get() == (b.peer_id, b"relayed")
    for _ in range(20):  # two NAT traversal ticks and more
        await asyncio.sleep(0.1)
    assert connection_kinds_to(b, a.peer_id) == ["relayed"]


async def test_a_relay_that_closes_keeps_relaying_while_circuits_are_in_use(make: Factory) -> None:
    """A training node that relays finishes its run first: its close waits for the
    circuits that carry the others' last models, then returns once they close."""
    relay, a, b, inbox = await through_relay(make, upgrade=False, linger=30.0)
    await b.send(a.peer_id, b"before", timeout=10)
    assert await inbox.get() == (b.peer_id, b"before")
    began = time.monotonic()
    closing = asyncio.create_task(relay.close())
    assert relay._stop is not None
    await eventually(lambda: relay._stop is not None and relay._stop.is_set(), 5, "R stops")
    big = bytes(range(256)) * 4096  # 1 MiB through the circuit while R is closing
    await b.send(a.peer_id, big, timeout=10)
    assert await inbox.get() == (b.peer_id, big)
    assert not closing.done()
    await b.close()  # the circuit ends with its peer: R's close returns, long before 30 s
    await asyncio.wait_for(closing, 10)
    assert time.monotonic() - began < 20


async def test_a_send_whose_relayed_connection_is_retired_under_it_goes_on_directly(
    make: Factory,
) -> None:
    """py-libp2p closes a relayed connection once a direct one exists (DCUtR after its
    grace, the swarm at once when the relayed one is older than 20 s): a frame still on
    the relayed one is sent again on the direct one instead of failing the send (which
    made the node stop waiting for that neighbour in the round)."""
    from multiaddr import Multiaddr

    relay, a, b, inbox = await through_relay(make, upgrade=False)
    peer = ID.from_base58(a.peer_id)
    direct = Multiaddr(a.listen_addrs[0].partition("/p2p/")[0])
    host = b._host
    assert host is not None and b._bridge is not None
    network = host.get_network()
    relayed = [c for c in network.get_connections(peer)]
    assert [connection_kind(c) for c in relayed] == ["relayed"]

    async def retire_relayed() -> None:  # on B's trio thread, while the frame is under way
        await network.dial_addr(direct, peer)
        for conn in relayed:
            await conn.close()

    def frames_under_way() -> int:  # our protocol's streams on the relayed connection
        def read() -> int:
            streams = relayed[0].get_streams()
            return sum(1 for s in streams if s.get_protocol() == PROTOCOL_ID)

        assert b._bridge is not None
        return b._bridge.run_sync(read)

    big = bytes(range(256)) * (64 * 1024)  # 16 MiB: still on the relayed connection below
    sending = asyncio.create_task(b.send(a.peer_id, big, timeout=30))
    await eventually(frames_under_way, 5, "the frame's stream opens on the relayed connection")
    assert not sending.done()
    await b._bridge.run(retire_relayed)
    await sending  # raises TransportError if the frame died with the relayed connection
    sender, data = await inbox.get(timeout=20)
    assert (sender, data == big) == (b.peer_id, True)
    assert connection_kinds_to(b, a.peer_id) == ["direct"]


async def test_a_peer_that_leaves_cuts_only_its_own_circuits(make: Factory) -> None:
    """py-libp2p's relay closed the streams stored under a peer's id when any circuit of
    that peer ended: C leaving cut the circuit between B and A (A the destination of
    both). Two nodes still training lost their last models that way."""
    relay = await make(reachability="public", relay=True, limits=LIMITS)
    inbox = Inbox()
    a = await make(inbox, reachability="private")
    b = await make(reachability="public")
    c = await make(reachability="public")
    await a.connect(relay.listen_addrs[0], timeout=5)
    circuit = await eventually(lambda: relayed_addr(a), 15, "A advertises a relayed address")
    assert await c.connect(circuit, timeout=10) == a.peer_id
    assert await b.connect(circuit, timeout=10) == a.peer_id  # the last circuit stored under A
    await b.send(a.peer_id, b"before", timeout=10)
    assert await inbox.get() == (b.peer_id, b"before")
    assert b._host is not None and relay._bridge is not None
    (b_to_a,) = b._host.get_network().get_connections(ID.from_base58(a.peer_id))

    def circuits() -> int:
        def read() -> int:
            nat = relay._nat
            return nat.circuits_in_use() if nat is not None else -1

        assert relay._bridge is not None
        return relay._bridge.run_sync(read)

    assert circuits() == 2
    await c.close()
    await eventually(lambda: circuits() == 1, 10, "C's circuit ends at the relay")
    await b.send(a.peer_id, b"after", timeout=10)
    assert await inbox.get() == (b.peer_id, b"after")
    assert not b_to_a.is_closed  # the same relayed connection: not cut, not dialled again
