"""A peer's battery: a store of energy drained by training, radio and idling.

A disaster-area peer runs on a phone or a field device; when its battery is empty it
drops out just as if it had crashed. The simulator calls :meth:`Battery.consume` for
what a peer did and fails the peer once :attr:`Battery.depleted` turns true.
"""

from __future__ import annotations

from dataclasses import dataclass

from topologies.errors import TopologyError

__all__ = ["Battery"]

_EMPTY = 1e-9
"""A level below this share of capacity counts as empty: 10 steps of 0.1 J drain 1 J."""


@dataclass(slots=True)
class Battery:
    """Energy model of one peer, in joules and seconds.

    ``capacity_j`` is the full charge; ``level_j`` what is left (``None``: full).
    Drain is linear in training steps, bytes sent, bytes received (0 by default) and
    idle time: coarse, but it ranks peers by workload, which is what the studies need.
    """

    capacity_j: float
    drain_per_step_j: float = 0.0
    drain_per_byte_sent_j: float = 0.0
    idle_drain_per_s_j: float = 0.0
    drain_per_byte_received_j: float = 0.0
    level_j: float | None = None

    def __post_init__(self) -> None:
        for name in (
            "capacity_j",
            "drain_per_step_j",
            "drain_per_byte_sent_j",
            "idle_drain_per_s_j",
            "drain_per_byte_received_j",
        ):
            if getattr(self, name) < 0:
                raise TopologyError(f"battery {name} must be >= 0, got {getattr(self, name)}")
        if self.level_j is None:
            self.level_j = float(self.capacity_j)
        elif not 0 <= self.level_j <= self.capacity_j:
            raise TopologyError(
                f"battery level_j must be in [0, capacity_j={self.capacity_j}], got {self.level_j}"
            )

    def cost(
        self, *, steps: int = 0, bytes_sent: int = 0, seconds: float = 0.0, bytes_received: int = 0
    ) -> float:
        """Energy in joules that this much work would take, without drawing it."""
        if min(steps, bytes_sent, seconds, bytes_received) < 0:
            raise TopologyError("battery work amounts must be >= 0")
        return (
            steps * self.drain_per_step_j
            + bytes_sent * self.drain_per_byte_sent_j
            + seconds * self.idle_drain_per_s_j
            + bytes_received * self.drain_per_byte_received_j
        )

    def consume(
        self, *, steps: int = 0, bytes_sent: int = 0, seconds: float = 0.0, bytes_received: int = 0
    ) -> float:
        """Draw the energy of this work and return the level left (never below 0)."""
        drawn = self.cost(
            steps=steps, bytes_sent=bytes_sent, seconds=seconds, bytes_received=bytes_received
        )
        level = self.charge - drawn
        self.level_j = 0.0 if level <= _EMPTY * self.capacity_j else level
        return self.level_j

    @property
    def charge(self) -> float:
        """Energy left in joules (``level_j``, typed as a float)."""
        assert self.level_j is not None  # set by __post_init__
        return self.level_j

    @property
    def depleted(self) -> bool:
        """Whether the battery is empty (the peer is gone)."""
        return self.charge <= 0.0
