"""A connection that arrives through a circuit relay and never starts its handshake
(helper w3).

The last red-team pass saw an idle circuit that seemed to stay open on the destination
side. Measured here: the destination upgrades a relay's STOP stream with the same swarm
method as a direct TCP connection (``Swarm.upgrade_inbound_raw_conn``), under the same
``inbound_upgrade_timeout`` (10 s by default), and closes it at that deadline; the STOP
stream then leaves the relay's share of the stream bounds. What was missing was a trace:
such cuts are now counted (``handshakes_cut``), direct and relayed alike. The tests
shorten the timeout to 2 s to stay fast.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from libp2p.peer.id import ID

from p2pfl.transport.libp2p import Libp2pTransport
from tests.hostile import HostileClient, port_of
from tests.test_r2_relay_dht import LIMITS, hold_circuits, relayed_addr
from tests.transport_kit import Factory, eventually, nat_transports_fixture

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

#: the destination's inbound upgrade timeout in these tests (py-libp2p's default: 10 s)
UPGRADE_TIMEOUT = 2.0
CIRCUITS = 3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


make = nat_transports_fixture(punch_grace=60.0, hole_punching=False)


def shorten_upgrade_timeout(transport: Libp2pTransport) -> None:
    host, bridge = transport._host, transport._bridge
    assert host is not None and bridge is not None

    def shorten() -> None:
        host.get_network().connection_config.inbound_upgrade_timeout = UPGRADE_TIMEOUT  # type: ignore[attr-defined]

    bridge.run_sync(shorten)


def stop_streams(behind: Libp2pTransport, relay: Libp2pTransport) -> int:
    """Inbound streams the relay has open on ``behind`` (its STOP streams among them)."""
    admission, bridge = behind._admission, behind._bridge
    assert admission is not None and bridge is not None
    return bridge.run_sync(lambda: admission.streams_of(relay.peer_id))


async def test_an_idle_relayed_connection_is_cut_like_a_direct_one(make: Factory) -> None:
    """Three circuits to a node behind NAT, opened through its relay by a peer that then
    sends nothing (no Noise handshake inside), and one direct TCP connection that sends
    nothing: all four are cut at the inbound upgrade timeout and counted; the relay's
    STOP streams are given back."""
    relay = await make(reachability="public", relay=True, limits=LIMITS)
    behind = await make(reachability="private")
    await behind.connect(relay.listen_addrs[0], timeout=5)
    await eventually(lambda: relayed_addr(behind), 15, "a relayed address")
    shorten_upgrade_timeout(behind)
    async with HostileClient("w3-idle-circuits") as hog:
        await hog.connect(relay.listen_addrs[0])
        before = stop_streams(behind, relay)
        codes = await hold_circuits(hog, relay.peer_id, behind.peer_id, CIRCUITS)
        assert codes == [100] * CIRCUITS  # the relay opened each circuit
        opened = time.monotonic()
        assert stop_streams(behind, relay) >= before + CIRCUITS
        direct = await asyncio.to_thread(
            socket.create_connection, ("127.0.0.1", port_of(behind.listen_addrs[0])), 5
        )
        try:
            await eventually(
                lambda: behind.stats()["handshakes_cut"] >= CIRCUITS + 1 or None,
                UPGRADE_TIMEOUT + 8,
                "the idle handshakes cut",
            )
            cut_after = time.monotonic() - opened
            await eventually(
                lambda: stop_streams(behind, relay) <= before or None,
                5,
                "the STOP streams given back",
            )
            direct.settimeout(5)
            said = [direct.recv(4096) for _ in range(2)]  # multistream's hello, then the end
            assert said[-1] == b"", said  # the node closed the direct one too
        finally:
            direct.close()
        assert behind.stats()["handshakes_cut"] == CIRCUITS + 1
        assert cut_after < UPGRADE_TIMEOUT + 5, cut_after
        # nothing of the peer became a connection of the node behind NAT
        assert ID.from_base58(hog.peer_id) not in behind._host.get_network().connections  # type: ignore[union-attr]
