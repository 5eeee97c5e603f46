"""Length-prefixed framing for byte streams (libp2p streams deliver arbitrary chunks).

A frame is a 4-byte big-endian length followed by that many bytes. The reader refuses a
length above its cap as soon as the 4 prefix bytes are in, before buffering any payload,
and grows its buffer only as data actually arrives: a peer announcing a huge frame and
sending nothing costs nothing.

This module is the one definition of the frame format: :class:`FrameReader` parses pushed
chunks, and the libp2p transport (which pulls exact byte counts from a stream) writes
:func:`frame_header`, reads :func:`frame_length` and answers each frame with :data:`ACK`.
It imports neither torch nor the codecs, so the transport that uses it stays light.
"""

from __future__ import annotations

import struct

from .errors import DropReason, WireError

__all__ = ["ACK", "FRAME_HEADER_BYTES", "FrameReader", "frame", "frame_header", "frame_length"]

_HEADER = struct.Struct(">I")
FRAME_HEADER_BYTES = _HEADER.size
MAX_FRAME_BYTES = (1 << 32) - 1
#: the default cap on one frame, which holds one message: the one default of the project,
#: a decoder's (``WireLimits.max_message_bytes``), every transport's
#: (``p2pfl.transport.limits.DEFAULT_MAX_MESSAGE_BYTES``) and a node's
#: (``network.max_message_bytes``), so that nothing built without a node config accepts
#: more than a node does
DEFAULT_MAX_FRAME_BYTES = 64 << 20
#: the byte a receiver answers once it has taken a whole frame (streams that acknowledge)
ACK = b"\x01"

Buffer = bytes | bytearray | memoryview


def frame_header(length: int) -> bytes:
    """The 4-byte prefix of a ``length``-byte frame (write it, then the payload)."""
    if not 0 <= length <= MAX_FRAME_BYTES:
        raise ValueError(f"a frame holds 0 to {MAX_FRAME_BYTES} bytes, not {length}")
    return _HEADER.pack(length)


def frame_length(header: Buffer) -> int:
    """The payload length that a 4-byte prefix announces."""
    length: int = _HEADER.unpack(header)[0]
    return length


def frame(payload: Buffer) -> bytes:
    """``payload`` with its length prefix (one copy; large senders write the two parts)."""
    return b"".join((frame_header(len(memoryview(payload).cast("B"))), payload))


class FrameReader:
    """Incremental frame parser: ``feed`` chunks in, get complete frames out.

    After a ``WireError`` the stream is out of sync: the reader stays failed and the
    caller should close the stream.
    """

    __slots__ = ("max_frame_bytes", "_header", "_payload", "_need", "_error")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not 0 <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be in [0, {MAX_FRAME_BYTES}]")
        self.max_frame_bytes = max_frame_bytes
        self._header = bytearray()
        self._payload = bytearray()
        self._need: int | None = None  # payload length of the frame in progress
        self._error: WireError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a complete frame."""
        return len(self._header) + len(self._payload)

    def feed(self, chunk: Buffer) -> list[bytearray]:
        """Consume ``chunk``; return the frames it completed (each a new bytearray)."""
        if self._error is not None:
            raise self._error
        view = memoryview(chunk).cast("B")
        frames: list[bytearray] = []
        pos, end = 0, len(view)
        while pos < end or (self._need == 0):
            if self._need is None:
                take = min(FRAME_HEADER_BYTES - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < FRAME_HEADER_BYTES:
                    break
                length = frame_length(self._header)
                self._header.clear()
                if length > self.max_frame_bytes:
                    self._error = WireError(
                        DropReason.OVERSIZED, f"frame of {length} bytes, cap {self.max_frame_bytes}"
                    )
                    raise self._error
                self._need = length
            take = min(self._need - len(self._payload), end - pos)
            self._payload += view[pos : pos + take]
            pos += take
            if len(self._payload) == self._need:
                frames.append(self._payload)
                self._payload = bytearray()
                self._need = None
        return frames

    def eof(self) -> None:
        """The stream ended: ``WireError(malformed)`` if it stopped inside a frame."""
        if self._error is not None:
            raise self._error
        if self.pending or self._need is not None:
            expected = "a length prefix" if self._need is None else f"{self._need} bytes"
            raise WireError(
                DropReason.MALFORMED, f"truncated frame: {self.pending} bytes of {expected}"
            )
