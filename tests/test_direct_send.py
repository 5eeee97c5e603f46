"""Sends over a kept stream without a task of their own (issue 17, ``_DirectSend``).

The frame is written at once and the connection's reader takes the acknowledgement as
it arrives; everything else on the stream hands the send to a task that finishes it as
the send's task would. Each outcome of a send must be what it was with a task per
send: delivered and acknowledged, timed out, refused, retried on a new stream after a
close, failed on a reset, cancelled -- and nothing left behind (slots, deadlines, kept
streams).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID

import p2pfl.transport.libp2p as libp2p_module
from p2pfl.transport._trio_bridge import BridgeCall
from p2pfl.transport.base import TransportError
from p2pfl.transport.libp2p import ACK, HEADER_SIZE, PROTOCOL_ID, Libp2pTransport
from p2pfl.wire.framing import frame_length
from tests.test_transport_libp2p import Factory, anyio_backend, kept, make, on_trio, until

__all__ = ["anyio_backend", "make"]  # fixtures, used by name

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

Behaviour = Callable[[Any], Awaitable[None]]


def count_direct(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What ``_DirectSend.start`` answered for each send from now on."""
    outcomes: list[bool] = []
    original = libp2p_module._DirectSend.start

    def start(transport: Libp2pTransport, peer: ID, data: bytes, call: BridgeCall) -> bool:
        outcomes.append(original(transport, peer, data, call))
        return outcomes[-1]

    monkeypatch.setattr(libp2p_module._DirectSend, "start", staticmethod(start))
    return outcomes


def left_behind(transport: Libp2pTransport) -> dict[str, int]:
    """Slots taken and deadlines watched on ``transport`` (both 0 once sends are over)."""
    assert transport._bridge is not None
    return transport._bridge.run_sync(left_behind_now, transport)


async def second_frame_then(receiver: Libp2pTransport, behaviour: Behaviour) -> None:
    """From now on ``receiver`` acknowledges the first frame of each new stream and
    answers the second with ``behaviour(stream)``."""

    async def frame(stream: Any) -> bytes:
        header = await read_exactly(stream, HEADER_SIZE)
        return await read_exactly(stream, frame_length(header))

    async def handler(stream: Any) -> None:
        try:
            await frame(stream)
            await stream.write(ACK)
            await frame(stream)
            await behaviour(stream)
        except Exception:  # noqa: BLE001 - the sender reset it: the test looks at the sender
            pass

    async def install(host: Any) -> None:
        host.set_stream_handler(PROTOCOL_ID, handler)

    await on_trio(receiver, install)


async def connected_with_a_kept_stream(
    make: Factory, behaviour: Behaviour
) -> tuple[Libp2pTransport, Libp2pTransport]:
    (a, _), (b, _) = await make(), await make()
    await second_frame_then(b, behaviour)
    await a.connect(b.listen_addrs[0])
    await a.send(b.peer_id, b"first", timeout=5)  # a new stream: the send's task
    assert len(kept(a, b.peer_id)) == 1
    return a, b


async def test_sends_over_a_kept_stream_take_no_task(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = count_direct(monkeypatch)
    tasks: list[BridgeCall] = []
    start_task = BridgeCall.start_task

    def counted(call: BridgeCall) -> None:
        tasks.append(call)
        start_task(call)

    monkeypatch.setattr(BridgeCall, "start_task", counted)
    (receiver, inbox), (sender, _) = await make(), await make()
    await sender.connect(receiver.listen_addrs[0])
    payloads = [bytes([i]) * 10_000 for i in range(12)]
    for payload in payloads:
        await sender.send(receiver.peer_id, payload, timeout=10)
    assert [bytes((await inbox.get())[1]) for _ in payloads] == payloads
    assert direct.count(True) >= 12 - 2, direct  # all but the first (a new stream)
    sends = [call for call in tasks if getattr(call.fn, "__name__", "") == "_send_in_trio"]
    assert len(sends) == direct.count(False), (len(sends), direct)
    assert len(kept(sender, receiver.peer_id)) == 1  # the one stream, kept again each time
    assert left_behind(sender) == {"slots": 0, "deadlines": 0}
    assert sender.stats()["send_failures"] == 0
    assert receiver.stats()["messages_received"] == 12


async def test_no_acknowledgement_times_out_and_resets_the_stream(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await connected_with_a_kept_stream(make, lambda stream: trio.sleep_forever())
    [stream] = kept(a, b.peer_id)
    direct = count_direct(monkeypatch)
    began = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        await a.send(b.peer_id, b"second", timeout=1.0)
    assert 0.9 < time.monotonic() - began < 3.0
    assert direct == [True]
    await until(a, lambda: bool(stream.muxed_stream.closed or stream.muxed_stream.send_closed))
    assert kept(a, b.peer_id) == [] and left_behind(a) == {"slots": 0, "deadlines": 0}
    assert a.stats()["send_failures"] == 1
    await on_trio(b, lambda host: _install_default(b, host))
    await a.send(b.peer_id, b"after", timeout=5)  # the peer is still reachable


async def _install_default(transport: Libp2pTransport, host: Any) -> None:
    host.set_stream_handler(PROTOCOL_ID, transport._on_stream)


async def _garbage(stream: Any) -> None:
    await stream.write(b"?")
    await trio.sleep_forever()


async def _reset(stream: Any) -> None:
    await stream.reset()


@pytest.mark.parametrize(
    ("answer", "said"), [(_garbage, "instead of an acknowledgement"), (_reset, "send to")]
)
async def test_an_answer_that_is_not_an_acknowledgement_fails_the_send(
    make: Factory, monkeypatch: pytest.MonkeyPatch, answer: Behaviour, said: str
) -> None:
    # another byte, or a reset: the send goes on as a task, which fails it (not a retry)
    a, b = await connected_with_a_kept_stream(make, answer)
    direct = count_direct(monkeypatch)
    began = time.monotonic()
    with pytest.raises(TransportError, match=said):
        await a.send(b.peer_id, b"second", timeout=5)
    assert time.monotonic() - began < 2.0 and direct == [True]
    assert kept(a, b.peer_id) == [] and left_behind(a) == {"slots": 0, "deadlines": 0}


async def test_a_stream_closed_after_the_frame_is_retried_on_a_new_one(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def close(stream: Any) -> None:  # our FIN where the acknowledgement was due
        await stream.close()
        await trio.sleep_forever()

    a, b = await connected_with_a_kept_stream(make, close)
    [first] = kept(a, b.peer_id)
    direct = count_direct(monkeypatch)
    began = time.monotonic()
    await a.send(b.peer_id, b"second", timeout=5)  # on a new stream: its first frame
    assert time.monotonic() - began < 2.0 and direct == [True]
    [second] = kept(a, b.peer_id)
    assert second is not first
    assert a.stats()["send_failures"] == 0 and left_behind(a) == {"slots": 0, "deadlines": 0}


async def test_a_cancelled_send_resets_the_stream_and_frees_its_slot(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await connected_with_a_kept_stream(make, lambda stream: trio.sleep_forever())
    [stream] = kept(a, b.peer_id)
    direct = count_direct(monkeypatch)
    send = asyncio.ensure_future(a.send(b.peer_id, b"second", timeout=30))
    await until(a, lambda: left_behind_now(a)["deadlines"] == 1)
    assert direct == [True]
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send
    await until(a, lambda: left_behind_now(a) == {"slots": 0, "deadlines": 0})
    await until(a, lambda: bool(stream.muxed_stream.closed or stream.muxed_stream.send_closed))
    assert kept(a, b.peer_id) == []


def left_behind_now(transport: Libp2pTransport) -> dict[str, int]:
    """``left_behind`` read on the trio thread itself (inside ``until``)."""
    deadlines = transport._deadlines
    return {
        "slots": len(transport._send_slots),
        "deadlines": len(deadlines._sends) if deadlines is not None else 0,
    }


@pytest.mark.parametrize("closing", ["receiver", "sender"])
async def test_a_send_waiting_when_either_end_closes_fails_at_once(
    make: Factory, monkeypatch: pytest.MonkeyPatch, closing: str
) -> None:
    # the receiver: the reader of the sender's connection ends, the send goes on as a
    # task, whose retry finds no connection and cannot dial one; the sender: the
    # deadlines' watcher stops with the transport and ends the send
    a, b = await connected_with_a_kept_stream(make, lambda stream: trio.sleep_forever())
    direct = count_direct(monkeypatch)
    send = asyncio.ensure_future(a.send(b.peer_id, b"second", timeout=30))
    await until(a, lambda: left_behind_now(a)["deadlines"] == 1)
    began = time.monotonic()
    await (b if closing == "receiver" else a).close()
    with pytest.raises(TransportError):
        await asyncio.wait_for(send, 15)
    assert time.monotonic() - began < 10.0 and direct == [True]
    if closing == "receiver":
        assert left_behind(a) == {"slots": 0, "deadlines": 0}


async def test_send_soon_reports_each_outcome_once_on_the_loop(make: Factory) -> None:
    (a, _), (b, inbox_b) = await make(), await make()
    await a.connect(b.listen_addrs[0])
    outcomes: dict[str, list[BaseException | None]] = {}
    all_in = asyncio.Event()

    def reporter(name: str) -> Callable[[BaseException | None], None]:
        def report(error: BaseException | None) -> None:
            outcomes.setdefault(name, []).append(error)
            if len(outcomes) == 4:
                all_in.set()

        return report

    a.send_soon(b.peer_id, b"one", timeout=5, done=reporter("one"))
    a.send_soon(b.peer_id, b"two", timeout=5, done=reporter("two"))  # (one in flight: a task)
    a.send_soon("not a peer id", b"x", timeout=5, done=reporter("bad id"))
    a.send_soon(b.peer_id, b"x" * (a.max_message_size + 1), timeout=5, done=reporter("too big"))
    assert outcomes == {}  # never before it returns
    await asyncio.wait_for(all_in.wait(), 10)
    assert outcomes["one"] == [None] and outcomes["two"] == [None]
    for name in ("bad id", "too big"):
        [error] = outcomes[name]
        assert isinstance(error, TransportError), (name, error)
    assert sorted([(await inbox_b.get())[1] for _ in range(2)]) == [b"one", b"two"]
    stats = a.stats()
    assert stats["messages_sent"] == 2 and stats["send_failures"] == 2


async def test_the_default_send_soon_runs_send_in_a_task() -> None:
    from p2pfl.transport.memory import MemoryNetwork, MemoryTransport

    network = MemoryNetwork(seed=0)
    a, b = MemoryTransport(network, "peer-a"), MemoryTransport(network, "peer-b")
    got: list[tuple[str, bytes]] = []
    b.set_handler(lambda sender, data: got.append((sender, bytes(data))))
    await a.start()
    await b.start()
    outcomes: dict[str, BaseException | None] = {}
    two = asyncio.Event()

    def reporter(name: str) -> Callable[[BaseException | None], None]:
        def report(error: BaseException | None) -> None:
            outcomes[name] = error
            if len(outcomes) == 2:
                two.set()

        return report

    a.send_soon("peer-b", b"hello", timeout=5, done=reporter("b"))
    a.send_soon("peer-nobody", b"hello", timeout=5, done=reporter("nobody"))
    assert outcomes == {}
    await asyncio.wait_for(two.wait(), 10)
    assert outcomes["b"] is None and isinstance(outcomes["nobody"], TransportError)
    assert got == [("peer-a", b"hello")]
    await a.close()
    await b.close()
