"""A send cancelled while its frame is being written leaves the connection usable.

A node that stops cancels its sends still in flight (its own next-round models, say).
Cancelling a write half-way through cut a Noise message of the connection in half: the
connection broke, and with it every other stream on it -- other frames, and the circuits
a relay carries on it -- which cost other nodes their last models of a run.
"""

from __future__ import annotations

import asyncio

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pfl.transport.libp2p import Libp2pTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_send_cancelled_mid_frame_does_not_break_the_connection() -> None:
    received: asyncio.Queue[bytes] = asyncio.Queue()
    a, b = Libp2pTransport(create_new_key_pair()), Libp2pTransport(create_new_key_pair())
    b.set_handler(lambda sender, data: received.put_nowait(bytes(data[:8])))
    await a.start()
    await b.start()
    try:
        await a.connect(b.listen_addrs[0], timeout=5)
        await a.send(b.peer_id, b"warm-up!", timeout=5)
        assert await asyncio.wait_for(received.get(), 10) == b"warm-up!"
        assert a._bridge is not None
        peer = ID.from_base58(b.peer_id)
        (conn,) = a._bridge.run_sync(lambda: a._host.get_network().get_connections(peer))  # type: ignore[union-attr]
        for attempt in range(3):
            big = bytes([attempt]) * (32 << 20)  # long enough to be cut while written
            sending = asyncio.create_task(a.send(b.peer_id, big, timeout=30))
            for _ in range(2 + 3 * attempt):  # a few loop turns into the write
                await asyncio.sleep(0.005)
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            await a.send(b.peer_id, b"after %d" % attempt, timeout=10)
            seen = [await asyncio.wait_for(received.get(), 10)]
            while seen[-1] != b"after %d" % attempt:  # the cancelled frame may have landed whole
                seen.append(await asyncio.wait_for(received.get(), 10))
            assert not conn.is_closed, attempt  # the same connection, still open
    finally:
        await a.close()
        await b.close()
