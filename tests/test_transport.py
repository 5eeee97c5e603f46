"""The in-memory transport: the Transport contract, and the faults it can inject."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from p2pfl.transport.base import FrameAbuse, TransportError
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from tests.transport_kit import Inbox

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def started(network: MemoryNetwork, count: int) -> list[tuple[MemoryTransport, Inbox]]:
    peers = []
    for _ in range(count):
        transport = network.transport()
        inbox = Inbox()
        transport.set_handler(inbox)
        await transport.start()
        peers.append((transport, inbox))
    return peers


@pytest.fixture
async def network() -> AsyncIterator[MemoryNetwork]:
    net = MemoryNetwork(seed=7)
    yield net
    for transport in list(net._listening.values()):
        await transport.close()


async def test_send_both_ways_and_count(network: MemoryNetwork) -> None:
    (a, inbox_a), (b, inbox_b) = await started(network, 2)
    assert await a.connect(b.listen_addrs[0]) == b.peer_id
    await a.send(b.peer_id, b"hello", timeout=1)
    assert await inbox_b.get() == (a.peer_id, b"hello")
    big = bytes(range(256)) * 20_000
    await b.send(a.peer_id, big, timeout=1)
    assert await inbox_a.get() == (b.peer_id, big)
    assert a.stats()["messages_sent"] == 1 and a.stats()["bytes_received"] == len(big)
    assert b.stats()["messages_received"] == 1 and b.stats()["bytes_sent"] == len(big)


async def test_peer_views(network: MemoryNetwork) -> None:
    (a, _), (b, _), (c, _) = await started(network, 3)
    await a.connect(b.listen_addrs[0])
    await c.connect(b.listen_addrs[0])
    assert b.connected_peers() == sorted([a.peer_id, c.peer_id])
    assert b.known_addrs() == {a.peer_id: a.listen_addrs, c.peer_id: c.listen_addrs}
    await c.close()
    assert b.connected_peers() == [a.peer_id]
    await c.close()  # idempotent


async def test_handler_runs_after_acknowledgement_and_errors_stay_contained(
    network: MemoryNetwork,
) -> None:
    (a, _), (b, _) = await started(network, 2)
    called = asyncio.Event()

    def failing(sender: str, data: bytes) -> None:
        called.set()
        raise RuntimeError("boom")

    b.set_handler(failing)
    await a.send(b.peer_id, b"x", timeout=1)
    assert b.stats()["messages_received"] == 1  # counted before the sender was acknowledged
    await asyncio.wait_for(called.wait(), 5)
    assert b.stats()["handler_errors"] == 1
    await a.send(b.peer_id, b"y", timeout=1)  # the transport still works


async def test_no_handler_refuses(network: MemoryNetwork) -> None:
    (a, _), (b, _) = await started(network, 2)
    b.set_handler(None)
    with pytest.raises(TransportError):
        await a.send(b.peer_id, b"x", timeout=1)
    assert b.stats()["unhandled"] == 1 and a.stats()["send_failures"] == 1


async def test_closed_or_unknown_peer_fails(network: MemoryNetwork) -> None:
    (a, _), (b, _) = await started(network, 2)
    await b.close()
    with pytest.raises(TransportError):
        await a.send(b.peer_id, b"x", timeout=1)
    with pytest.raises(TransportError):
        await a.ping(b.peer_id, timeout=1)
    with pytest.raises(TransportError):
        await a.connect("/memory/nobody/p2p/nobody")
    with pytest.raises(TransportError):
        await a.connect("no-peer-id-here")
    with pytest.raises(TransportError):
        await b.send(a.peer_id, b"x", timeout=1)  # b itself is closed


async def test_oversized_payload_rejected(network: MemoryNetwork) -> None:
    [(a, _)] = await started(network, 1)
    small = network.transport(max_message_size=10)
    small.set_handler(Inbox())
    await small.start()
    with pytest.raises(TransportError):
        await a.send(small.peer_id, b"x" * 11, timeout=1)
    assert small.stats()["rejected_oversized"] == 1
    await a.send(small.peer_id, b"x" * 10, timeout=1)


async def test_oversized_payload_is_reported_to_the_abuse_handler(network: MemoryNetwork) -> None:
    [(a, _)] = await started(network, 1)
    small = network.transport(max_message_size=10)
    small.set_handler(Inbox())
    reports: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    small.set_abuse_handler(lambda peer, reason: reports.put_nowait((peer, reason)))
    await small.start()
    with pytest.raises(TransportError):
        await a.send(small.peer_id, b"x" * 11, timeout=1)
    assert await asyncio.wait_for(reports.get(), 5) == (a.peer_id, FrameAbuse.OVERSIZED)

    def failing(peer: str, reason: str) -> None:
        raise RuntimeError("handler bug")

    small.set_abuse_handler(failing)  # a failing handler is contained
    with pytest.raises(TransportError):
        await a.send(small.peer_id, b"x" * 11, timeout=1)
    small.set_abuse_handler(None)
    await a.send(small.peer_id, b"x" * 10, timeout=1)
    assert small.stats()["rejected_oversized"] == 2 and reports.empty()


async def test_drops_are_reproducible() -> None:
    outcomes = []
    for _ in range(2):
        net = MemoryNetwork(drop_rate=0.5, seed=3)
        (a, _), (b, inbox_b) = await started(net, 2)
        run = []
        for i in range(40):
            try:
                await a.send(b.peer_id, bytes([i]), timeout=1)
                run.append(True)
            except TransportError:
                run.append(False)
        assert b.stats()["messages_received"] == sum(run)
        delivered = [(await inbox_b.get())[1][0] for _ in range(sum(run))]
        assert delivered == [i for i, ok in enumerate(run) if ok]
        outcomes.append(run)
    assert outcomes[0] == outcomes[1]
    assert 5 < sum(outcomes[0]) < 35


async def test_partition_and_cut_links(network: MemoryNetwork) -> None:
    (a, _), (b, _), (c, _) = await started(network, 3)
    network.partition([a.peer_id, b.peer_id])
    await a.send(b.peer_id, b"x", timeout=1)
    for sender, receiver in ((a, c), (c, b)):
        with pytest.raises(TransportError):
            await sender.send(receiver.peer_id, b"x", timeout=1)
    with pytest.raises(TransportError):
        await c.ping(a.peer_id, timeout=1)
    network.heal()
    await c.send(a.peer_id, b"x", timeout=1)
    network.cut(a.peer_id, b.peer_id)
    with pytest.raises(TransportError):
        await b.send(a.peer_id, b"x", timeout=1)
    await b.send(c.peer_id, b"x", timeout=1)
    network.restore(a.peer_id, b.peer_id)
    await b.send(a.peer_id, b"x", timeout=1)
    with pytest.raises(ValueError):
        network.partition([a.peer_id], [a.peer_id])


async def test_latency_and_timeouts() -> None:
    net = MemoryNetwork(latency=0.01)
    (a, _), (b, inbox_b) = await started(net, 2)
    assert await a.ping(b.peer_id, timeout=1) == pytest.approx(0.02)
    await a.send(b.peer_id, b"x", timeout=1)
    await inbox_b.get()
    with pytest.raises(TransportError):
        await a.send(b.peer_id, b"x", timeout=0.005)
    with pytest.raises(TransportError):
        await a.ping(b.peer_id, timeout=0.005)


async def test_start_twice_under_one_id_fails(network: MemoryNetwork) -> None:
    a = network.transport("same")
    await a.start()
    with pytest.raises(TransportError):
        await network.transport("same").start()
    with pytest.raises(TransportError):
        await a.connect(a.listen_addrs[0])
