"""How long one send may take: from its size and the bandwidth measured to that peer.

A fixed send timeout is wrong both ways. On a slow link (a phone on 2 Mbit/s) a large
model needs longer than any fixed value chosen for a LAN, so every transfer would time
out and the peer would never get a model; on a fast link a fixed value large enough for
the slow case lets a stalled transfer hold its sender's slot for that long. So each
send gets ``base + (size + queued) / rate * safety`` seconds, where ``rate`` is an
exponentially weighted average of the throughput of the completed sends to that peer
(never below ``floor``: the slowest link a node is meant to serve), ``queued`` the bytes
of sends to that peer still in flight (they share the link and its send slots), and
``base`` covers latency, stream setup and the receiver's acknowledgement. The result is
bounded by ``ceiling``. A timed-out send teaches nothing (its duration is not a
throughput) and leaves the estimate as it was.

Small sends are not measured: their time is latency, not bandwidth, and would make the
estimate of a fast link look slow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SendBudget", "SendTicket"]

#: sends smaller than this measure latency, not bandwidth: not used for the estimate
MIN_SAMPLE_BYTES = 32 * 1024


@dataclass(frozen=True)
class SendTicket:
    """One send in flight: returned by :meth:`SendBudget.begin`, given to ``end``."""

    peer: str
    size: int
    started: float
    timeout: float


class SendBudget:
    """Per-peer throughput estimates and the send timeouts derived from them.

    Not thread-safe: the node uses it from its asyncio loop only.
    """

    def __init__(
        self,
        base: float,
        *,
        floor: float = 32 * 1024.0,
        safety: float = 4.0,
        ceiling: float = 600.0,
        weight: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base <= 0:
            raise ValueError(f"base must be > 0 seconds, got {base}")
        if floor <= 0:
            raise ValueError(f"floor must be > 0 bytes/s, got {floor}")
        if safety < 1:
            raise ValueError(f"safety must be >= 1, got {safety}")
        if ceiling < base:
            raise ValueError(f"ceiling ({ceiling}) must be >= base ({base})")
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.base = base
        self.floor = floor
        self.safety = safety
        self.ceiling = ceiling
        self.weight = weight
        self._clock = clock
        self._rate: dict[str, float] = {}  # peer -> bytes/s (EWMA of completed sends)
        self._queued: dict[str, int] = {}  # peer -> bytes of sends in flight

    def rate(self, peer: str) -> float | None:
        """The measured throughput to ``peer`` in bytes/s (``None``: nothing measured yet)."""
        return self._rate.get(peer)

    def timeout(self, peer: str, size: int) -> float:
        """Seconds a send of ``size`` bytes to ``peer`` may take, if started now."""
        rate = max(self._rate.get(peer, self.floor), self.floor)
        seconds = self.base + (size + self._queued.get(peer, 0)) / rate * self.safety
        return min(seconds, self.ceiling)

    def backlog_seconds(self, peer: str) -> float:
        """How long what is queued to ``peer`` may still take to leave (0 when nothing is):
        a ping or a small message sent now waits behind it on the same connection."""
        queued = self._queued.get(peer, 0)
        if not queued:
            return 0.0
        rate = max(self._rate.get(peer, self.floor), self.floor)
        return min(queued / rate * self.safety, self.ceiling)

    def begin(self, peer: str, size: int) -> SendTicket:
        """A send of ``size`` bytes to ``peer`` starts now; its timeout is in the ticket."""
        ticket = SendTicket(peer, size, self._clock(), self.timeout(peer, size))
        self._queued[peer] = self._queued.get(peer, 0) + size
        return ticket

    def end(self, ticket: SendTicket, *, ok: bool) -> None:
        """The send of ``ticket`` ended; a successful large one updates the estimate."""
        left = self._queued.get(ticket.peer, 0) - ticket.size
        if left > 0:
            self._queued[ticket.peer] = left
        else:
            self._queued.pop(ticket.peer, None)
        if not ok or ticket.size < MIN_SAMPLE_BYTES:
            return
        elapsed = max(self._clock() - ticket.started, 1e-6)
        sample = ticket.size / elapsed
        old = self._rate.get(ticket.peer)
        self._rate[ticket.peer] = sample if old is None else old + self.weight * (sample - old)

    def forget(self, peer: str) -> None:
        """Drop what is known of ``peer`` (it left; a new link may be different)."""
        self._rate.pop(peer, None)
        self._queued.pop(peer, None)
