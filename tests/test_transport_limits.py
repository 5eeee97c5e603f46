"""Transport resource bounds that need no node: several libp2p hosts in one process.

What a bound must not cost an honest peer (frames over its share wait, they are not
refused; a sender never meets the receiver's stream bound), and what a peer that breaks
yamux's flow control or gets banned meets. The attacks on a whole node are in
``test_transport_bounds.py``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import TYPE_DATA, YAMUX_HEADER_FORMAT, YamuxStream

from p2pfl.transport._yamux import PatchedYamux
from p2pfl.transport.base import FrameAbuse, TransportError
from p2pfl.transport.libp2p import Libp2pTransport
from p2pfl.transport.limits import TransportLimits
from p2pfl.transport.memory import MemoryNetwork
from tests.transport_kit import Inbox, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
MIB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Factory = Callable[..., Awaitable[tuple[Libp2pTransport, Inbox, Inbox]]]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    created: list[Libp2pTransport] = []

    async def factory(**options: Any) -> tuple[Libp2pTransport, Inbox, Inbox]:
        transport = Libp2pTransport(create_new_key_pair(), **options)
        inbox, abuse = Inbox(), Inbox()
        transport.set_handler(inbox)
        transport.set_abuse_handler(abuse)
        created.append(transport)
        await transport.start()
        return transport, inbox, abuse

    yield factory
    for transport in created:
        await transport.close()


async def test_frames_over_a_peers_share_wait_their_turn_and_all_arrive(make: Factory) -> None:
    # a share of one largest message (4 MiB, and 1 MiB for small ones): three 3 MiB
    # frames at once are read one after the other, none refused, nothing charged
    receiver, inbox, abuse = await make(max_message_size=4 * MIB)
    sender, _, _ = await make(max_message_size=4 * MIB)
    await sender.connect(receiver.listen_addrs[0])
    payloads = [bytes([i]) * (3 * MIB) for i in range(3)]
    await asyncio.gather(*(sender.send(receiver.peer_id, p, timeout=20) for p in payloads))
    got = sorted([bytes((await inbox.get())[1]) for _ in payloads])
    assert got == payloads
    stats = receiver.stats()
    assert stats["frames_cut"] == 0 and stats["refused_streams"] == 0
    assert abuse.queue.empty()


async def test_a_sender_keeps_under_the_receivers_stream_bound(make: Factory) -> None:
    # 40 sends at once to a receiver that takes 12 streams of a peer: the sender's own
    # bound (8 in flight) keeps it under, so nothing is reset and all arrive
    receiver, inbox, _ = await make(limits=TransportLimits(max_streams_per_peer=12))
    sender, _, _ = await make()
    await sender.connect(receiver.listen_addrs[0])
    await asyncio.gather(*(sender.send(receiver.peer_id, b"m%d" % i, timeout=20) for i in range(40)))
    assert sorted([(await inbox.get())[1] for _ in range(40)]) == sorted(b"m%d" % i for i in range(40))
    assert receiver.stats()["refused_streams"] == 0


async def test_a_peer_sending_past_its_window_is_disconnected_and_reported(make: Factory) -> None:
    receiver, inbox, abuse = await make()
    rogue, _, _ = await make()
    await rogue.connect(receiver.listen_addrs[0])
    assert rogue._bridge is not None and rogue._host is not None
    host = rogue._host

    async def flood() -> None:
        # a yamux stream gets 256 KiB of window until a frame is admitted: send 1 MiB
        conn = host.get_network().get_connections(ID.from_base58(receiver.peer_id))[0].muxed_conn
        stream = await conn.open_stream()
        assert isinstance(conn, PatchedYamux) and isinstance(stream, YamuxStream)
        header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, stream.stream_id, MIB)
        await conn._write_data(header, memoryview(bytes(MIB)))

    await rogue._bridge.run(flood)
    assert await abuse.get() == (rogue.peer_id, FrameAbuse.OVERSIZED)
    await eventually(lambda: rogue.peer_id not in receiver.connected_peers(), 10.0, "the rogue is cut off")
    assert receiver.stats()["rejected_oversized"] == 1 and inbox.queue.empty()


async def test_a_banned_peer_is_disconnected_and_refused(make: Factory) -> None:
    receiver, inbox, _ = await make()
    peer, _, _ = await make()
    await peer.connect(receiver.listen_addrs[0])
    await peer.send(receiver.peer_id, b"before", timeout=10)
    assert (await inbox.get()) == (peer.peer_id, b"before")
    receiver.ban(peer.peer_id, 60.0)
    assert receiver.is_banned(peer.peer_id)
    await eventually(lambda: peer.peer_id not in receiver.connected_peers(), 10.0, "the receiver drops the peer")
    await eventually(lambda: receiver.peer_id not in peer.connected_peers(), 10.0, "the peer sees it dropped")
    with pytest.raises(TransportError):
        await peer.connect(receiver.listen_addrs[0])
        await peer.send(receiver.peer_id, b"after", timeout=5)
    assert receiver.stats()["refused_banned"] >= 1
    assert inbox.queue.empty() and receiver.stats()["messages_received"] == 1


async def test_the_memory_transport_refuses_a_banned_peer() -> None:
    network = MemoryNetwork(seed=0)
    a, b = network.transport("a"), network.transport("b")
    inbox = Inbox()
    b.set_handler(inbox)
    await a.start()
    await b.start()
    b.ban("a", 60.0)
    with pytest.raises(TransportError, match="banned"):
        await a.send("b", b"x", timeout=1)
    assert b.stats()["refused_banned"] == 1 and inbox.queue.empty()


def test_limits_are_checked_and_derive_from_the_message_cap() -> None:
    limits = TransportLimits()
    assert limits.per_peer_bytes(64 * MIB) == 65 * MIB  # one largest message, and room
    assert limits.total_bytes(64 * MIB) == 130 * MIB
    assert TransportLimits(max_buffered_per_peer=MIB).per_peer_bytes(4 * MIB) == 4 * MIB
    assert limits.frame_seconds(MIB) == limits.frame_timeout + 1.0
    assert limits.summary(4 * MIB)["max_buffered"] == 10 * MIB
    with pytest.raises(ValueError):
        TransportLimits(max_streams_per_peer=10, max_streams=5)
    with pytest.raises(ValueError):
        TransportLimits(frame_timeout=0)


def test_a_nodes_transport_takes_the_limits_of_its_config(tmp_path):
    """``p2pfl node`` builds its transport with the ``[network]`` limits, not the defaults."""
    import asyncio

    from p2pfl.identity import Identity
    from p2pfl.nodecli import load_node_config, make_transport

    path = tmp_path / "node.toml"
    path.write_text(
        "[network]\nmax_streams_per_peer = 5\nframe_timeout = 3.0\nmin_frame_rate = 65536\n"
    )
    config = load_node_config(path, [f"state_dir={tmp_path / 'state'}"])

    async def build():
        return make_transport(config, Identity.generate(b"\x01" * 32))

    transport = asyncio.run(build())
    assert transport.limits.max_streams_per_peer == 5
    assert transport.limits.frame_timeout == 3.0
    assert transport.limits.min_frame_rate == 65536
