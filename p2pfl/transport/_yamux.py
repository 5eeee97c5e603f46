"""py-libp2p's yamux with measured faults fixed: a two-way deadlock and a slow data path.

Deadlock.  In py-libp2p 0.8.1 the task that reads frames off a connection also
writes some frames itself (the acknowledgement of a stream the peer opened, the
answer to a yamux ping, the reset of an unknown stream), inline, behind the
connection's write lock.  When two peers send large payloads to each other and
either opens a new stream, each side's writer holds the lock while blocked on a
full TCP buffer and each side's reader waits for that lock: neither reads again.
Measured: about one run in fifteen of three hosts exchanging 5 MB payloads both
ways at once hung until the send timeout.  Here the reader queues such frames
and a helper task writes them, so the reader keeps draining the socket.  The
only reordering this allows is that our first frames on a stream the peer
opened may overtake that stream's acknowledgement; yamux implementations accept
them (py-libp2p files data by stream id).

Data path.  Every stream starts with yamux's 256 KiB window, which py-libp2p
grows only within RTT-based epochs that barely open on loopback; a sender out
of window polls for an update every 10 ms; the receiver sends a WINDOW_UPDATE
frame after nearly every read, even of one byte (multistream-select reads byte
by byte); and 64 KiB data frames are one byte too big for a Noise message, so
each travels as two, and every frame costs a dozen trio checkpoints.  With one
stream per payload that meant ~20 ms per tiny message and 20-35 MB/s.  Here:

- a stream grants its peer yamux's initial 256 KiB window and no more until the
  transport admits a frame on it (``admit``: its bytes fit the buffer bounds of
  ``p2pfl.transport.limits``); then up to 4 MiB more of that frame at a time, so
  that what a peer can push unread is 256 KiB per stream, and the rest is bytes
  the transport has agreed to hold (16 MiB windows, go-yamux's maximum, were no
  faster on loopback);
- read credit goes back go-yamux style, in one update once half the allowance
  has been read; admitting a frame that is already here, or that the window left
  lets the peer finish (a small model), sends no update at all (an eager one cost
  one more frame per message, written here and read by the peer);
- a peer that sends past the window it was granted (py-libp2p only logs that and
  buffers the bytes), or opens a stream with more than the initial window in its SYN
  frame (py-libp2p took up to 16 MiB there), gets its connection closed and is
  reported to the transport;
- with ``count_unread``, what the streams hold unread beyond admitted frames is counted
  and bounded node-wide (``_unread``): the initial windows cannot be withheld, so bytes
  over the budget are dropped and their stream reset;
- data frames carry up to ~1 MiB (within any peer's window: yamux bounds a
  frame by the window only), cut to fill whole Noise messages;
- a writer out of window wakes on the window update instead of polling;
- a stream's reads and writes take none of py-libp2p's locks: on the one trio
  thread, looking at a buffer or window and taking from it involve no
  ``await``, and every lock acquisition is a trip through the scheduler (a
  tiny frame and its acknowledgement took 32 of them, now 10); the
  connection's stream and write locks and a stream's window lock are taken
  without one when free (``_QuickLock``), and a control frame (window update,
  SYN, FIN) is not followed by one;
- a data frame's body that was decrypted with its header is taken without a
  timer (a cancel scope per frame);
- the frames that carry messages (data on an open stream, window updates) are
  handled as their header is read, without py-libp2p's reader loop (its debug lines
  are built for every frame, logged or not); every other frame still goes there;
- below yamux, the Noise session (``_FastNoise``) reads the socket in large
  chunks instead of two or more receives per Noise message, writes a data
  frame's Noise messages with one send instead of one each, encrypts and
  decrypts without copying first, and decrypts a frame's body straight into one
  buffer (py-libp2p copied it four times on the way); sends and receives go to
  the socket itself and pass through trio's scheduler only to wait (and after a
  bulk chunk), not after every call as trio's socket methods do.  A send cut off part-way
  (a timed-out send) closes the connection: a partial Noise message would leave
  the peer waiting for the rest, then unable to decrypt anything.

All of it is plain yamux on the wire, so any yamux peer copes.  py-libp2p
builds a plain ``Yamux`` whenever yamux is negotiated, whatever class the
host's muxer options name, so ``use_patched_yamux`` swaps in a negotiator that
builds ours.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import deque
from collections.abc import Callable

from p2pfl.versions import require

# everything below patches py-libp2p internals measured on this release only
require("libp2p", at_least="0.8.1", below="0.8.2", why="p2pfl.transport._yamux")

import trio
from cryptography.exceptions import InvalidTag
from libp2p.abc import IHost, IMuxedConn, ISecureConn
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.peer.id import ID
from libp2p.security.noise.io import (
    MAX_PLAINTEXT_LENGTH,
    SIZE_NOISE_MESSAGE_LEN,
    NoisePacketReadWriter,
    NoiseTransportReadWriter,
)
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import (
    DEFAULT_WINDOW_SIZE,
    FLAG_ACK,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER_SIZE,
    MAX_WINDOW_SIZE,
    PROTOCOL_ID,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)
from noise.exceptions import NoiseInvalidMessage

from ._inbound import source_of
from ._streams import reset_quietly
from ._unread import UnreadBudget, UnreadBuffers, recount

__all__ = [
    "ADMITTED_WINDOW",
    "BASE_WINDOW",
    "FRAME_PAYLOAD",
    "PatchedYamux",
    "count_unread",
    "use_patched_yamux",
]

_unpack_header = struct.Struct(YAMUX_HEADER_FORMAT).unpack
_pack_header = struct.Struct(YAMUX_HEADER_FORMAT).pack

FRAME_PAYLOAD = 16 * MAX_PLAINTEXT_LENGTH - HEADER_SIZE
"""Data-frame payload (~1 MiB) whose frame fills exactly 16 Noise transport messages."""

WINDOW_WAIT = 120.0
"""Seconds a writer waits for window before the stream fails.

py-libp2p waits 5 s; a receiver now grants window only once it has room to hold the
frame, which may take longer, and every send of this project runs under its own
timeout anyway."""

BASE_WINDOW = DEFAULT_WINDOW_SIZE
"""What a stream may have outstanding outside an admitted frame (yamux's initial window)."""

ADMITTED_WINDOW = 4 * 1024 * 1024
"""Window granted on top for the rest of an admitted frame: bytes that arrived but are
not read yet are the part of a frame the transport does not see, so they are kept to
a few MiB (16 MiB, go-yamux's maximum, made no difference to loopback throughput)."""

RECEIVE_SIZE = 1024 * 1024
"""Bytes asked of the socket per receive by ``_FastNoise``."""

DATA_READ_TIMEOUT = 60.0
"""Seconds to wait for an announced data frame's body (py-libp2p's default)."""

MAX_DEFERRED = 4096
"""Frames the reader may leave for the helper task to write (see ``_write_soon``): an
honest peer makes a few dozen wait at most, even while a large model is on its way."""

DIRECT_RECEIVES = 16
"""Receives in a row (up to ``RECEIVE_SIZE`` each) after which a connection's reader
yields to trio's other tasks although more bytes are there."""

BULK = 64 * 1024
"""Bytes from which a receive or send on the socket is part of a bulk transfer: followed
by a trip through the scheduler as in trio's own socket calls (the others skip it)."""


class PatchedYamux(Yamux):
    """A ``Yamux`` connection whose reader never waits to write, with wide stream windows."""

    #: told (peer id, why) when the peer breaks the flow control, and then to close its
    #: connections (without one, the connection closes itself); set by the negotiator
    on_abuse: Callable[[ID, str], None] | None = None

    #: counts (and bounds) the bytes its streams hold unread; set by ``use_budget``
    _budget: UnreadBudget | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # taken for every frame read and written: no scheduler trip when free (see _QuickLock)
        self.streams_lock = _QuickLock()  # type: ignore[assignment]
        self._write_lock = _QuickLock()  # type: ignore[assignment]
        self._abused = False
        self._reader_task: trio.lowlevel.Task | None = None
        self._deferred: deque[bytes] = deque()
        self._flushing = False
        self._fast = _FastNoise.install(self.secured_conn)
        if self._fast is not None:
            self.secured_conn.read = self._read_header  # type: ignore[method-assign]
        #: per stream id, told once when a frame of that stream is not taken by its
        #: ``inline`` consumer, or the reader ends (``watch``)
        self._watchers: dict[int, Callable[[], None]] = {}
        self._reader_done = False

    def use_budget(self, budget: UnreadBudget) -> None:
        """Count the bytes this connection's streams hold unread in ``budget`` (see
        ``_unread``), under the connection's source address (its peer's id if relayed:
        the address is the relay's); call before the connection runs."""
        holder = None
        try:
            if self.get_connection_type() != ConnectionType.RELAYED:
                holder = source_of(self.secured_conn)
        except Exception:  # noqa: BLE001 - a transport that does not say: count per peer
            holder = None
        self._budget = budget
        self.stream_buffers = UnreadBuffers(self, budget, holder or f"peer {self.peer_id}")

    def _check_initial_window(self, stream_id: int, buffered: int) -> None:
        """A stream the peer opened with more data than yamux's initial window: py-libp2p
        only logs that (the window check of ``_PatchedYamuxStream`` is not in place yet
        while its SYN frame is read), so one SYN frame could carry 16 MiB."""
        if buffered > BASE_WINDOW and type(self.streams.get(stream_id)) is YamuxStream:
            self._window_exceeded(stream_id, buffered - BASE_WINDOW)

    def _refuse_unread(self, stream_id: int) -> None:
        """Reset a stream whose unread bytes did not fit the budget (they are dropped)."""
        stream = self.streams.get(stream_id)
        nursery = self._nursery
        if stream is None or nursery is None:
            return
        nursery.start_soon(self._reset_refused, stream, self.stream_events.get(stream_id))

    async def _reset_refused(self, stream: YamuxStream, event: trio.Event | None) -> None:
        await reset_quietly(stream)
        if event is not None:  # a reader waiting for bytes: wake it to see the reset
            event.set()

    async def _write_data(self, header: bytes, payload: memoryview) -> None:
        """Write a data frame without first copying its payload behind its header."""
        if self._fast is None:
            await self._write_frame(header + payload)
            return
        async with self._write_lock:  # no trip through the scheduler when free (the usual case)
            await self._fast.write(header, payload)  # sending yields to the scheduler once

    async def _read_data_body(self, length: int) -> bytes:
        if self._fast is None:
            return await super()._read_data_body(length)
        body = self._fast.take_decrypted(length)
        if body is not None:  # decrypted with its header (a small frame): no timer, no wait
            return body
        with trio.fail_after(DATA_READ_TIMEOUT):
            return await self._fast.read_body(length)  # type: ignore[return-value]

    async def _read_header(self, n: int | None = None) -> bytes:
        """The reader's next frame header, after handling the frames that need nothing
        of py-libp2p's reader here (see ``_took``).

        py-libp2p's reader reads each header through this (the secured connection's
        ``read``) and then spends, on every frame, more than the frame's own work: half a
        dozen debug lines built whether logged or not, a list of flag names, a coroutine
        per lock and per body. The two frames that carry a message (its data, on a stream
        both sides have open; the window update that lets it through) are handled here
        without any of that, with the same effect on the streams; every other frame,
        and any of those two that would have to wait (a lock held, a body not decrypted
        yet), goes to py-libp2p's reader as before.
        """
        fast = self._fast
        assert fast is not None  # installed only with it
        while True:
            header = await fast.read(n)
            if (
                n != HEADER_SIZE
                or len(header) != HEADER_SIZE
                or trio.lowlevel.current_task() is not self._reader_task
            ):
                return header
            if not self.event_shutting_down.is_set() and self._took(header):
                continue
            if self._watchers:  # py-libp2p's reader handles it: a watcher looks after that
                self._tell(_unpack_header(header)[3])
            return header

    def _took(self, header: bytes) -> bool:
        """Handle a data frame or window update without flags, on an open stream of ours,
        as py-libp2p's reader would, if that needs no wait; False (nothing done) otherwise."""
        fast = self._fast
        _, kind, flags, stream_id, length = _unpack_header(header)
        if flags or self.streams_lock.locked():
            return False
        stream = self.streams.get(stream_id)
        if type(stream) is not _PatchedYamuxStream:
            return False  # unknown (its body is drained there), or not one of ours
        if kind == TYPE_DATA:
            buffer = self.stream_buffers.get(stream_id)
            event = self.stream_events.get(stream_id)
            if not 0 < length <= MAX_WINDOW_SIZE or buffer is None or event is None:
                return False
            assert fast is not None
            body = fast.take_decrypted(length)
            if body is None:  # still on its way: py-libp2p waits for it, with a timer
                return False
            if stream.inline is not None and self._consumed(stream, buffer, body):
                return True
            buffer.extend(body)
            stream.recv_window -= length  # below 0: the peer broke flow control (reported)
            if stream.recv_window < 0:
                stream.recv_window = 0
            event.set()
            if self._watchers:  # buffered, not taken inline: the watcher reads it
                self._tell(stream_id)
        elif kind == TYPE_WINDOW_UPDATE:
            if stream.window_lock.locked():
                return False
            stream.send_window += length
        else:
            return False
        if stream.closed:
            self._finalize_stream_locked(stream, fully_closed=True)
        return True

    def _consumed(self, stream: _PatchedYamuxStream, buffer: bytearray, body: bytes) -> bool:
        """Whether the stream's reader-side consumer (``inline``) took ``body`` as it
        arrived: only while nothing is buffered or admitted on the stream, it is open both
        ways, and taking the body leaves no read credit due (the next read that gives
        credit back goes through the stream as usual)."""
        inline = stream.inline
        if (
            inline is None
            or buffer
            or stream._admitted
            or stream.closed
            or stream.recv_closed
            or stream.reset_received
        ):
            return False
        window = stream.recv_window - len(body)
        allowance = stream._allowance()
        if window < 0 or allowance - window >= allowance // 2 or not inline(body):
            return False
        stream.recv_window = window
        return True

    def send_now(self, frame: bytes) -> None:
        """Write a small frame from the connection's reader without waiting: sealed and
        handed to the socket at once when nothing else is being written or waits to be
        (what the kernel does not take goes first with the next write, and a helper
        task makes sure there is one); otherwise queued for the helper (``_write_soon``)."""
        if not self.try_send_now(frame):
            self._write_soon(frame)

    def try_send_now(self, frame: bytes) -> bool:
        """``send_now`` if nothing else is being written or waits to be, and ``frame`` is
        one Noise message at most; false (nothing done) otherwise."""
        fast = self._fast
        nursery = self._nursery
        if (
            fast is None
            or nursery is None
            or self._deferred
            or self._write_lock.locked()
            or len(frame) > MAX_PLAINTEXT_LENGTH
            or not fast.can_send_now()
        ):
            return False
        self._write_lock.acquire_nowait()
        try:
            whole = fast.send_now(frame)
        finally:
            self._write_lock.release()
        if not whole:
            nursery.start_soon(self._flush_backlog)
        return True

    async def _flush_backlog(self) -> None:
        """Send what the socket did not take of a frame ``send_now`` wrote (runs in the
        connection's nursery, behind the write lock as every write)."""
        fast = self._fast
        if fast is None:
            return
        try:
            async with self._write_lock:
                await fast.flush()
        except Exception:  # noqa: BLE001 - the connection is broken; its reader will notice
            pass

    async def handle_incoming(self) -> None:
        self._reader_task = trio.lowlevel.current_task()
        try:
            await super().handle_incoming()
        finally:
            self._reader_done = True
            watchers, self._watchers = self._watchers, {}
            for told in watchers.values():
                told()

    def watch(self, stream_id: int, told: Callable[[], None]) -> bool:
        """Call ``told()`` once, on the connection's reader, when a frame of stream
        ``stream_id`` is not taken by the stream's ``inline`` consumer (its bytes buffered,
        a flag, anything py-libp2p's reader handles) or when the reader ends; false (and
        never called) if nothing more will arrive on that stream: this connection's reader
        is not running, or the stream is closed for receiving or reset (what came before
        is the owner's to read).

        For an owner that does not wait on the stream (``inline`` takes what it expects)
        yet must hear of everything else: then it reads the stream the usual way."""
        stream = self.streams.get(stream_id)
        if (
            self._fast is None
            or self._reader_task is None
            or self._reader_done
            or self.event_shutting_down.is_set()
            or stream is None
            or stream.closed
            or stream.recv_closed
            or stream.reset_received
        ):
            return False
        self._watchers[stream_id] = told
        return True

    def unwatch(self, stream_id: int) -> None:
        self._watchers.pop(stream_id, None)

    def _tell(self, stream_id: int) -> None:
        told = self._watchers.pop(stream_id, None)
        if told is not None:
            told()

    async def _write_frame(self, data: bytes) -> None:
        data = self._grant_window(data)
        if trio.lowlevel.current_task() is self._reader_task and self._write_soon(data):
            await trio.lowlevel.checkpoint()
            return
        if self._fast is None:
            await super()._write_frame(data)
            return
        # py-libp2p's, less its debug line (built whether logged or not) and the trip
        # through the scheduler after every frame (a window update, a stream's SYN or FIN)
        async with self._write_lock:
            await self._fast.write(data)

    def _grant_window(self, frame: bytes) -> bytes:
        """Make the stream that a SYN or ACK frame opens or accepts one of ours."""
        if len(frame) != HEADER_SIZE:
            return frame
        _, kind, flags, stream_id, length = _unpack_header(frame)
        if kind != TYPE_WINDOW_UPDATE or not flags & (FLAG_SYN | FLAG_ACK) or length:
            return frame
        stream = self.streams.get(stream_id)
        if stream is not None:
            _adopt(stream)
        return frame

    def _window_exceeded(self, stream_id: int, excess: int) -> None:
        """The peer sent past its window: close the connection (go-yamux does the same).

        py-libp2p buffers such bytes and only logs, so a peer ignoring flow control
        could make a stream hold any amount; one data frame (at most 16 MiB, py-libp2p
        closes the connection on larger ones) is the most it gets in.
        """
        self._flow_abuse(f"sent {excess} bytes past the window of stream {stream_id}")

    def _flow_abuse(self, why: str) -> None:
        """The peer broke flow control: tell the owner (which closes its connections), or
        close this connection."""
        if self._abused:
            return
        self._abused = True
        if self.on_abuse is not None:  # the owner closes the peer's connections
            try:
                self.on_abuse(self.peer_id, why)
                return
            except Exception:  # noqa: BLE001 - a hook's bug must not stop the reader
                pass
        nursery = self._nursery
        if nursery is not None:
            nursery.start_soon(self._close_abused)

    async def _close_abused(self) -> None:
        with trio.move_on_after(5.0):
            try:
                await self.close(GO_AWAY_PROTOCOL_ERROR)
            except Exception:  # noqa: BLE001 - closing a connection that is going anyway
                pass

    def _write_soon(self, frame: bytes) -> bool:
        """Queue a frame for the helper task; False when there is no nursery to run it.

        At most ``MAX_DEFERRED`` frames wait: they are the answers the peer's own frames
        call for (pongs, acknowledgements, resets), so a peer that keeps sending such
        frames (a yamux ping flood) while reading nothing is breaking flow control;
        unbounded, the queue grew by ~8 MB/s of pongs from one peer, for as long as it
        kept sending. Its connection is dropped instead (and reported), with the queue.
        """
        nursery = self._nursery
        if nursery is None:
            return False
        if len(self._deferred) >= MAX_DEFERRED:
            self._flow_abuse(f"left {len(self._deferred)} of our answers unread")
            # closing takes the write lock, which the helper holds, blocked on the full
            # socket: drop the socket itself, so that the reader ends and the helper fails
            if self._fast is not None:
                self._fast.drop()
            self._deferred.clear()
            return True
        self._deferred.append(frame)
        if not self._flushing:
            self._flushing = True
            nursery.start_soon(self._flush_deferred)
        return True

    async def _flush_deferred(self) -> None:
        """Write queued frames in order; runs in the connection's nursery."""
        try:
            while self._deferred:
                await super()._write_frame(self._deferred.popleft())
        except Exception:  # noqa: BLE001 - the connection is broken; its reader will notice
            self._deferred.clear()
        finally:
            self._flushing = False


class _PatchedYamuxStream(YamuxStream):
    """A yamux stream with large Noise-aligned frames and rare, large read-credit updates."""

    _window_opened: trio.Event | None = None

    #: set by the stream's owner while it waits for the next message and nothing is
    #: buffered: called by the connection's reader with a data frame's body as it arrives;
    #: true if it took the body (then it is not buffered and nobody is woken)
    inline: Callable[[bytes], bool] | None = None

    @property
    def _admitted(self) -> int:
        """Bytes of an admitted frame not read yet (the unread budget does not count them)."""
        return self.__dict__.get("_admitted", 0)

    @_admitted.setter
    def _admitted(self, value: int) -> None:
        self.__dict__["_admitted"] = value
        recount(self.conn.stream_buffers.get(self.stream_id))

    @property
    def recv_window(self) -> int:
        return self.__dict__["recv_window"]

    @recv_window.setter
    def recv_window(self, value: int) -> None:
        # The connection's reader lowers it by each data frame's length before checking.
        if value < 0:
            conn = self.conn
            if isinstance(conn, PatchedYamux):
                conn._window_exceeded(self.stream_id, -value)
        self.__dict__["recv_window"] = value

    @property
    def send_window(self) -> int:
        return self.__dict__["send_window"]

    @send_window.setter
    def send_window(self, value: int) -> None:
        # The connection's reader raises it on WINDOW_UPDATE: wake a writer waiting for it.
        self.__dict__["send_window"] = value
        if value > 0 and self._window_opened is not None:
            self._window_opened.set()

    async def write(self, data: bytes) -> None:
        """Send ``data`` in frames of up to ``FRAME_PAYLOAD`` bytes, as the window allows.

        Looking at the state and taking window involve no ``await``, so on the one trio
        thread they need none of py-libp2p's locks (each costs a trip through the
        scheduler); the connection's write lock still keeps every frame whole.
        """
        view = memoryview(data)
        sent, total = 0, len(data)
        while sent < total:
            if self.send_closed:
                raise MuxedStreamError("Stream is closed for sending")
            if self.closed:
                raise MuxedStreamError("Stream is closed")
            size = min(self.send_window, FRAME_PAYLOAD, total - sent)
            if size > 0:
                self.send_window -= size
            else:
                await self._wait_for_window()
                continue
            header = _pack_header(0, TYPE_DATA, 0, self.stream_id, size)
            await self.conn._write_data(header, view[sent : sent + size])  # type: ignore[attr-defined]
            sent += size

    async def read(self, n: int | None = -1) -> bytes:
        """``read(n)`` that takes buffered bytes without py-libp2p's connection lock.

        Looking at the buffer and taking from it involve no ``await`` (one trio thread),
        and waiting uses the stream's event as py-libp2p's ``read_stream`` does; every
        case but "bytes are there, or will be" goes to py-libp2p's own ``read``.
        """
        if n is None or n <= 0:
            return await super().read(n)
        conn = self.conn
        sid = self.stream_id
        while True:
            buffer = conn.stream_buffers.get(sid)
            if buffer is None or self.reset_received or conn.event_shutting_down.is_set():
                break
            if buffer:
                if self.closed:
                    break  # py-libp2p drains it and drops the stream's bookkeeping
                if n >= len(buffer):
                    data = bytes(buffer)
                    buffer.clear()
                else:
                    with memoryview(buffer) as view:  # one copy, not a slice and a copy
                        data = bytes(view[:n])
                    del buffer[:n]
                await self._auto_tune_and_send_window_update(bytes_read=len(data))
                return data
            event = conn.stream_events.get(sid)
            if self.recv_closed or self.closed or event is None:
                break
            await event.wait()
            if conn.stream_events.get(sid) is event:
                conn.stream_events[sid] = trio.Event()
        return await super().read(n)

    def can_write_now(self, size: int) -> bool:
        """Whether ``write_now`` can send ``size`` bytes (open, within the send window)."""
        return not (self.send_closed or self.closed) and 0 < size <= min(
            self.send_window, FRAME_PAYLOAD
        )

    def write_now(self, data: bytes) -> None:
        """Send ``data`` (``can_write_now`` first) as one data frame, from the connection's
        reader, without waiting (``PatchedYamux.send_now``)."""
        self.send_window -= len(data)
        self.conn.send_now(self._data_frame(data))  # type: ignore[attr-defined]

    def try_write_now(self, data: bytes) -> bool:
        """Send ``data`` as one data frame at once, without waiting, if the window and the
        connection allow it now (``PatchedYamux.try_send_now``); false (nothing sent)
        otherwise. Written at once, a frame cannot be cut by a cancel: no shield needed."""
        if not self.can_write_now(len(data)):
            return False
        if not self.conn.try_send_now(self._data_frame(data)):  # type: ignore[attr-defined]
            return False
        self.send_window -= len(data)
        return True

    def _data_frame(self, data: bytes) -> bytes:
        return _pack_header(0, TYPE_DATA, 0, self.stream_id, len(data)) + data

    def buffered(self) -> int:
        """Bytes received on this stream and not read yet (reading them does not wait)."""
        return len(self.conn.stream_buffers.get(self.stream_id, b""))

    async def _wait_for_window(self) -> None:
        """Wait until the peer grants window, like py-libp2p: give up after 5 s."""
        deadline = trio.current_time() + WINDOW_WAIT
        while self.send_window <= 0 and not self.closed:
            if trio.current_time() >= deadline:
                raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")
            self._window_opened = trio.Event()
            with trio.move_on_after(0.01):  # a close or reset sets no event: look again soon
                await self._window_opened.wait()

    async def admit(self, size: int) -> None:
        """Let the peer send the ``size`` bytes of a frame the transport has room for.

        A frame whose bytes are already here, or which the window it has left lets the
        peer finish (every model of a small network), needs no update now: an eager one
        would cost a frame per message (written here, read there). Later reads give
        credit back as usual.
        """
        self._admitted = size
        if size - self.buffered() <= self.recv_window:
            return
        await self._send_credit(eager=True)

    def _allowance(self) -> int:
        """Bytes the peer may have outstanding (sent or allowed, not read by us)."""
        return BASE_WINDOW + min(self._admitted, ADMITTED_WINDOW)

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        admitted = self._admitted
        if admitted:  # (setting it recounts the stream's unread bytes)
            self._admitted = max(0, admitted - bytes_read)
        await self._send_credit(eager=False)

    async def _send_credit(self, *, eager: bool) -> None:
        """Give back read credit up to the allowance: at once for a newly admitted frame,
        otherwise in one update once half the allowance is due (as go-yamux does).

        Credit follows what the transport agreed to hold: outside an admitted frame a
        peer can never have more than ``BASE_WINDOW`` unread bytes on a stream.
        """
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        allowance = self._allowance()
        delta = allowance - (self.recv_window + buffered)
        if delta <= 0 or (not eager and delta < allowance // 2):
            return
        self.recv_window += delta
        await self.send_window_update(delta)


def _adopt(stream: YamuxStream) -> None:
    """Make a new stream a ``_PatchedYamuxStream`` (it keeps yamux's initial window).

    py-libp2p constructs its streams inline, so the class is switched on the
    instance (the subclass needs nothing from a constructor).  Nothing here awaits,
    so the stream's window lock is not needed on the single trio thread.
    """
    if type(stream) is YamuxStream:
        stream.__class__ = _PatchedYamuxStream
        stream.window_lock = _QuickLock()  # type: ignore[assignment]  # not held yet: new


class _QuickLock:
    """A ``trio.Lock`` whose acquisition takes no trip through the scheduler when free.

    py-libp2p's yamux takes its connection's stream lock for every frame it reads, its
    write lock for every frame it writes and a stream's window lock for every window
    update; ``trio.Lock`` yields to the scheduler on each even when nobody holds it
    (a pass of trio's run loop and an ``epoll_wait`` each). The critical sections are
    the same, so is the exclusion: a held lock is waited for as before (``acquire``).
    What is lost is only the checkpoint that uncontended acquisition implies; the
    readers and writers around these locks reach one at their next socket call.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

    async def acquire(self) -> None:
        lock = self._lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self) -> object:
        return self._lock.statistics()


_NOTHING = memoryview(b"")


class _FastNoise:
    """Buffered, batched I/O of one Noise session, installed over ``SecureSession.read/write``.

    Same bytes on the wire and the same semantics for yamux: ``read(n)`` returns
    ``n`` bytes (fewer only at the end of the connection, raising
    ``IncompleteReadError`` when there are none), ``write`` sends whole Noise
    messages.  Only the connection's yamux reader task reads, and every write goes
    through yamux's write lock, so neither needs a lock of its own.
    """

    def __init__(self, noise: NoiseTransportReadWriter, raw: ReadWriteCloser, left: bytes) -> None:
        self._noise = noise
        self._raw = raw
        # py-libp2p's TCP stream wraps a trio SocketStream in a lock per direction; yamux
        # already serialises the writes and has one reader, so use the socket stream directly
        socket_stream = getattr(getattr(raw, "stream", None), "stream", None)
        self._socket = socket_stream if isinstance(socket_stream, trio.SocketStream) else None
        # the non-blocking stdlib socket behind trio's (trio 0.35 keeps it as ``_sock``):
        # a send the kernel takes at once needs no trip through the scheduler
        raw_sock = getattr(self._socket.socket, "_sock", None) if self._socket else None
        self._raw_sock = (
            raw_sock
            if isinstance(raw_sock, socket.socket) and raw_sock.gettimeout() == 0.0
            else None
        )
        self._received = b""  # ciphertext from the socket, decrypted up to ``_at``
        self._at = 0
        self._plain = memoryview(left)  # decrypted bytes not yet read
        self._direct = 0  # receives in a row that did not wait (see _receive)
        self._eof = False
        #: sealed bytes the socket did not take in ``send_now``: sent first by the next write
        self._backlog = b""

    @classmethod
    def install(cls, session: ISecureConn) -> _FastNoise | None:
        """Take over the reads and writes of a Noise ``SecureSession``; None for other sessions."""
        noise = getattr(session, "conn", None)
        if not (
            type(session) is SecureSession
            and type(noise) is NoiseTransportReadWriter
            and type(noise.read_writer) is NoisePacketReadWriter
        ):
            return None
        left = session._drain(None)  # what the session buffered past the muxer negotiation
        fast = cls(noise, noise.read_writer.read_write_closer, left)
        session.read = fast.read  # type: ignore[method-assign]
        session.write = fast.write  # type: ignore[method-assign]
        return fast

    async def _refill(self) -> bool:
        """Decrypt the next Noise message into ``_plain``; False at the end of the connection."""
        while True:
            received, at = self._received, self._at
            if len(received) - at >= SIZE_NOISE_MESSAGE_LEN:
                end = (
                    at
                    + SIZE_NOISE_MESSAGE_LEN
                    + int.from_bytes(received[at : at + SIZE_NOISE_MESSAGE_LEN], "big")
                )
                if len(received) >= end:
                    break
            if self._eof:
                return False
            # Waiting: keep only the part not decrypted yet (at most one Noise message).
            # The whole last receive (up to RECEIVE_SIZE) and the last decrypted message
            # stayed referenced until the next one arrived: a peer that sent a burst and
            # went quiet pinned ~1 MiB per connection, unread and uncounted.
            received = received[at:] if at < len(received) else b""
            self._received, self._at = received, 0
            self._plain = _NOTHING
            chunk = await self._receive()
            if not chunk:
                self._eof = True
                return False
            self._received = received + chunk if received else chunk
        self._at = end
        ciphertext = memoryview(received)[at + SIZE_NOISE_MESSAGE_LEN : end]
        self._plain = memoryview(self._decrypt(ciphertext))
        return True

    def _decrypt(self, ciphertext: memoryview) -> bytes:
        """Decrypt one Noise transport message without copying it first.

        ``NoiseConnection.decrypt`` insists on ``bytes``; its cipher state (which
        keeps the nonce) takes any buffer, as does ``cryptography``.
        """
        state = self._noise.noise_state
        try:
            cipher = state.noise_protocol.cipher_state_decrypt
        except AttributeError:
            return state.decrypt(bytes(ciphertext))
        try:
            return cipher.decrypt_with_ad(None, ciphertext)
        except InvalidTag as exc:
            raise NoiseInvalidMessage("Failed authentication of message") from exc

    async def read(self, n: int | None = None) -> bytes:
        if n is not None and n <= 0:
            return b""
        parts: list[bytes] = []
        got = 0
        while n is None or got < n:
            if not self._plain:
                if parts and n is None:
                    break
                if not await self._refill():
                    if parts:
                        break
                    raise IncompleteReadError(
                        "connection closed", expected_bytes=n or 0, received_bytes=0
                    )
                continue
            want = len(self._plain) if n is None else n - got
            part, self._plain = self._plain[:want], self._plain[want:]
            parts.append(bytes(part))
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def take_decrypted(self, length: int) -> bytes | None:
        """Exactly ``length`` bytes if that many are decrypted already, else None (nothing taken)."""
        plain = self._plain
        if len(plain) < length:
            return None
        self._plain = plain[length:]
        return bytes(plain[:length])

    async def read_body(self, length: int) -> bytearray:
        """Exactly ``length`` bytes, decrypted into one buffer; ``IncompleteReadError`` if cut."""
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        while got < length:
            if not self._plain and not await self._refill():
                raise IncompleteReadError(
                    f"connection closed after {got} of {length} bytes",
                    expected_bytes=length,
                    received_bytes=got,
                )
            take = min(len(self._plain), length - got)
            view[got : got + take] = self._plain[:take]
            self._plain = self._plain[take:]
            got += take
        return body

    async def write(self, data: bytes, payload: memoryview | None = None) -> None:
        """Send ``data`` (and then ``payload``) as Noise messages, in one socket write."""
        first = memoryview(data)
        if payload is not None and len(payload):
            # the first message takes the (short) head and the start of the payload
            cut = max(0, MAX_PLAINTEXT_LENGTH - len(data))
            first = memoryview(bytes(data) + payload[:cut])
            rest = payload[cut:]
        else:
            rest = memoryview(b"")
        parts: list[bytes] = []
        for view in (first, rest):
            for start in range(0, len(view), MAX_PLAINTEXT_LENGTH):
                self._seal(view[start : start + MAX_PLAINTEXT_LENGTH], parts)
        if not parts:
            self._seal(first, parts)  # an empty message still travels
        await self._send(b"".join(parts))

    def _seal(self, plaintext: memoryview, parts: list[bytes]) -> None:
        """Encrypt one Noise message (without copying the plaintext) and append it, length first."""
        state = self._noise.noise_state
        cipher = getattr(getattr(state, "noise_protocol", None), "cipher_state_encrypt", None)
        if cipher is None:
            ciphertext = state.encrypt(bytes(plaintext))
        else:
            ciphertext = cipher.encrypt_with_ad(None, plaintext)
        parts.append(len(ciphertext).to_bytes(SIZE_NOISE_MESSAGE_LEN, "big"))
        parts.append(ciphertext)

    def can_send_now(self) -> bool:
        """Whether ``send_now`` may be used: a socket of our own and nothing held back."""
        return self._raw_sock is not None and not self._backlog

    def send_now(self, data: bytes) -> bool:
        """Seal ``data`` (one Noise message at most) and give it to the socket without
        waiting; false if the socket took only part of it (the rest is the backlog, which
        the next write sends first: call ``flush`` under the write lock to send it)."""
        raw = self._raw_sock
        assert raw is not None and not self._backlog and len(data) <= MAX_PLAINTEXT_LENGTH
        parts: list[bytes] = []
        self._seal(memoryview(data), parts)
        message = b"".join(parts)
        try:
            sent = raw.send(message)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the connection is gone: its reader will notice
            return True
        if sent == len(message):
            return True
        self._backlog = message[sent:]
        return False

    async def flush(self) -> None:
        """Send the backlog, if any (under the write lock)."""
        if self._backlog:
            await self._send(b"")

    def drop(self) -> None:
        """Close the socket now, whoever waits on it (they see the connection closed)."""
        if self._socket is not None:
            self._socket.socket.close()

    async def _receive(self) -> bytes:
        """Up to ``RECEIVE_SIZE`` bytes off the connection, b"" at its end (as py-libp2p).

        On the socket itself where there is one: trio's ``receive_some`` passes through
        its scheduler once more after every receive (a pass of its run loop, with an
        ``epoll_wait``, per message that arrives); here only waiting does, a receive of
        ``BULK`` bytes or more, and every ``DIRECT_RECEIVES`` receives in a row without a
        wait (a long transfer must not keep the thread from its other tasks)."""
        raw = self._raw_sock
        if raw is not None:
            return await self._receive_direct(raw)
        if self._socket is None:
            return await self._raw.read(RECEIVE_SIZE)
        try:
            return await self._socket.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError as exc:
            raise ConnectionClosedError(f"TCP connection reset by peer: {exc}") from exc
        except trio.ClosedResourceError:  # closed on this side
            return b""

    async def _receive_direct(self, raw: socket.socket) -> bytes:
        while True:
            try:
                data = raw.recv(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                if exc.errno == errno.EBADF:  # closed on this side (trio closed the socket)
                    return b""
                raise ConnectionClosedError(f"TCP connection reset by peer: {exc!r}") from exc
            else:
                self._direct += 1
                if len(data) >= BULK or self._direct >= DIRECT_RECEIVES:
                    # a bulk transfer: let the other tasks (a sender on this thread, the
                    # stream's reader) run in between, as trio's receive does
                    self._direct = 0
                    await trio.lowlevel.checkpoint()
                return data
            self._direct = 0
            try:
                await trio.lowlevel.wait_readable(raw.fileno())
            except trio.ClosedResourceError:  # closed on this side while waiting
                return b""

    async def _send(self, data: bytes) -> None:
        """Send all of ``data``; a send cut off part-way closes the connection.

        A partial Noise message would desynchronise the connection for good (the peer
        would wait for the rest, then fail to decrypt), and py-libp2p's own write is
        cut off that way when a send times out.  Cancelled before its first byte, a
        send leaves the connection as it was.
        """
        begun = bool(self._backlog)  # the rest of a message ``send_now`` began: first
        if begun:
            data, self._backlog = self._backlog + data, b""
        if self._socket is None:
            await self._raw.write(data)
            return
        sock = self._socket.socket
        view = memoryview(data)
        sent = 0
        raw = self._raw_sock
        if raw is not None:
            # What the kernel takes now is sent without trio's checkpoint after it (one
            # pass of its run loop per frame); the rest, and any error, go through trio.
            try:
                sent = raw.send(view)
            except OSError:
                sent = 0
            if sent == len(view) and sent >= BULK:
                await trio.lowlevel.checkpoint()  # as trio's send, for bulk transfers
                return
        try:
            while sent < len(view):
                sent += await sock.send(view[sent:])
        except BaseException as exc:
            if sent or begun:  # a Noise message cut on the wire: the connection is lost
                sock.close()
            if isinstance(exc, trio.ClosedResourceError) and not sent:
                return  # closed on this side: py-libp2p ignores the write
            if isinstance(exc, OSError | trio.ClosedResourceError):
                raise ConnectionClosedError(f"TCP connection lost: {exc!r}") from exc
            raise


class _PatchedYamuxNegotiator(MuxerMultistream):
    """Negotiates yamux (the only muxer offered) and builds a ``PatchedYamux`` for it."""

    on_abuse: Callable[[ID, str], None] | None = None
    budget: UnreadBudget | None = None

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, _ = await self._selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        muxed = PatchedYamux(conn, peer_id, is_initiator=conn.is_initiator)
        muxed.on_abuse = self.on_abuse
        if self.budget is not None:
            muxed.use_budget(self.budget)
        return self._annotate_connection(muxed, conn, protocol)


def use_patched_yamux(host: IHost, on_abuse: Callable[[ID, str], None] | None = None) -> None:
    """Make ``host`` offer yamux only, as ``PatchedYamux``; call before the host runs.

    ``on_abuse(peer, why)`` is told of a peer whose connection is closed for breaking
    the flow control (on the trio thread).
    """
    upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
    negotiator = _PatchedYamuxNegotiator(
        {TProtocol(PROTOCOL_ID): PatchedYamux}, upgrader.muxer_multistream.negotiate_timeout
    )
    negotiator.on_abuse = on_abuse
    upgrader.muxer_multistream = negotiator


def count_unread(host: IHost, budget: UnreadBudget) -> bool:
    """Have the connections ``host`` makes from now on count (and bound) the bytes their
    streams hold unread in ``budget`` (``_unread``); after ``use_patched_yamux``. False
    (nothing counted) where the host does not build ``PatchedYamux`` connections."""
    negotiator = host.get_network().upgrader.muxer_multistream  # type: ignore[attr-defined]
    if not isinstance(negotiator, _PatchedYamuxNegotiator):
        return False
    negotiator.budget = budget
    return True
