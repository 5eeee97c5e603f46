"""The lean node round's transport changes (issue 17): fewer frames, wake-ups and
scheduler passes per message, the same bounds.

- a small frame is read without an eager yamux window update (one frame each way per
  message before), while a frame larger than the window left still gets its grant;
- the bytes a frame holds go back to the admission lazily, yet a frame waiting for room
  is woken as soon as the node has handled one;
- a bridge call's own deadline (``timeout``) fails it as ``trio.fail_after`` did;
- yamux's locks cost no scheduler pass when free and still exclude when held;
- peer ids are parsed once.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.stream_muxer.yamux.yamux import (
    FLAG_FIN,
    FLAG_SYN,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    YamuxStream,
)

from p2pfl.transport import _trio_bridge
from p2pfl.transport._trio_bridge import TrioThread
from p2pfl.transport._yamux import PatchedYamux, _adopt, _PatchedYamuxStream, _QuickLock
from p2pfl.transport.base import TransportError
from p2pfl.transport.libp2p import Libp2pTransport, _InlineFrames, _muxed, _parse_peer
from p2pfl.transport.limits import TransportLimits
from tests.transport_kit import Inbox, eventually, inbox_transports, running_trio_thread

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
MIB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Factory = Callable[..., Awaitable[tuple[Libp2pTransport, Inbox]]]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    async for factory in inbox_transports():
        yield factory


@pytest.fixture
def bridge() -> Iterator[TrioThread]:
    yield from running_trio_thread("p2pfl-trio-k1")


async def test_small_frames_cost_no_window_update_each(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates: list[int] = []
    original = _PatchedYamuxStream.send_window_update

    async def counted(self: _PatchedYamuxStream, increment: int, skip_lock: bool = False) -> None:
        updates.append(increment)
        await original(self, increment, skip_lock)

    monkeypatch.setattr(_PatchedYamuxStream, "send_window_update", counted)
    (receiver, inbox), (sender, _) = await make(), await make()
    await sender.connect(receiver.listen_addrs[0])
    payloads = [bytes([i]) * 10_000 for i in range(24)]  # a digits model is ~10 kB
    for payload in payloads:  # one after the other: one kept stream, as in a node's rounds
        await sender.send(receiver.peer_id, payload, timeout=10)
    assert [bytes((await inbox.get())[1]) for _ in payloads] == payloads
    # 240 kB over one stream: credit goes back once half of its 256 KiB is read (one
    # update), not once per frame (24 before); both directions count (acks are 1 byte)
    assert len(updates) <= 3, updates
    # a frame larger than the window left still gets its grant at once, and arrives
    big = b"\x07" * (3 * MIB)
    await sender.send(receiver.peer_id, big, timeout=20)
    assert bytes((await inbox.get())[1]) == big
    assert any(increment >= MIB for increment in updates)


async def test_a_frame_waiting_for_room_is_woken_by_a_handled_frame(make: Factory) -> None:
    # the node holds a peer's whole share; a frame that needs room waits on the trio
    # side until the asyncio side has handled a frame (no other frame arrives to apply
    # the lazily handed-over frees): the wake-up must come from ``_dispatch_held``
    receiver, inbox = await make(max_message_size=MIB, limits=TransportLimits())
    admission, bridge = receiver._admission, receiver._bridge
    assert admission is not None and bridge is not None
    share = admission.per_peer_bytes
    peer = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    await receiver._call("fill the share", admission.hold, peer, share)
    assert not bridge.run_sync(admission.fits, peer, 1000)
    waited = threading.Event()

    async def wait_for_room() -> bool:
        with trio.move_on_after(10) as timer:
            await receiver._hold_waiting(admission, peer, 1000)
        waited.set()
        return not timer.cancelled_caught

    waiting = asyncio.ensure_future(receiver._call("hold", wait_for_room))
    await eventually(lambda: receiver._waiting_room, 5, "the frame waits for room")
    assert receiver._waiting_room == 1 and not waited.is_set()
    receiver._dispatch_held(peer, b"handled", share)  # as the asyncio side does
    assert await asyncio.wait_for(waiting, 5) is True
    assert (await inbox.get())[1] == b"handled"
    assert bridge.run_sync(lambda: admission.held_by(peer)) == 1000
    assert receiver._waiting_room == 0


async def test_handled_frames_leave_nothing_held(make: Factory) -> None:
    (receiver, inbox), (sender, _) = await make(), await make()
    await sender.connect(receiver.listen_addrs[0])
    for i in range(5):
        await sender.send(receiver.peer_id, b"%d" % i * 1000, timeout=10)
    for _ in range(5):
        await inbox.get()
    admission, bridge = receiver._admission, receiver._bridge
    assert admission is not None and bridge is not None

    def held() -> int:
        receiver._apply_frees()  # what the next frame does first
        return admission.held_bytes

    assert bridge.run_sync(held) == 0


async def test_a_bridge_call_past_its_timeout_fails_as_too_slow(bridge: TrioThread) -> None:
    async def slow() -> str:
        await trio.sleep(5)
        return "late"

    async def quick() -> str:
        await trio.sleep(0)
        return "done"

    with pytest.raises(trio.TooSlowError):
        await bridge.run(slow, timeout=0.05)
    assert await bridge.run(quick, timeout=5) == "done"
    task = asyncio.ensure_future(bridge.run(slow, timeout=5))
    await asyncio.sleep(0.05)
    task.cancel()  # cancelled from asyncio: still a cancellation, not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_send_past_its_timeout_is_a_transport_error(make: Factory) -> None:
    (receiver, _), (sender, _) = await make(), await make()
    await sender.connect(receiver.listen_addrs[0])
    with pytest.raises(TransportError, match="timed out"):
        await sender.send(receiver.peer_id, b"x" * (8 * MIB), timeout=0.001)
    assert sender.stats()["send_failures"] == 1


def test_quick_lock_takes_no_checkpoint_when_free_and_excludes_when_held() -> None:
    order: list[str] = []

    async def main() -> None:
        lock = _QuickLock()
        with trio.testing.assert_no_checkpoints():
            async with lock:
                assert lock.locked()
        assert not lock.locked()

        async def holder(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with lock:
                task_status.started()
                order.append("holder in")
                await trio.sleep(0.05)
                order.append("holder out")

        async def second() -> None:
            async with lock:
                order.append("second in")

        async with trio.open_nursery() as nursery:
            await nursery.start(holder)
            nursery.start_soon(second)

    trio.run(main)
    assert order == ["holder in", "holder out", "second in"]


def test_peer_ids_are_parsed_once() -> None:
    peer = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    assert _parse_peer(peer) is _parse_peer(peer)
    assert _parse_peer(peer).to_base58() == peer
    with pytest.raises(TransportError, match="not a peer id"):
        _parse_peer("not-a-peer")
    with pytest.raises(TransportError, match="not a peer id"):
        _parse_peer("not-a-peer")  # a bad one is not remembered


def test_the_bridge_module_still_batches_to_asyncio() -> None:
    # trio -> asyncio hand-offs of the transport now go through the bridge's batches:
    # calls made while one drain is pending share its wake-up and keep their order
    loop = asyncio.new_event_loop()
    try:
        seen: list[int] = []
        for i in range(5):
            assert _trio_bridge.to_asyncio(loop, seen.append, i)
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(asyncio.sleep(0))
        assert seen == [0, 1, 2, 3, 4]
    finally:
        loop.close()
    assert not _trio_bridge.to_asyncio(loop, print, "closed")


def test_a_frame_whose_reset_is_read_before_its_first_byte_is_still_truncated() -> None:
    """A sender that writes part of a frame and resets its stream is charged a truncated
    frame. With fewer scheduler passes the connection's reader can take the frame's bytes
    and the reset in one go, before the stream's reader looks: the bytes are there, the
    first read raises; that is the same cut frame, not a stream that ended between frames."""
    from libp2p.network.stream.net_stream import NetStream
    from libp2p.stream_muxer.exceptions import MuxedStreamReset

    from p2pfl.transport.base import FrameAbuse
    from p2pfl.transport.libp2p import _FrameError

    class ResetMuxed:
        def __init__(self, waiting: int) -> None:
            self.waiting = waiting
            self.resets = 0

        async def read(self, n: int = -1) -> bytes:
            raise MuxedStreamReset("Stream was reset")

        def buffered(self) -> int:
            return self.waiting

        async def reset(self) -> None:
            self.resets += 1

    from libp2p.crypto.ed25519 import create_new_key_pair

    transport = Libp2pTransport(create_new_key_pair())

    async def await_frame(waiting: int) -> tuple[object, int]:
        muxed = ResetMuxed(waiting)
        stream = NetStream.__new__(NetStream)
        stream.muxed_stream = muxed  # type: ignore[assignment]
        stream.reset = muxed.reset  # type: ignore[method-assign]
        try:
            return await transport._await_frame(stream), muxed.resets
        except _FrameError as error:
            return error, muxed.resets

    cut, _ = trio.run(await_frame, 14)  # a length prefix and 10 bytes, then the reset
    assert (
        isinstance(cut, _FrameError)
        and cut.abuse == FrameAbuse.TRUNCATED
        and cut.counter == "truncated"
    )
    assert trio.run(await_frame, 0) == (None, 1)  # nothing had begun: the stream just ended


def _outcomes(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[bool]:
    """What each call of ``owner.name`` (a method answering whether it took something)
    returned, in order, from now on."""
    outcomes: list[bool] = []
    original = getattr(owner, name)

    def counted(self: object, *args: object) -> bool:
        outcomes.append(original(self, *args))
        return outcomes[-1]

    monkeypatch.setattr(owner, name, counted)
    return outcomes


async def _send_one_by_one(make: Factory, count: int) -> Libp2pTransport:
    """``count`` digits-sized messages from a new transport to another, one after the
    other (one kept stream), each received intact and in order; the receiver."""
    (receiver, inbox), (sender, _) = await make(), await make()
    await sender.connect(receiver.listen_addrs[0])
    payloads = [bytes([i]) * 10_000 for i in range(count)]
    for payload in payloads:
        await sender.send(receiver.peer_id, payload, timeout=10)
    assert [bytes((await inbox.get())[1]) for _ in payloads] == payloads
    return receiver


async def test_message_frames_bypass_py_libp2ps_reader(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the data frames of messages and of their acknowledgements are taken in the
    # connection reader's header read (``_took``); only the others (a stream's SYN and
    # its acknowledgement) reach py-libp2p's reader loop
    took = _outcomes(monkeypatch, PatchedYamux, "_took")
    await _send_one_by_one(make, 10)
    # both hosts: 10 messages and 10 acknowledgements, all on one kept stream
    assert took.count(True) >= 2 * 10 - 2, took


class _Decrypted:
    """What ``_FastNoise.take_decrypted`` gives: whole bodies that are already here."""

    def __init__(self, plain: bytes = b"") -> None:
        self.plain = plain

    def take_decrypted(self, length: int) -> bytes | None:
        if len(self.plain) < length:
            return None
        body, self.plain = self.plain[:length], self.plain[length:]
        return body


def _reader_state(abuse: list[str]) -> tuple[PatchedYamux, _PatchedYamuxStream]:
    """A connection's reader state with one open stream of ours (id 3), no socket."""
    conn = PatchedYamux.__new__(PatchedYamux)
    conn.streams, conn.stream_buffers, conn.stream_events = {}, {}, {}
    conn.streams_lock = _QuickLock()  # type: ignore[assignment]
    conn.event_shutting_down = trio.Event()
    conn._fast = _Decrypted()  # type: ignore[assignment]
    conn._abused = False
    conn._watchers = {}
    conn.on_abuse = lambda peer, why: abuse.append(why)
    conn.peer_id = None  # type: ignore[assignment]
    conn.stream_backlog_semaphore = trio.Semaphore(256)
    stream = YamuxStream(3, conn, False)
    _adopt(stream)
    assert isinstance(stream, _PatchedYamuxStream)
    conn.streams[3], conn.stream_buffers[3], conn.stream_events[3] = (
        stream,
        bytearray(),
        trio.Event(),
    )
    return conn, stream


def _header(kind: int, flags: int, stream_id: int, length: int) -> bytes:
    return struct.pack(YAMUX_HEADER_FORMAT, 0, kind, flags, stream_id, length)


def test_the_readers_shortcut_does_what_py_libp2ps_reader_does() -> None:
    abuse: list[str] = []
    conn, stream = _reader_state(abuse)
    fast = conn._fast
    assert isinstance(fast, _Decrypted)
    window = stream.recv_window
    # a data frame whose body is here: buffered, window taken, the stream's reader woken
    fast.plain = b"abcde" + b"rest"
    assert conn._took(_header(TYPE_DATA, 0, 3, 5))
    assert conn.stream_buffers[3] == b"abcde" and fast.plain == b"rest"
    assert stream.recv_window == window - 5 and conn.stream_events[3].is_set()
    # a window update: the send window grows, a writer waiting for it is woken
    stream.send_window = 0
    stream._window_opened = trio.Event()
    assert conn._took(_header(TYPE_WINDOW_UPDATE, 0, 3, 1000))
    assert stream.send_window == 1000 and stream._window_opened.is_set()
    # everything else is left to py-libp2p's reader, untouched
    left = [
        _header(TYPE_DATA, 0, 3, 10),  # its body is not all here yet
        _header(TYPE_DATA, FLAG_FIN, 3, 2),  # a flag
        _header(TYPE_WINDOW_UPDATE, FLAG_SYN, 5, 0),  # a new stream
        _header(TYPE_DATA, 0, 7, 2),  # an unknown stream: its body is drained there
        _header(TYPE_DATA, 0, 3, 0),  # empty
        _header(2, FLAG_SYN, 0, 1),  # a yamux ping
    ]
    for header in left:
        assert not conn._took(header), header
    assert conn.stream_buffers[3] == b"abcde" and fast.plain == b"rest"

    async def while_held() -> bool:  # held by another task: wait there, not here
        async with conn.streams_lock:
            return conn._took(_header(TYPE_DATA, 0, 3, 2))

    assert not trio.run(while_held)
    assert abuse == []
    # past the window: reported once, as a whole connection's abuse, the window at 0
    fast.plain = bytes(stream.recv_window + 1)
    assert conn._took(_header(TYPE_DATA, 0, 3, len(fast.plain)))
    assert stream.recv_window == 0 and len(abuse) == 1 and "past the window" in abuse[0]


def test_a_fully_closed_stream_is_dropped_once_its_last_bytes_are_read() -> None:
    conn, stream = _reader_state([])
    stream.closed = True  # both sides closed; a window update still arrives
    assert conn._took(_header(TYPE_WINDOW_UPDATE, 0, 3, 10))
    assert 3 not in conn.streams and 3 not in conn.stream_buffers  # nothing left to read


async def test_frames_on_a_kept_stream_are_taken_as_they_arrive(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a kept stream's frames after its first are taken by the connection's reader
    # (``_InlineFrames``), held, handed over, counted and acknowledged as the stream's
    # task would; the sends succeed, in order, and nothing stays held
    taken = _outcomes(monkeypatch, _InlineFrames, "__call__")
    receiver = await _send_one_by_one(make, 12)
    assert taken.count(True) >= 12 - 3, taken  # all but the first and a few
    assert receiver.stats()["messages_received"] == 12
    admission, bridge = receiver._admission, receiver._bridge
    assert admission is not None and bridge is not None

    def held() -> int:
        receiver._apply_frees()
        return admission.held_bytes

    assert bridge.run_sync(held) == 0


async def test_a_small_frame_is_written_at_once_and_the_rest_awaited(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a digits-sized message goes to the socket at once when the connection is free
    # (``try_write_now``: no shielded write to wait for); one above a Noise message, or
    # while another write holds the connection, takes the awaited write; all arrive
    at_once = _outcomes(monkeypatch, _PatchedYamuxStream, "try_write_now")
    (receiver, inbox), (sender, _) = await make(), await make()
    await sender.connect(receiver.listen_addrs[0])
    payloads = [bytes([i]) * 10_000 for i in range(8)] + [b"L" * 200_000]
    for payload in payloads:
        await sender.send(receiver.peer_id, payload, timeout=10)
    assert [bytes((await inbox.get())[1]) for _ in payloads] == payloads
    # the frames of the 8 small messages (the last one is not tried: two writes)
    assert len(at_once) == 8 and at_once.count(True) >= 8 - 2, at_once
    bridge = sender._bridge
    assert bridge is not None

    def busy_connection_refuses() -> bool:  # a write in progress: not now, nothing sent
        stream = next(iter(sender._idle.values()))[0][0]
        muxed = _muxed(stream)
        assert isinstance(muxed, _PatchedYamuxStream) and isinstance(muxed.conn, PatchedYamux)
        window = muxed.send_window
        conn = muxed.conn
        conn._write_lock.acquire_nowait()
        try:
            refused = not muxed.try_write_now(b"x" * 100)
        finally:
            conn._write_lock.release()
        return refused and muxed.send_window == window

    assert bridge.run_sync(busy_connection_refuses)
    assert receiver.stats()["messages_received"] == len(payloads)


def test_a_frame_the_socket_takes_in_part_goes_first_with_the_next_write() -> None:
    # ``send_now`` (the reader's acknowledgements) never waits: what the kernel does not
    # take is kept, and the next write on the connection sends it first, whole
    import socket
    from types import SimpleNamespace

    from p2pfl.transport._yamux import _FastNoise

    class Clear:  # a cipher that leaves the bytes as they are: the framing is what counts
        def encrypt_with_ad(self, ad: object, plaintext: memoryview) -> bytes:
            return bytes(plaintext)

    noise = SimpleNamespace(
        noise_state=SimpleNamespace(noise_protocol=SimpleNamespace(cipher_state_encrypt=Clear()))
    )

    async def main() -> bytes:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        fast = _FastNoise(noise, SimpleNamespace(stream=SimpleNamespace(stream=stream)), b"")  # type: ignore[arg-type]
        assert fast.can_send_now()
        filled = b""
        while True:  # the socket's buffer full: the kernel takes nothing more now
            try:
                filled += b"f" * ours.send(b"f" * 65536)
            except BlockingIOError:
                break
        assert not fast.send_now(b"ACK-FRAME")
        assert fast._backlog and not fast.can_send_now()
        got = bytearray()

        async def drain() -> None:
            while len(got) < len(filled) + 2 * 2 + len(b"ACK-FRAME") + len(b"next"):
                await trio.lowlevel.wait_readable(theirs.fileno())
                got.extend(theirs.recv(1 << 20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await fast.write(b"next")
        assert not fast._backlog and fast.can_send_now()
        ours.close()
        theirs.close()
        return bytes(got[len(filled) :])

    # each message is its 2-byte length, then its bytes: the acknowledgement first
    assert trio.run(main) == b"\x00\x09ACK-FRAME\x00\x04next"


async def test_the_readers_frames_are_refused_as_the_streams_task_would_refuse_them(
    make: Factory,
) -> None:
    # a frame the reader cannot take as a whole, sound frame with room for it now is
    # left for the stream's task (which refuses and charges it, or waits for room):
    # nothing held, nothing handed over, no acknowledgement
    from p2pfl.wire.framing import ACK, frame_header

    receiver, inbox = await make(max_message_size=MIB)
    admission, bridge = receiver._admission, receiver._bridge
    assert admission is not None and bridge is not None
    sender = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"

    class Muxed:  # the stream side: window for an acknowledgement, and what was written
        def __init__(self) -> None:
            self.window = 1
            self.written: list[bytes] = []

        def can_write_now(self, size: int) -> bool:
            return 0 < size <= self.window

        def write_now(self, data: bytes) -> None:
            self.written.append(data)

    muxed = Muxed()
    inline = _InlineFrames(receiver, muxed, sender)

    def take(body: bytes) -> bool:
        return bridge.run_sync(inline, body)

    good = frame_header(100) + bytes(100)
    refused = {
        "oversized": frame_header(MIB + 1) + bytes(MIB + 1),
        "empty": frame_header(0),
        "cut": frame_header(100) + bytes(99),
        "two frames": good + good,
        "a forged length": frame_header(2**32 - 1) + bytes(100),
        "no length": b"\x00\x00",
    }
    for why, body in refused.items():
        assert not take(body), why
    muxed.window = 0  # no window left for the acknowledgement
    assert not take(good)
    muxed.window = 1
    bridge.run_sync(admission.ban, sender, 60.0)
    assert not take(good)
    bridge.run_sync(admission._banned.pop, sender)
    share = admission.per_peer_bytes
    bridge.run_sync(admission.hold_now, sender, share)  # the sender's share is full
    assert not take(good)
    assert bridge.run_sync(admission.held_by, sender) == share
    bridge.run_sync(admission.free, sender, share)
    assert inbox.queue.empty() and muxed.written == []
    assert receiver.stats()["messages_received"] == 0
    # a sound frame with room: taken, handed over, counted, acknowledged once
    assert take(good)
    assert await inbox.get() == (sender, bytes(100))
    assert muxed.written == [ACK] and receiver.stats()["messages_received"] == 1
