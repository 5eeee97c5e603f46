"""When an attacker attacks: a start round, a stop round, and an on-off cycle.

Real adversaries do not attack from the first round: they behave for a while (to be
trusted, to let a reputation system score them honest, to hit a model that has already
converged) and may attack in bursts. An :class:`AttackSchedule` says in which rounds a
Byzantine peer carries out its attack; in every other round it is an honest peer -- it
trains on clean batches, sends what it trained, hears what it is sent, without delay.

Round ``r`` is *active* when ``start_round <= r`` and (``stop_round`` is ``None`` or
``r < stop_round``), and, with a cycle, ``(r - start_round) % period < duty``: the first
``duty`` rounds of every ``period`` rounds, counted from ``start_round``. For example
``start_round = 5, stop_round = 15, period = 4, duty = 2`` attacks in rounds
5, 6, 9, 10, 13, 14.

A round is the protocol's own round number: the tag of the message a model attack
rewrites, and the round the protocol is in when it asks for training (what a scheduled
data attack's batch transform goes by, :class:`RoundGate`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALWAYS", "AttackSchedule", "RoundGate"]


@dataclass(frozen=True, slots=True)
class AttackSchedule:
    """The rounds in which an attack is carried out (see the module docstring)."""

    start_round: int = 0
    stop_round: int | None = None
    period: int | None = None
    duty: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.start_round, bool) or self.start_round < 0:
            raise ValueError(f"start_round must be an int >= 0, got {self.start_round!r}")
        if self.stop_round is not None and self.stop_round <= self.start_round:
            raise ValueError(
                f"stop_round must be > start_round={self.start_round}, got {self.stop_round}"
            )
        if (self.period is None) != (self.duty is None):
            raise ValueError("give period and duty together (duty active rounds per period)")
        if self.period is not None and self.duty is not None:
            if self.period < 1:
                raise ValueError(f"period must be an int >= 1, got {self.period}")
            if not 1 <= self.duty <= self.period:
                raise ValueError(f"duty must be in [1, period={self.period}], got {self.duty}")

    @property
    def always(self) -> bool:
        """Whether every round is active (the default: an attacker from the start)."""
        cycles = self.period is not None and self.duty is not None and self.duty < self.period
        return self.start_round == 0 and self.stop_round is None and not cycles

    def active(self, round_: int) -> bool:
        """Whether the attack is carried out in round ``round_``."""
        if round_ < self.start_round:
            return False
        if self.stop_round is not None and round_ >= self.stop_round:
            return False
        if self.period is None or self.duty is None:
            return True
        return (round_ - self.start_round) % self.period < self.duty


#: the schedule of an attacker that attacks in every round
ALWAYS = AttackSchedule()


class RoundGate:
    """The round a Byzantine peer's protocol is in when it last asked for training.

    A data attack poisons batches inside the driver's trainer, which knows no rounds; the
    Byzantine wrapper sets ``round`` whenever its protocol asks for training, and the
    attack's batch transform poisons only when the schedule says that round is active.
    One gate per attacker (each simulated Byzantine peer builds its own attack).
    """

    __slots__ = ("round",)

    def __init__(self) -> None:
        self.round = 0
