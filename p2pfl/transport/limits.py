"""What one transport lets other peers cost it: streams, buffered bytes, time per frame.

Every inbound frame is checked against these bounds after its 4-byte length prefix
and *before* its body is read: a peer that is banned, that already buffers its share
of memory, or that holds too many streams gets no more bytes read.  The defaults let
an honest peer send a model of ``max_message_size`` bytes alongside its small control
messages, and let no peer (nor all of them together) make the node hold more than a
few such messages at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pfl.wire.framing import DEFAULT_MAX_FRAME_BYTES

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TRANSPORT_LIMITS",
    "SMALL_FRAME_ROOM",
    "TransportLimits",
]

DEFAULT_MAX_MESSAGE_BYTES = DEFAULT_MAX_FRAME_BYTES
"""The largest frame a transport takes unless told otherwise (64 MiB): a node's default
(``network.max_message_bytes``), and every transport's, so that one built without a node
config (a relay server, an embedder's) is not left with a larger memory bound."""

SMALL_FRAME_ROOM = 1 << 20
"""Room a peer's share keeps beside one largest message, so that its greetings and
unlinks are not held up (and then cut) behind a large model on a slow link."""


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Per-peer and per-node bounds of a transport (times in seconds, sizes in bytes).

    - ``max_streams_per_peer``: concurrent inbound streams of one peer, every protocol
      counted (messages, pings, identify); one over is reset before it is negotiated.
      An honest peer opens at most ``max_sends_per_peer`` message streams at once, keeps
      4 idle ones for reuse, and a ping and an identify stream: 32 leaves room.
    - ``max_streams``: concurrent inbound streams of all peers together; the peers of one
      source address (``_inbound.source_of``) hold at most half of them, so that one
      host's many keys cannot take them all.
    - ``max_sends_per_peer``: this side's own concurrent frames to one peer (further
      sends wait), so that an honest sender never meets the receiver's stream bound.
    - ``max_buffered_per_peer``: bytes of inbound frames of one peer held at once,
      from the moment a frame's length is read until the node has handled the frame
      (``None``: the transport's ``max_message_size`` plus ``SMALL_FRAME_ROOM``, i.e.
      one largest message and the small control messages that come with it).
    - ``max_buffered``: the same, all peers together (``None``: twice one peer's).
      A frame that does not fit waits (its body unread) for the bytes to be freed.
    - ``max_unread``: bytes that streams hold unread outside admitted frames (each
      stream's initial 256 KiB yamux window, which a receiver cannot withhold), all
      peers together; one source address holds at most half. Bytes over it are dropped
      and their stream reset (``_unread``). 64 MiB: room for dozens of honest peers'
      unadmitted frame heads (2 MiB each at most), a quarter of what 1,024 full
      windows pinned.
    - ``frame_timeout`` and ``min_frame_rate``: a frame of ``n`` bytes must be whole
      within ``frame_timeout + n / min_frame_rate`` of its first byte (of the stream's
      opening, for a stream's first frame), waiting for buffer space included; slower
      (trickled) frames are cut and charged to their sender as stalled.
    """

    max_streams_per_peer: int = 32
    max_streams: int = 1024
    max_sends_per_peer: int = 8
    max_buffered_per_peer: int | None = None
    max_buffered: int | None = None
    frame_timeout: float = 20.0
    min_frame_rate: float = float(1 << 20)
    max_unread: int = 64 << 20

    def __post_init__(self) -> None:
        if self.max_streams_per_peer < 1 or self.max_streams < self.max_streams_per_peer:
            raise ValueError("need 1 <= max_streams_per_peer <= max_streams")
        if self.max_sends_per_peer < 1:
            raise ValueError("max_sends_per_peer must be at least 1")
        if self.frame_timeout <= 0 or self.min_frame_rate <= 0:
            raise ValueError("frame_timeout and min_frame_rate must be positive")
        if self.max_unread < 1 << 20:
            raise ValueError("max_unread must be at least 1 MiB (a few streams' windows)")
        for name in ("max_buffered_per_peer", "max_buffered"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (or None for the default)")

    def per_peer_bytes(self, max_message_size: int) -> int:
        """Buffered bytes one peer may hold; never below one largest message."""
        default = max_message_size + SMALL_FRAME_ROOM
        return max(self.max_buffered_per_peer or default, max_message_size)

    def total_bytes(self, max_message_size: int) -> int:
        """Buffered bytes all peers together may hold; never below one peer's share."""
        per_peer = self.per_peer_bytes(max_message_size)
        return max(self.max_buffered or 2 * per_peer, per_peer)

    def frame_seconds(self, size: int) -> float:
        """How long a frame of ``size`` bytes may take, from its first byte to its last."""
        return self.frame_timeout + size / self.min_frame_rate

    @classmethod
    def from_config(cls, network: Any) -> TransportLimits:
        """The limits named in a node's ``[network]`` config (``NodeNetworkConfig``);
        a buffer size of 0 there means the default."""
        return cls(
            max_streams_per_peer=network.max_streams_per_peer,
            max_streams=network.max_streams,
            max_sends_per_peer=network.max_sends_per_peer,
            max_buffered_per_peer=network.max_buffered_bytes_per_peer or None,
            max_buffered=network.max_buffered_bytes or None,
            frame_timeout=network.frame_timeout,
            min_frame_rate=network.min_frame_rate,
            max_unread=network.max_unread_bytes,
        )

    def summary(self, max_message_size: int) -> dict[str, Any]:
        """The bounds in force, JSON-ready."""
        return {
            "max_streams_per_peer": self.max_streams_per_peer,
            "max_streams": self.max_streams,
            "max_sends_per_peer": self.max_sends_per_peer,
            "max_buffered_per_peer": self.per_peer_bytes(max_message_size),
            "max_buffered": self.total_bytes(max_message_size),
            "frame_timeout": self.frame_timeout,
            "min_frame_rate": self.min_frame_rate,
            "max_unread": self.max_unread,
        }


DEFAULT_TRANSPORT_LIMITS = TransportLimits()
