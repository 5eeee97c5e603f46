"""The libp2p transport on 127.0.0.1: several hosts in one process, real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import PingService
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL_ID
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.io.utils import read_exactly
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr

import p2pfl.transport.libp2p as libp2p_module
from p2pfl.transport.base import FrameAbuse, TransportError
from p2pfl.transport.libp2p import (
    ACK,
    MAX_IDLE_STREAMS,
    PROTOCOL_ID,
    Libp2pTransport,
    concrete_addrs,
)
from tests.transport_kit import Inbox, inbox_transports

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

Factory = Callable[..., Awaitable[tuple[Libp2pTransport, "Inbox"]]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Reports(Inbox):
    """Collects (peer, reason) pairs from an abuse handler."""

    def __call__(self, peer: str, reason: str) -> None:
        self.queue.put_nowait((peer, reason))


NO_ACK = ("StreamEOF", "StreamReset")  # what a raw sender sees instead of an acknowledgement


def trio_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "p2pfl-trio" and t.is_alive()]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    """Start transports on /tcp/0; close them all afterwards and check the trio thread is gone."""
    threads_before = trio_threads()
    async for factory in inbox_transports():
        yield factory
    assert trio_threads() == threads_before  # the last user of the trio thread joined it


def port_of(transport: Libp2pTransport) -> int:
    return int(transport.listen_addrs[0].split("/tcp/")[1].split("/")[0])


async def on_trio(transport: Libp2pTransport, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``fn(host, *args)`` on the transport's trio thread (tests reach below the interface)."""
    assert transport._bridge is not None

    async def call() -> Any:
        return await fn(transport._host, *args)

    return await transport._bridge.run(call)


async def raw_stream(
    host: Any, peer: str, chunks: list[bytes], finish: bool, reset: bool = False
) -> str:
    """Open a /p2pfl/msg stream, write ``chunks``; half-close it, reset it or just go silent.

    Returns the outcome: the ``repr`` of what came back, or the exception a sender sees.
    """
    stream = await host.new_stream(ID.from_base58(peer), [PROTOCOL_ID])
    for chunk in chunks:
        await stream.write(chunk)
    if reset:
        await stream.reset()
        return "reset"
    if finish:
        await stream.close()
    try:
        with trio.fail_after(10):
            return repr(await stream.read(1))
    except trio.TooSlowError:
        raise
    except Exception as exc:
        return type(exc).__name__


def kept(transport: Libp2pTransport, peer: str) -> list[Any]:
    """The outbound streams ``transport`` keeps for ``peer`` (read on its trio thread)."""
    assert transport._bridge is not None
    return transport._bridge.run_sync(
        lambda: [stream for stream, _ in transport._idle.get(ID.from_base58(peer), [])]
    )


async def until(
    transport: Libp2pTransport, predicate: Callable[[], bool], timeout: float = 5.0
) -> None:
    """Wait, on the transport's trio thread, until ``predicate()`` holds; fail after ``timeout``."""

    async def poll(host: Any) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(0.01)

    await on_trio(transport, poll)


async def test_three_hosts_exchange_small_and_large_payloads(make: Factory) -> None:
    peers = [await make() for _ in range(3)]
    assert len({port_of(t) for t, _ in peers}) == 3
    for (a, _), (b, _) in ((peers[0], peers[1]), (peers[1], peers[2]), (peers[2], peers[0])):
        assert await a.connect(b.listen_addrs[0]) == b.peer_id
    large = hashlib.sha256(b"seed").digest() * (5_000_000 // 32)

    async def send_all(sender: Libp2pTransport) -> None:
        for receiver, _ in peers:
            if receiver is not sender:
                await sender.send(receiver.peer_id, sender.peer_id.encode(), timeout=10)
                await sender.send(receiver.peer_id, large, timeout=20)

    await asyncio.gather(*(send_all(t) for t, _ in peers))
    for receiver, inbox in peers:
        got = [await inbox.get() for _ in range(4)]
        senders = {t.peer_id for t, _ in peers} - {receiver.peer_id}
        assert sorted(s for s, d in got if d != large) == sorted(senders)
        assert {s for s, d in got if d == s.encode()} == senders
        assert sorted(s for s, d in got if d == large) == sorted(senders)
        stats = receiver.stats()
        assert stats["messages_received"] == 4 and stats["messages_sent"] == 4
        assert (
            stats["bytes_received"]
            == stats["bytes_sent"]
            == 2 * len(large) + 2 * len(receiver.peer_id)
        )
        assert sorted(receiver.connected_peers()) == sorted(senders)
        known = receiver.known_addrs()
        assert set(known) == senders
        for t, _ in peers:
            if t is not receiver:
                assert t.listen_addrs[0] in known[t.peer_id]


async def test_two_way_bulk_transfers_with_new_streams_do_not_deadlock(make: Factory) -> None:
    # With py-libp2p's own yamux this hangs about every other run (see transport._yamux).
    (a, inbox_a), (b, inbox_b) = await make(), await make()
    await a.connect(b.listen_addrs[0])
    bulk = b"z" * 20_000_000

    async def side(sender: Libp2pTransport, receiver: Libp2pTransport) -> int:
        transfer = asyncio.ensure_future(sender.send(receiver.peer_id, bulk, timeout=15))
        small = 0
        while not transfer.done():  # new streams while both directions are saturated
            await sender.send(receiver.peer_id, b"small", timeout=15)
            small += 1
        await transfer
        return small

    counts = await asyncio.gather(side(a, b), side(b, a))
    for inbox, count in ((inbox_b, counts[0]), (inbox_a, counts[1])):
        got = [(await inbox.get())[1] for _ in range(count + 1)]
        assert got.count(bulk) == 1 and got.count(b"small") == count


async def test_no_handler_refuses_a_frame_before_its_body(make: Factory) -> None:
    """A transport nobody takes messages from (a relay server) refuses a frame on its
    length prefix: it neither holds nor reads up to ``max_message_size`` bytes of it (it
    did, then refused it). Here the body never comes: the refusal cannot wait for it."""
    (a, _), (b, _) = await make(), await make()
    b.set_handler(None)
    await a.connect(b.listen_addrs[0])
    began = time.monotonic()
    outcome = await on_trio(a, raw_stream, b.peer_id, [(8 << 20).to_bytes(4, "big")], False)
    assert outcome in ("StreamReset", "StreamEOF"), outcome  # refused, unread
    assert time.monotonic() - began < 5  # not the frame's 20 s deadline
    assert b.stats()["unhandled"] == 1 and b.stats()["frames_cut"] == 0


async def test_acknowledgement_means_received(make: Factory) -> None:
    (a, _), (b, inbox_b) = await make(), await make()
    await a.connect(b.listen_addrs[0])
    await a.send(b.peer_id, b"first", timeout=5)
    assert b.stats()["messages_received"] == 1  # counted before the acknowledgement left
    assert await inbox_b.get() == (a.peer_id, b"first")

    b.set_handler(None)  # nobody to hand the payload to: refused, not acknowledged
    with pytest.raises(TransportError):
        await a.send(b.peer_id, b"second", timeout=5)
    assert b.stats()["unhandled"] == 1 and a.stats()["send_failures"] == 1

    received = trio.Event()

    async def drain_but_never_ack(stream: Any) -> None:
        while True:
            try:
                await stream.read()
            except Exception:
                received.set()
                await trio.sleep_forever()

    async def install(host: Any) -> None:
        host.set_stream_handler(PROTOCOL_ID, drain_but_never_ack)

    await on_trio(b, install)
    began = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        await a.send(b.peer_id, b"third", timeout=1.0)
    assert 0.9 < time.monotonic() - began < 3.0


async def test_ping_measures_rtt(make: Factory) -> None:
    (a, _), (b, _) = await make(), await make()
    await a.connect(b.listen_addrs[0])
    rtts = [await a.ping(b.peer_id, timeout=5) for _ in range(3)]
    assert all(0 < rtt < 1.0 for rtt in rtts)
    assert 0 < await b.ping(a.peer_id, timeout=5) < 1.0


async def test_closed_peer_fails_within_timeout_and_frees_its_port(make: Factory) -> None:
    (a, _), (c, _) = await make(), await make()
    key_b = create_new_key_pair()
    b, _ = await make(key_b)
    address, port = b.listen_addrs[0], port_of(b)
    await a.connect(address)
    await a.send(b.peer_id, b"x", timeout=5)
    await b.close()
    await b.close()  # idempotent
    assert b.listen_addrs == []

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    began = time.monotonic()
    with pytest.raises(TransportError):
        await a.send(b.peer_id, b"x", timeout=3)
    assert time.monotonic() - began < 3.5
    began = time.monotonic()
    with pytest.raises(TransportError):
        await c.connect(address, timeout=5)
    assert time.monotonic() - began < 3.0
    with pytest.raises(TransportError):
        await b.send(a.peer_id, b"x", timeout=1)

    # The same identity comes back on the same port: a recent failed dial must not block it.
    b2, inbox_b2 = await make(key_b, listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"])
    assert b2.listen_addrs == [address]
    assert await a.ping(b.peer_id, timeout=5) > 0  # redials despite the failed dial above
    assert await a.connect(address) == b.peer_id
    await a.send(b.peer_id, b"again", timeout=5)
    assert await inbox_b2.get() == (a.peer_id, b"again")


async def test_oversized_frame_rejected_and_counted(make: Factory) -> None:
    (a, _), (b, inbox_b) = await make(), await make(max_message_size=1024)
    reports = Reports()
    b.set_abuse_handler(reports)
    await a.connect(b.listen_addrs[0])
    with pytest.raises(TransportError):
        await a.send(b.peer_id, b"x" * 4096, timeout=5)
    assert b.stats()["rejected_oversized"] == 1
    assert await reports.get() == (a.peer_id, FrameAbuse.OVERSIZED)
    assert b.stats()["messages_received"] == 0
    with pytest.raises(TransportError):  # the sender's own cap is checked before sending
        await b.send(a.peer_id, b"x" * 1025, timeout=5)
    await a.send(b.peer_id, b"x" * 1024, timeout=5)
    assert await inbox_b.get() == (a.peer_id, b"x" * 1024)


async def test_truncated_and_garbage_input_do_not_break_the_transport(make: Factory) -> None:
    (a, _), (b, inbox_b), (c, _) = await make(), await make(read_idle_timeout=0.5), await make()
    reports = Reports()
    b.set_abuse_handler(reports)
    await a.connect(b.listen_addrs[0])
    await c.connect(b.listen_addrs[0])

    # A frame announcing 1000 bytes that ends after 10: counted, stream reset.
    outcome = await on_trio(a, raw_stream, b.peer_id, [(1000).to_bytes(4, "big"), b"y" * 10], True)
    assert outcome in NO_ACK
    assert await reports.get() == (a.peer_id, FrameAbuse.TRUNCATED)
    # A header cut in the middle, then silence: dropped after the idle timeout.
    outcome = await on_trio(a, raw_stream, b.peer_id, [b"\x00\x00"], False)
    assert outcome in NO_ACK
    assert await reports.get() == (a.peer_id, FrameAbuse.STALLED)
    # A body that stops, silent: the same.
    outcome = await on_trio(a, raw_stream, b.peer_id, [(1000).to_bytes(4, "big"), b"y"], False)
    assert outcome in NO_ACK
    assert await reports.get() == (a.peer_id, FrameAbuse.STALLED)
    # A frame whose sender resets its stream half-way.
    args = ([(1000).to_bytes(4, "big"), b"y" * 10], False, True)
    assert await on_trio(c, raw_stream, b.peer_id, *args) == "reset"
    assert await reports.get() == (c.peer_id, FrameAbuse.TRUNCATED)
    # Streams that end or idle between frames are no abuse (one frame, then EOF).
    assert await on_trio(a, raw_stream, b.peer_id, [(1).to_bytes(4, "big"), b"z"], True) == repr(
        ACK
    )
    assert await inbox_b.get() == (a.peer_id, b"z")
    assert b.stats()["truncated"] == 4 and b.stats()["messages_received"] == 1

    # Raw TCP clients: one sends garbage instead of a handshake, one stays silent.
    silent = socket.create_connection(("127.0.0.1", port_of(b)), timeout=2)
    try:
        with socket.create_connection(("127.0.0.1", port_of(b)), timeout=2) as garbage:
            garbage.sendall(b"\x13/multistream/1.0.0\n" + bytes(range(256)) * 64)
        await c.send(b.peer_id, b"still serving", timeout=5)
        await a.send(b.peer_id, b"me too", timeout=5)
    finally:
        silent.close()
    got = {await inbox_b.get(), await inbox_b.get()}
    assert got == {(c.peer_id, b"still serving"), (a.peer_id, b"me too")}
    assert reports.queue.empty()


async def test_bad_arguments_raise_transport_error(make: Factory) -> None:
    (a, _) = await make()
    for bad in ("not a multiaddr", "/ip4/127.0.0.1/tcp/1", a.listen_addrs[0]):
        with pytest.raises(TransportError):
            await a.connect(bad)
    with pytest.raises(TransportError):
        await a.send("not-a-peer-id", b"x", timeout=1)
    with pytest.raises(TransportError):
        await a.ping("not-a-peer-id", timeout=1)
    unstarted = Libp2pTransport(create_new_key_pair())
    with pytest.raises(TransportError):
        await unstarted.send(a.peer_id, b"x", timeout=1)
    assert unstarted.connected_peers() == [] and unstarted.known_addrs() == {}
    await unstarted.close()


def test_wildcard_listen_addresses_are_announced_as_interfaces() -> None:
    announced = concrete_addrs(
        [Multiaddr("/ip4/0.0.0.0/tcp/4001"), Multiaddr("/ip4/127.0.0.1/tcp/4002")]
    )
    assert announced and all("/0.0.0.0/" not in str(addr) for addr in announced)
    assert Multiaddr("/ip4/127.0.0.1/tcp/4002") in announced
    assert all(str(addr).endswith("/tcp/4001") for addr in announced[:-1])


async def test_listen_failure_is_reported(make: Factory) -> None:
    (a, _) = await make()
    with pytest.raises(TransportError, match="cannot listen"):  # port taken (see _check_port_free)
        await make(listen_addrs=[f"/ip4/127.0.0.1/tcp/{port_of(a)}"])
    with pytest.raises(TransportError, match="could not listen"):  # not an address of this host
        await make(listen_addrs=["/ip4/203.0.113.77/tcp/0"])
    c, inbox_c = await make()  # the shared trio loop survived the failures
    await a.connect(c.listen_addrs[0])
    await a.send(c.peer_id, b"ok", timeout=5)
    assert await inbox_c.get() == (a.peer_id, b"ok")


async def stock_peer(
    target: str, payload: bytes, stop: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """A py-libp2p host with stock settings (all its muxers and security) talking to ours.

    It dials ``target``, runs identify and ping, sends ``payload`` on our protocol,
    reports what it saw through ``task_status`` and then serves our protocol until
    ``stop`` is set.
    """
    stock = new_host()
    received: list[bytes] = []

    async def receive_frame(stream: Any) -> None:
        size = int.from_bytes(await read_exactly(stream, 4), "big")
        chunks = []
        while size > 0:
            chunks.append(await stream.read(size))
            size -= len(chunks[-1])
        received.append(b"".join(chunks))
        await stream.write(ACK)
        await stream.close()

    stock.set_stream_handler(PROTOCOL_ID, receive_frame)
    async with stock.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            info = info_from_p2p_addr(Multiaddr(target))
            with trio.fail_after(10):
                await stock.connect(info)
                stream = await stock.new_stream(info.peer_id, [IDENTIFY_PROTOCOL_ID])
                raw = b""
                try:
                    while chunk := await stream.read():
                        raw += chunk
                except StreamEOF:
                    pass
                identify = parse_identify_response(raw)
                rtts = await PingService(stock).ping(info.peer_id)
                stream = await stock.new_stream(info.peer_id, [PROTOCOL_ID])
                await stream.write(len(payload).to_bytes(4, "big") + payload)
                ack = await stream.read(1)
                await stream.close()
            task_status.started(
                {
                    "peer": stock.get_id().to_base58(),
                    "protocols": set(identify.protocols),
                    "rtts": rtts,
                    "ack": ack,
                    "received": received,
                }
            )
            await stop.wait()
        finally:
            await stock.close()


async def test_stock_py_libp2p_host_interoperates(make: Factory) -> None:
    ours, inbox = await make()
    bridge = ours._bridge
    assert bridge is not None
    payload = hashlib.sha256(b"interop").digest() * 40_000  # 1.28 MB: many frames, window updates
    stop = trio.Event()

    async def start_stock() -> dict[str, Any]:
        return await bridge.nursery.start(stock_peer, ours.listen_addrs[0], payload, stop)

    async def stop_stock() -> None:
        stop.set()

    seen = await bridge.run(start_stock)
    try:
        assert seen["ack"] == ACK
        assert await inbox.get() == (seen["peer"], payload)
        assert {str(PROTOCOL_ID), "/ipfs/ping/1.0.0", "/ipfs/id/1.0.0"} <= seen["protocols"]
        assert len(seen["rtts"]) == 1
        await ours.send(seen["peer"], payload, timeout=10)  # our frames and windows, stock reader
        assert seen["received"] == [payload]
    finally:
        await bridge.run(stop_stock)


async def test_plaintext_is_not_offered(make: Factory) -> None:
    ours, _ = await make()

    async def dial_with_plaintext_only() -> str:
        key_pair = create_new_key_pair()
        stock = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
        )
        async with stock.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                with trio.fail_after(10):
                    await stock.connect(info_from_p2p_addr(Multiaddr(ours.listen_addrs[0])))
                return "connected"
            except Exception as exc:
                return type(exc).__name__
            finally:
                await stock.close()

    assert ours._bridge is not None
    assert await ours._bridge.run(dial_with_plaintext_only) != "connected"
    assert ours.connected_peers() == []


async def test_successive_sends_reuse_a_stream_and_concurrent_ones_do_not_interleave(
    make: Factory,
) -> None:
    (a, _), (b, inbox_b) = await make(), await make()
    await a.connect(b.listen_addrs[0])
    for i in range(5):
        await a.send(b.peer_id, f"m{i}".encode(), timeout=5)
    [stream] = kept(a, b.peer_id)
    assert [(await inbox_b.get())[1] for _ in range(5)] == [f"m{i}".encode() for i in range(5)]
    await a.send(b.peer_id, b"x" * 300_000, timeout=5)
    assert kept(a, b.peer_id) == [stream]  # the same stream, still
    assert await inbox_b.get() == (a.peer_id, b"x" * 300_000)

    # concurrent sends take a stream each, and every frame arrives whole
    payloads = [bytes([i]) * (50_000 + 100_000 * i) for i in range(8)]
    await asyncio.gather(*(a.send(b.peer_id, p, timeout=10) for p in payloads))
    got = sorted([(await inbox_b.get())[1] for _ in payloads], key=len)
    assert got == payloads
    assert 1 <= len(kept(a, b.peer_id)) <= MAX_IDLE_STREAMS
    stats = b.stats()
    assert stats["messages_received"] == 14 and stats["truncated"] == 0
    assert a.stats()["send_failures"] == 0


async def test_a_stream_the_receiver_closed_is_replaced(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a, _), (b, inbox_b) = await make(), await make(stream_idle_timeout=0.3)
    await a.connect(b.listen_addrs[0])
    await a.send(b.peer_id, b"one", timeout=5)
    [first] = kept(a, b.peer_id)
    # b closes the idle stream: a sees the close and opens a new stream for the next send
    await until(a, lambda: first.muxed_stream.recv_closed)
    await a.send(b.peer_id, b"two", timeout=5)
    [second] = kept(a, b.peer_id)
    assert second is not first

    # a send that only finds out on the way (EOF instead of an acknowledgement) is retried once
    await until(a, lambda: second.muxed_stream.recv_closed)
    monkeypatch.setattr(libp2p_module, "_reusable", lambda stream: True)
    await a.send(b.peer_id, b"three", timeout=5)
    assert kept(a, b.peer_id)[-1] is not second
    assert [(await inbox_b.get())[1] for _ in range(3)] == [b"one", b"two", b"three"]
    stats = b.stats()
    assert stats["messages_received"] == 3 and stats["truncated"] == 0
    assert a.stats()["send_failures"] == 0


async def test_kept_streams_go_with_the_connection_and_on_close(make: Factory) -> None:
    (a, _), (b, _), (c, inbox_c) = await make(), await make(), await make()
    await a.connect(b.listen_addrs[0])
    await a.connect(c.listen_addrs[0])
    await a.send(b.peer_id, b"to b", timeout=5)
    await a.send(c.peer_id, b"to c", timeout=5)
    assert len(kept(a, b.peer_id)) == len(kept(a, c.peer_id)) == 1
    await b.close()
    await until(a, lambda: ID.from_base58(b.peer_id) not in a._idle)  # dropped on disconnect
    assert await inbox_c.get() == (a.peer_id, b"to c")
    await a.close()
    assert a._idle == {}
    assert c.stats()["truncated"] == 0  # a's kept stream ended cleanly, between frames


async def test_a_timed_out_send_leaves_the_peer_reachable(make: Factory) -> None:
    (a, _), (b, inbox_b) = await make(), await make()
    await a.connect(b.listen_addrs[0])

    async def stall(stream: Any) -> None:  # never reads: the sender runs out of window
        await trio.sleep_forever()

    async def install(host: Any, handler: Any) -> None:
        host.set_stream_handler(PROTOCOL_ID, handler)

    await on_trio(b, install, stall)
    with pytest.raises(TransportError, match="timed out"):
        await a.send(b.peer_id, b"z" * 40_000_000, timeout=1.0)
    assert kept(a, b.peer_id) == []  # the stream of the failed send is not kept
    await on_trio(b, install, b._on_stream)
    await a.send(b.peer_id, b"after", timeout=5)
    assert await inbox_b.get() == (a.peer_id, b"after")


def test_every_transport_and_the_node_default_to_one_message_cap() -> None:
    """A transport built without a node config (a relay server, an embedder's) had a
    256 MiB cap, four times the node's: its buffer bounds, derived from the cap, with it;
    a decoder without one took 128 MiB."""
    from p2pfl.config import NodeNetworkConfig
    from p2pfl.transport import memory
    from p2pfl.transport.limits import DEFAULT_MAX_MESSAGE_BYTES
    from p2pfl.wire import DEFAULT_LIMITS

    assert DEFAULT_MAX_MESSAGE_BYTES == 64 << 20
    assert libp2p_module.DEFAULT_MAX_MESSAGE_SIZE == DEFAULT_MAX_MESSAGE_BYTES
    assert memory.DEFAULT_MAX_MESSAGE_SIZE == DEFAULT_MAX_MESSAGE_BYTES
    assert NodeNetworkConfig().max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert DEFAULT_LIMITS.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES  # a decoder's too
    assert Libp2pTransport(create_new_key_pair()).max_message_size == DEFAULT_MAX_MESSAGE_BYTES
