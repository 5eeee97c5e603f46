"""Bytes that arrived on yamux streams and that no reader has taken yet, bounded per node.

Every stream may hold up to yamux's initial window (256 KiB) that the node has not
read: the window is implicit in the protocol, so a receiver cannot withhold it. The
transport's own admission (``_admission``) counts the bytes of a frame only once it has
read the frame's length and admitted it; before that, and on every stream the
transport does not read (a frame waiting for room, a stream still negotiating, ping,
identify, a stream the peer reset with bytes in it, which py-libp2p keeps for 60 s),
nothing counted them. Measured: 36 keys from one host x 32 stalled streams pinned
+179 MB of RSS with the per-source stream share, and 1,024 streams from several sources
could pin 256 MiB.

Here every stream buffer of a connection is an ``_Unread``: it knows the bytes it holds
beyond the admitted frame of its stream (those are counted by the admission), and
tells an ``UnreadBudget``, one per transport. Bytes that would take the node over
``cap``, or their *holder* (the connection's source address, ``_inbound.source_of``;
the peer for a relayed connection) over half of it, are dropped unread and their
stream is reset (``refused``: counted by the transport as ``unread_resets``). A
deallocated buffer gives its bytes back, however py-libp2p dropped it (a read, a
closed stream, a closed connection).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["UNREAD_BUDGET", "UnreadBudget", "UnreadBuffers"]

UNREAD_BUDGET = 64 * 1024 * 1024
"""Default cap on a node's unadmitted unread bytes, all streams together. An honest
peer leaves at most a frame's first 256 KiB unread on each of its (at most 8)
concurrent sends while the node has no room for them: 2 MiB; 64 MiB leaves room for
dozens of such peers and is a quarter of what 1,024 full windows pin."""


class UnreadBudget:
    """Unadmitted unread bytes of one transport's streams, in all and per holder."""

    def __init__(self, cap: int = UNREAD_BUDGET, *, enforce: bool = True) -> None:
        if cap <= 0:
            raise ValueError("the unread budget must be positive")
        self.cap = cap
        #: what one holder (a source address, or a relayed peer) may hold: half, so that
        #: one host's many keys cannot take all of it (as with the stream shares)
        self.share = max(1, cap // 2)
        #: False only to measure what the bound prevents (tests): bytes are counted, never refused
        self.enforce = enforce
        self.total = 0
        self.peak = 0
        self.resets = 0  # streams reset for bytes that did not fit
        self.refused_bytes = 0  # bytes dropped unread with them
        self._by_holder: Counter[str] = Counter()

    def held_by(self, holder: str) -> int:
        return self._by_holder.get(holder, 0)

    def fits(self, holder: str, more: int) -> bool:
        """Whether ``more`` bytes fit the node's cap and ``holder``'s share."""
        if not self.enforce or more <= 0:
            return True
        return self.total + more <= self.cap and self._by_holder[holder] + more <= self.share

    def add(self, holder: str, delta: int) -> None:
        """Count ``delta`` (negative: given back) bytes for ``holder``."""
        if not delta:
            return
        self.total += delta
        if self.total > self.peak:
            self.peak = self.total
        held = self._by_holder.get(holder, 0) + delta
        if held <= 0:
            self._by_holder.pop(holder, None)
        else:
            self._by_holder[holder] = held

    def refused(self, dropped: int) -> None:
        self.resets += 1
        self.refused_bytes += dropped

    def summary(self) -> dict[str, int]:
        return {
            "unread_bytes": self.total,
            "unread_peak": self.peak,
            "unread_resets": self.resets,
            "unread_refused_bytes": self.refused_bytes,
        }


class _Unread(bytearray):
    """One stream's receive buffer, counted in its connection's ``UnreadBudget``.

    py-libp2p only ``extend``s it (the connection's reader), takes from its front
    (``del buffer[:n]``, ``clear``) and drops it from the connection's table; those are
    the operations counted here, and dropping is caught by ``__del__``.
    """

    def __init__(self, conn: Any, budget: UnreadBudget, holder: str, stream_id: int) -> None:
        super().__init__()
        self._conn = conn
        self._budget = budget
        self._holder = holder
        self._sid = stream_id
        self._counted = 0  # bytes of this buffer counted in the budget
        self._refused = False  # reset for the budget: whatever still arrives is dropped

    def _uncovered(self) -> int:
        """Bytes held beyond the admitted frame of the stream (the admission counts those)."""
        stream = self._conn.streams.get(self._sid)
        return max(0, len(self) - getattr(stream, "_admitted", 0))

    def recount(self) -> None:
        """Count the buffer again (its bytes or its stream's admitted frame changed)."""
        if not self._counted and not self:  # empty and nothing counted: nothing changes
            return  # (the usual case: a frame read whole; several times a frame)
        now = self._uncovered()
        self._budget.add(self._holder, now - self._counted)
        self._counted = now

    def extend(self, data: Any) -> None:
        if self._refused:
            return
        super().extend(data)
        self._conn._check_initial_window(self._sid, len(self))
        now = self._uncovered()
        more = now - self._counted
        if self._budget.fits(self._holder, more):
            self._budget.add(self._holder, more)
            self._counted = now
            return
        # over the node's cap or the holder's share: drop this stream's bytes, reset it
        dropped = len(self)
        super().clear()
        self._budget.add(self._holder, -self._counted)
        self._counted = 0
        self._refused = True
        self._budget.refused(dropped)
        self._conn._refuse_unread(self._sid)

    def clear(self) -> None:
        super().clear()
        self.recount()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self.recount()

    def __del__(self) -> None:
        if self._counted:
            self._budget.add(self._holder, -self._counted)
            self._counted = 0


class UnreadBuffers(dict[int, bytearray]):
    """A connection's ``stream_buffers``: each new buffer becomes an ``_Unread``."""

    def __init__(self, conn: Any, budget: UnreadBudget, holder: str) -> None:
        super().__init__()
        self._conn = conn
        self._budget = budget
        self._holder = holder

    def __setitem__(self, stream_id: int, value: bytearray) -> None:
        if not isinstance(value, _Unread):
            buffer = _Unread(self._conn, self._budget, self._holder, stream_id)
            if value:
                buffer.extend(value)
            value = buffer
        super().__setitem__(stream_id, value)


def recount(buffer: object) -> None:
    """``_Unread.recount`` for a buffer that may be a plain one (not counted)."""
    if isinstance(buffer, _Unread):
        buffer.recount()
