"""The unread-window budget gives back every byte it counted (helper v6).

``_unread.UnreadBudget`` is told of bytes when a stream buffer grows and given them back
when it shrinks or is dropped (``_Unread.__del__``). A byte never given back is a leak
that, over a long-lived node's many connections, would shrink the budget until honest
streams are reset. Many connections, each with stalled windows (frames waiting for
room, counted), streams reset in the middle of a frame, streams reset by the node for
the budget, and an honest model, are opened and closed: afterwards the budget holds 0.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from p2pfl.transport.libp2p import Libp2pTransport
from tests.hostile import HostileClient, identity
from tests.test_r3_windows import WINDOW_FILL

#: connections, one after another from four loopback sources
ROUNDS = 8
SOURCES = ("127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24")
#: streams per connection: filled and left stalled, or reset in the middle of the frame
STALLED = 6
RESET = 3


async def stall_and_reset(host: Any, node: str, addr: str, source: str) -> int:
    """Dial ``node`` from ``source``; fill ``STALLED`` streams' windows and leave them, write
    half a window on ``RESET`` more and reset them; return the bytes written."""
    peer = ID.from_base58(node)
    await host.get_network().dial_addr(Multiaddr(addr.rsplit("/p2p/", 1)[0]), peer, source=(source, 0))
    conn = host.get_network().get_connections(peer)[0].muxed_conn
    written = 0
    for k in range(STALLED + RESET):
        try:
            stream = await conn.open_stream()
            with trio.fail_after(5):
                if k < STALLED:
                    await stream.write(WINDOW_FILL)
                    written += len(WINDOW_FILL)
                else:
                    await stream.write(WINDOW_FILL[: len(WINDOW_FILL) // 2])
                    written += len(WINDOW_FILL) // 2
                    await stream.reset()
        except Exception:  # noqa: BLE001 - a stream the node reset (its share): its doing
            pass
    return written


async def _wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


@pytest.mark.timeout(120)
def test_the_budget_returns_to_zero_after_connections_close() -> None:
    async def run() -> dict[str, Any]:
        target = Libp2pTransport(identity("v6-leak-target").libp2p_keypair, listen_addrs=["/ip4/127.0.0.1/tcp/0"])
        got: list[int] = []
        target.set_handler(lambda sender, data: got.append(len(data)))
        await target.start()
        addr = target.listen_addrs[0]
        peaks: list[int] = []
        try:
            for k in range(ROUNDS):
                client = HostileClient(f"v6-leak-{k}")
                await client.__aenter__()
                try:
                    bridge, host = client.transport._bridge, client.transport._host
                    assert bridge is not None and host is not None
                    await asyncio.wait_for(
                        bridge.run(stall_and_reset, host, target.peer_id, addr, SOURCES[k % len(SOURCES)]), 30
                    )
                    # an honest model on the same connection, delivered whole
                    await client.send(target.peer_id, bytes([k]) * (1 << 20))
                    await _wait_for(lambda: target.stats()["unread_bytes"] > 0, 5)
                    peaks.append(target.stats()["unread_bytes"])
                finally:
                    await client.__aexit__()  # the connection closes with its streams stalled
            settled = await _wait_for(lambda: target._unread.total == 0, 20)
            return {"settled": settled, "peaks": peaks, "delivered": len(got), "total": target._unread.total,
                    "by_holder": dict(target._unread._by_holder), **target.stats()}  # fmt: skip
        finally:
            await target.close()

    report = asyncio.run(run())
    assert min(report["peaks"]) > 0, report  # every connection left bytes unread, counted
    assert report["delivered"] == ROUNDS, report
    assert report["settled"] and report["total"] == 0 and report["by_holder"] == {}, report
