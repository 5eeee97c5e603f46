"""Finding the first responsive candidates of a round, by pinging down the hash order.

The sample of round ``r`` is "the first ``s`` candidates that answer a ping", so a peer
cannot take a candidate before every candidate ahead of it has either answered or timed
out. ``SampleResolver`` keeps that bookkeeping for one round and one peer. It does no I/O
and keeps no clock: it says whom to ping, and is told about answers (``answer``), wave
timeouts (``expire``) and failures (``fail``); the protocol turns that into messages and
timers.

Pings go out in *waves*. The first wave pings exactly as many candidates as are missing.
When candidates fail to answer, the next wave pings more than are missing, scaled by the
share of pinged candidates that answered so far: with 80% of the population gone, waiting
for one ping timeout per lost candidate would stall every round for many timeouts.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from p2pfl.protocols.base import PeerId


class Liveness(enum.Enum):
    PENDING = "pending"  # pinged, no answer yet
    ALIVE = "alive"
    DEAD = "dead"  # timed out, failed, or skipped as suspected


class SampleResolver:
    """Liveness of one round's candidates, resolved in hash order.

    ``candidates`` is ``derive_candidates(view, round)``; ``me`` counts as alive without a
    ping; ``skip`` says which candidates to treat as dead without pinging them (peers the
    protocol already suspects to be down).
    """

    def __init__(
        self,
        round: int,
        candidates: list[PeerId],
        me: PeerId,
        skip: Callable[[PeerId], bool] = lambda peer: False,
    ) -> None:
        self.round = round
        self.candidates = candidates
        self._me = me
        self._skip = skip
        self._status: dict[PeerId, Liveness] = {}
        self._scanned = 0  # candidates[:_scanned] have a status
        self._target = 0
        self._outstanding: dict[PeerId, int] = {}  # peer -> wave of the ping it owes
        self._answered = 0  # pinged candidates that answered / did not (for the estimate)
        self._lost = 0

    @property
    def target(self) -> int:
        return self._target

    def status(self, peer: PeerId) -> Liveness | None:
        return self._status.get(peer)

    # -- what to do next ---------------------------------------------------------------
    def want(self, k: int) -> None:
        """Raise the number of responsive candidates needed (never lowers it)."""
        self._target = max(self._target, min(k, len(self.candidates)))

    def to_ping(self) -> list[PeerId]:
        """Scan further down the order; return the candidates to ping in a new wave.

        Scanning stops once the candidates alive or awaited are expected to cover the
        target; the caller must then pass the list to ``pinged``.
        """
        alive = sum(1 for s in self._status.values() if s is Liveness.ALIVE)
        pending = sum(1 for s in self._status.values() if s is Liveness.PENDING)
        missing = self._target - alive - pending
        answer_rate = max(self._answered, 1) / max(self._answered + self._lost, 1)
        expected = 0.0
        wave: list[PeerId] = []
        while expected < missing and self._scanned < len(self.candidates):
            peer = self.candidates[self._scanned]
            self._scanned += 1
            if peer in self._status:  # failed before we reached it
                continue
            if peer == self._me:
                self._status[peer] = Liveness.ALIVE
                expected += 1.0
            elif self._skip(peer):
                self._status[peer] = Liveness.DEAD
            else:
                self._status[peer] = Liveness.PENDING
                wave.append(peer)
                expected += answer_rate
        return wave

    def pinged(self, peers: list[PeerId], wave: int) -> None:
        """``peers`` were pinged in ``wave``; their answer is owed until that wave expires."""
        for peer in peers:
            self._outstanding[peer] = wave

    def recheck(self, peers: list[PeerId]) -> list[PeerId]:
        """Of ``peers``, those alive and not already pinged: to be pinged again.

        Used to verify that the recipients of a model are still there; a recheck that times
        out marks the peer dead, which moves the sample on to the next candidate.
        """
        return [
            p
            for p in peers
            if p != self._me
            and self._status.get(p) is Liveness.ALIVE
            and p not in self._outstanding
        ]

    # -- what happened ----------------------------------------------------------------
    def answer(self, peer: PeerId) -> bool:
        """A pong of this round came from ``peer``; return whether the resolution moved.

        A pong after the wave expired is ignored: the peer was already passed over, and
        taking it back would reorder a sample others may have used.
        """
        if self._outstanding.pop(peer, None) is None:
            return False
        if self._status.get(peer) is Liveness.PENDING:
            self._status[peer] = Liveness.ALIVE
            self._answered += 1
            return True
        return False

    def expire(self, wave: int) -> list[PeerId]:
        """Wave ``wave`` timed out: every peer that still owes its answer is dead."""
        lost = [peer for peer, w in self._outstanding.items() if w == wave]
        for peer in lost:
            del self._outstanding[peer]
            if self._status.get(peer) is Liveness.PENDING:
                self._lost += 1
            self._status[peer] = Liveness.DEAD
        return lost

    def fail(self, peer: PeerId) -> bool:
        """``peer`` is known to be unreachable; return whether that changed anything."""
        if self._status.get(peer) is Liveness.DEAD or peer == self._me:
            return False
        if self._status.get(peer) is Liveness.PENDING:
            self._lost += 1
        self._outstanding.pop(peer, None)
        self._status[peer] = Liveness.DEAD
        return True

    # -- the result ---------------------------------------------------------------------
    def first(self, k: int) -> list[PeerId] | None:
        """The first ``k`` responsive candidates, or ``None`` while that is not yet known.

        Fewer than ``k`` when the candidates ran out.
        """
        found: list[PeerId] = []
        for peer in self.candidates[: self._scanned]:
            status = self._status[peer]
            if status is Liveness.PENDING:
                return None
            if status is Liveness.ALIVE:
                found.append(peer)
                if len(found) == k:
                    return found
        if self._scanned < len(self.candidates):
            return None
        return found

    def passed_over(self, k: int) -> int:
        """How many candidates were skipped (dead) ahead of the ``k``-th responsive one."""
        alive = dead = 0
        for peer in self.candidates[: self._scanned]:
            status = self._status[peer]
            if status is Liveness.ALIVE:
                alive += 1
                if alive == k:
                    break
            elif status is Liveness.DEAD:
                dead += 1
        return dead
