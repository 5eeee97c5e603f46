"""Asynchronous gossip learning with age-weighted merging (Ormandi et al., Hegedus et al.).

There are no rounds to agree on: every ``period`` seconds a peer pushes its current model
and its *age* (the number of local steps behind it) to one random neighbour. A peer that
receives a model merges it with its own, weighting each by its age, takes the larger age,
trains ``local_steps`` steps and adds them to the age. Models that carry more training
count more, so a fresh peer cannot drag an experienced one back.

``round`` counts elapsed gossip periods; it is what metrics and checkpoints call a round.
At most one received model waits while training runs (the newest wins), which bounds
memory however fast others push.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from p2pfl.protocols.base import (
    Effect,
    Event,
    Message,
    MessageReceived,
    PeerId,
    Protocol,
    Record,
    RoundCompleted,
    Send,
    SetTimer,
    Start,
    TimerFired,
    TrainingDone,
)
from p2pfl.protocols.contract import Float, MessageSpec, Role

MODEL = "model"
GOSSIP_TIMER = "gossip"


def age_weighted_merge(
    own: torch.Tensor, own_age: float, other: torch.Tensor, other_age: float
) -> torch.Tensor:
    """Average two models weighted by their ages (plain average when both are new)."""
    total = own_age + other_age
    if total <= 0:
        return (own + other) / 2
    return (own * own_age + other * other_age) / total


class GossipLearning(Protocol):
    """Push to one random neighbour per period; merge by age, then train."""

    name = "gossip"
    #: a neighbour's model and its age (local steps behind it); how much older than
    #: ours an age may be is the protocol's own check (``max_age_lead``)
    messages: ClassVar[Mapping[str, MessageSpec]] = {
        MODEL: MessageSpec(sender=Role.NEIGHBOUR, tensor=True, fields={"age": Float(lo=0.0)}),
    }

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        period: float = 1.0,
        local_steps: int = 1,
        max_age_lead: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(peer_id, params, neighbours, local_steps=local_steps, seed=seed)
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period}")
        self.period = period
        #: how much older than ours a received model may claim to be (default: what
        #: 1,000 gossip periods of training could add); beyond it the age is not credible
        self.max_age_lead = max_age_lead if max_age_lead is not None else 1000.0 * local_steps
        self.age = 0.0
        self.training = False
        self.pending: tuple[torch.Tensor, float] | None = None
        self.unreachable: set[PeerId] = set()

    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, Start):
            # Spread the first pushes over one period so peers do not move in lockstep.
            offset = self.rng.random() * self.period
            return [SetTimer(GOSSIP_TIMER, event.now + offset)]
        if isinstance(event, TimerFired) and event.name == GOSSIP_TIMER:
            return self._on_period(event.now)
        if isinstance(event, MessageReceived):
            return self._on_message(event)
        if isinstance(event, TrainingDone):
            return self._on_trained(event)
        self._note_reachability(event, self.unreachable)
        return []

    def _on_period(self, now: float) -> list[Effect]:
        effects: list[Effect] = [SetTimer(GOSSIP_TIMER, now + self.period)]
        candidates = [p for p in self.neighbours if p not in self.unreachable]
        if candidates:
            target = self.rng.choice(candidates)
            effects.append(Send(target, Message(MODEL, self.round, self.params, {"age": self.age})))
        finished = self.round
        self.round += 1
        effects.append(RoundCompleted(finished))
        return effects

    def _on_message(self, event: MessageReceived) -> list[Effect]:
        message = event.message
        if message.kind != MODEL or message.params is None:
            return []
        if event.sender not in self.neighbours:
            return [Record("dropped.not_neighbour", 1.0)]
        age = message.meta.get("age", 0.0)
        if not isinstance(age, int | float) or not 0 <= age <= self.age + self.max_age_lead:
            # An age far beyond ours would let one message overwrite our model.
            return [Record("dropped.bad_age", 1.0)]
        if self.training:
            self.pending = (message.params, float(age))
            return []
        return self._merge_and_train(message.params, float(age))

    def _merge_and_train(self, other: torch.Tensor, other_age: float) -> list[Effect]:
        merged = age_weighted_merge(self.params, self.age, other, other_age)
        self.params = merged
        self.age = max(self.age, other_age)
        self.training = True
        return [self._train(merged)]

    def _on_trained(self, event: TrainingDone) -> list[Effect]:
        if not self.training or event.ticket != self._next_ticket:
            return []
        self.training = False
        self.params = event.params
        self.age += self.local_steps
        effects: list[Effect] = [Record("train_loss", event.loss)]
        if self.pending is not None:
            other, other_age = self.pending
            self.pending = None
            effects.extend(self._merge_and_train(other, other_age))
        return effects

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["age"] = self.age
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.age = float(state["age"])
        self.training = False
        self.pending = None
