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

- each stream grants its peer a 16 MiB window (go-yamux's maximum) in the very
  frame that opens or acknowledges it (the length field of a SYN or ACK window
  update is a window increment, as in go-yamux);
- read credit goes back go-yamux style, in one update once half the window
  has been read;
- data frames carry up to ~256 KiB (within any peer's window: yamux bounds a
  frame by the window only), cut to fill whole Noise messages;
- a writer out of window wakes on the window update instead of polling.

All of it is plain yamux on the wire, so any yamux peer copes.  py-libp2p
builds a plain ``Yamux`` whenever yamux is negotiated, whatever class the
host's muxer options name, so ``use_patched_yamux`` swaps in a negotiator that
builds ours.
"""

from __future__ import annotations

import struct
from collections import deque

import trio
from libp2p.abc import IHost, IMuxedConn, ISecureConn
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import (
    FLAG_ACK,
    FLAG_SYN,
    HEADER_SIZE,
    MAX_WINDOW_SIZE,
    PROTOCOL_ID,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)

__all__ = ["FRAME_PAYLOAD", "STREAM_WINDOW", "PatchedYamux", "use_patched_yamux"]

STREAM_WINDOW = MAX_WINDOW_SIZE
"""Receive window granted to the peer on every stream (16 MiB)."""

FRAME_PAYLOAD = 4 * MAX_PLAINTEXT_LENGTH - HEADER_SIZE
"""Data-frame payload (~256 KiB) whose frame fills exactly four Noise transport messages."""

WINDOW_WAIT = 5.0
"""Seconds a writer waits for window before the stream fails (py-libp2p's value)."""


class PatchedYamux(Yamux):
    """A ``Yamux`` connection whose reader never waits to write, with wide stream windows."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._reader_task: trio.lowlevel.Task | None = None
        self._deferred: deque[bytes] = deque()
        self._flushing = False

    async def handle_incoming(self) -> None:
        self._reader_task = trio.lowlevel.current_task()
        await super().handle_incoming()

    async def _write_frame(self, data: bytes) -> None:
        data = self._grant_window(data)
        if trio.lowlevel.current_task() is self._reader_task and self._write_soon(data):
            await trio.lowlevel.checkpoint()
            return
        await super()._write_frame(data)

    def _grant_window(self, frame: bytes) -> bytes:
        """Turn the SYN or ACK frame of a new stream into one that also widens its window."""
        if len(frame) != HEADER_SIZE:
            return frame
        version, kind, flags, stream_id, length = struct.unpack(YAMUX_HEADER_FORMAT, frame)
        if kind != TYPE_WINDOW_UPDATE or not flags & (FLAG_SYN | FLAG_ACK) or length:
            return frame
        stream = self.streams.get(stream_id)
        if stream is None:
            return frame
        delta = _adopt(stream)
        if not delta:
            return frame
        return struct.pack(YAMUX_HEADER_FORMAT, version, kind, flags, stream_id, delta)

    def _write_soon(self, frame: bytes) -> bool:
        """Queue a frame for the helper task; False when there is no nursery to run it."""
        nursery = self._nursery
        if nursery is None:
            return False
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

    @property  # type: ignore[override]
    def send_window(self) -> int:
        return self.__dict__["send_window"]

    @send_window.setter
    def send_window(self, value: int) -> None:
        # The connection's reader raises it on WINDOW_UPDATE: wake a writer waiting for it.
        self.__dict__["send_window"] = value
        if value > 0 and self._window_opened is not None:
            self._window_opened.set()

    async def write(self, data: bytes) -> None:
        """Send ``data`` in frames of up to ``FRAME_PAYLOAD`` bytes, as the window allows."""
        view = memoryview(data)
        sent, total = 0, len(data)
        while sent < total:
            async with self.rw_lock.write_lock():
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                async with self.window_lock:
                    if self.closed:
                        raise MuxedStreamError("Stream is closed")
                    size = min(self.send_window, FRAME_PAYLOAD, total - sent)
                    if size > 0:
                        self.send_window -= size
            if size <= 0:
                await self._wait_for_window()
                continue
            header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, self.stream_id, size)
            await self.conn._write_frame(header + view[sent : sent + size])
            sent += size

    async def _wait_for_window(self) -> None:
        """Wait until the peer grants window, like py-libp2p: give up after 5 s."""
        deadline = trio.current_time() + WINDOW_WAIT
        while self.send_window <= 0 and not self.closed:
            if trio.current_time() >= deadline:
                raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")
            self._window_opened = trio.Event()
            with trio.move_on_after(0.01):  # a close or reset sets no event: look again soon
                await self._window_opened.wait()

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        self._pending_recv_release += bytes_read
        if self._pending_recv_release < self.target_recv_window // 2:
            return
        increment, self._pending_recv_release = self._pending_recv_release, 0
        self.recv_window += increment
        await self.send_window_update(increment)


def _adopt(stream: YamuxStream) -> int:
    """Make a new stream a ``_PatchedYamuxStream`` with a ``STREAM_WINDOW`` receive window.

    py-libp2p constructs its streams inline, so the class is switched on the
    instance (the subclass needs nothing from a constructor).  Returns the window increment the
    peer must be told about (0 if none).  Nothing here awaits, so the stream's
    window lock is not needed on the single trio thread.
    """
    if type(stream) is YamuxStream:
        stream.__class__ = _PatchedYamuxStream
    delta = STREAM_WINDOW - stream.target_recv_window
    if delta <= 0:
        return 0
    stream.target_recv_window = STREAM_WINDOW
    stream.recv_window += delta
    return delta


class _PatchedYamuxNegotiator(MuxerMultistream):
    """Negotiates yamux (the only muxer offered) and builds a ``PatchedYamux`` for it."""

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, _ = await self._selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        muxed = PatchedYamux(conn, peer_id, is_initiator=conn.is_initiator)
        return self._annotate_connection(muxed, conn, protocol)


def use_patched_yamux(host: IHost) -> None:
    """Make ``host`` offer yamux only, as ``PatchedYamux``; call before the host runs."""
    upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
    upgrader.muxer_multistream = _PatchedYamuxNegotiator(
        {TProtocol(PROTOCOL_ID): PatchedYamux}, upgrader.muxer_multistream.negotiate_timeout
    )
