"""py-libp2p's yamux with two measured faults fixed: a two-way deadlock and a slow window.

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

Window.  Every stream starts with yamux's 256 KiB window and py-libp2p grows it
only within RTT-based epochs that barely open on loopback; a sender that runs
out of window polls for an update every 10 ms.  With one stream per payload
that capped transfers at about 25-35 MB/s.  Here each stream grants its peer a
16 MiB window (go-yamux's maximum) as soon as it is opened or accepted, with a
standard WINDOW_UPDATE frame.

py-libp2p builds a plain ``Yamux`` whenever yamux is negotiated, whatever class
the host's muxer options name, so ``use_patched_yamux`` swaps in a negotiator
that builds ours.
"""

from __future__ import annotations

import struct
from collections import deque

import trio
from libp2p.abc import IHost, IMuxedConn, IMuxedStream, ISecureConn
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import (
    MAX_WINDOW_SIZE,
    PROTOCOL_ID,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)

__all__ = ["STREAM_WINDOW", "PatchedYamux", "use_patched_yamux"]

STREAM_WINDOW = MAX_WINDOW_SIZE
"""Receive window granted to the peer on every stream (16 MiB)."""


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
        if trio.lowlevel.current_task() is self._reader_task and self._write_soon(data):
            await trio.lowlevel.checkpoint()
            return
        await super()._write_frame(data)

    async def open_stream(self) -> IMuxedStream:
        stream = await super().open_stream()  # its SYN frame is written by now
        frame = _widen(stream)
        if frame is not None:
            await super()._write_frame(frame)
        return stream

    async def accept_stream(self) -> IMuxedStream:
        stream = await super().accept_stream()
        frame = _widen(stream)
        # Queued behind the acknowledgement the reader queued for this stream; the
        # accepting task must not wait on the write lock either.
        if frame is not None and not self._write_soon(frame):
            await super()._write_frame(frame)
        return stream

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


def _widen(stream: IMuxedStream) -> bytes | None:
    """Raise a stream's receive window to ``STREAM_WINDOW``; the frame that tells the peer.

    No await happens between the update of the local accounting and the return,
    so the stream's window lock is not needed on the single trio thread.
    """
    if not isinstance(stream, YamuxStream) or stream.target_recv_window >= STREAM_WINDOW:
        return None
    delta = STREAM_WINDOW - stream.target_recv_window
    stream.target_recv_window = STREAM_WINDOW
    stream.recv_window += delta
    return struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_WINDOW_UPDATE, 0, stream.stream_id, delta)


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
