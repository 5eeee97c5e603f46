"""Peers of one run find each other through the Kademlia DHT, on 127.0.0.1.

Each peer is told only a bootstrap address; peer exchange plays no part (the transports
below never send a hello), so whatever a peer learns of the others comes from the DHT.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pfl.transport._dht import run_key
from p2pfl.transport.libp2p import Libp2pTransport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

Factory = Callable[..., Awaitable[Libp2pTransport]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Found:
    """What a transport's discovery handler was told: peer id -> addresses."""

    def __init__(self) -> None:
        self.peers: dict[str, list[str]] = {}
        self.changed = asyncio.Event()

    def __call__(self, peer: str, addrs: list[str]) -> None:
        self.peers[peer] = addrs
        self.changed.set()

    async def until(self, want: set[str], timeout: float) -> None:
        async def wait() -> None:
            while not want <= set(self.peers):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    created: list[Libp2pTransport] = []

    async def factory(**options: Any) -> Libp2pTransport:
        transport = Libp2pTransport(create_new_key_pair(), **options)
        created.append(transport)
        await transport.start()
        return transport

    yield factory
    for transport in created:
        await transport.close()


def test_run_key_is_a_sha256_multihash_that_differs_per_run() -> None:
    key = bytes.fromhex(run_key("digits"))
    assert key[:2] == b"\x12\x20" and len(key) == 34
    assert run_key("digits") != run_key("digits2")


def test_a_run_name_needs_the_dht() -> None:
    with pytest.raises(ValueError, match="dht"):
        Libp2pTransport(create_new_key_pair(), run="x")


async def test_four_peers_meet_through_the_dht_knowing_only_a_bootstrap(make: Factory) -> None:
    boot = await make(dht=True)  # serves the DHT, advertises no run
    seen: list[tuple[Libp2pTransport, Found]] = []
    for _ in range(4):
        transport = Libp2pTransport(create_new_key_pair(), dht=True, run="digits", dht_interval=2)
        found = Found()
        transport.set_discovery_handler(found)
        seen.append((transport, found))
    outsider = Libp2pTransport(create_new_key_pair(), dht=True, run="other", dht_interval=2)
    outsider_found = Found()
    outsider.set_discovery_handler(outsider_found)
    members = [t for t, _ in seen]
    try:
        for transport in members + [outsider]:
            await transport.start()
            await transport.connect(boot.listen_addrs[0], timeout=5)
        ids = {t.peer_id for t in members}
        await asyncio.gather(
            *(found.until(ids - {t.peer_id}, timeout=30) for t, found in seen)
        )
        for transport, found in seen:
            assert transport.peer_id not in found.peers
            assert outsider.peer_id not in found.peers  # another run
            for peer, addrs in found.peers.items():
                assert addrs and all(a.endswith(f"/p2p/{peer}") for a in addrs)
        assert not ids & set(outsider_found.peers)
        assert boot.peer_id not in {p for _, f in seen for p in f.peers}  # no run: not a provider
    finally:
        for transport in members + [outsider]:
            await transport.close()


async def test_discovery_meets_the_run_through_the_dht_without_peer_exchange(
    make: Factory,
) -> None:
    """The node's Discovery over real transports: each peer knows only the bootstrap
    peer, hellos carry only their sender's addresses, yet every peer meets the others."""
    from p2pfl.config import NodeNetworkConfig
    from p2pfl.discovery import Discovery
    from p2pfl.messages import Message

    boot = await make(dht=True)
    network = NodeNetworkConfig(
        bootstrap=[boot.listen_addrs[0]],
        dht=True,
        run="digits",
        peer_exchange=False,
        min_peers=3,  # the three others: a DHT seed that greets no one is not met
        discovery_timeout=30,
    )
    tasks: set[asyncio.Task[None]] = set()
    hellos: list[dict[str, Any]] = []

    def member() -> tuple[Libp2pTransport, Discovery]:
        transport = Libp2pTransport(create_new_key_pair(), dht=True, run="digits", dht_interval=2)

        async def send(peer: str, message: Message) -> None:
            await transport.send(peer, json.dumps(message.meta).encode(), timeout=5)

        def spawn(coroutine: Any) -> None:
            task = asyncio.ensure_future(coroutine)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        discovery = Discovery(
            transport.peer_id, transport, network, graph=None, send=send, spawn=spawn
        )

        def on_payload(sender: str, data: bytes) -> None:
            meta = json.loads(data)
            hellos.append(meta)
            discovery.on_hello(sender, meta)

        transport.set_handler(on_payload)
        transport.set_discovery_handler(discovery.on_discovered)
        return transport, discovery

    members = [member() for _ in range(4)]
    boot.set_handler(lambda sender, data: None)  # the bootstrap peer greets no one back
    try:
        for transport, _ in members:
            await transport.start()
        await asyncio.wait_for(asyncio.gather(*(d.discover() for _, d in members)), 40)
        ids = {t.peer_id for t, _ in members}
        for transport, discovery in members:
            assert discovery.met == ids - {transport.peer_id}  # the seed is no neighbour
            assert discovery.shortfall() is None
        assert hellos and all(len(hello["addrs"]) == 1 for hello in hellos)  # own addrs only
    finally:
        for task in list(tasks):
            task.cancel()
        for transport, _ in members:
            await transport.close()
