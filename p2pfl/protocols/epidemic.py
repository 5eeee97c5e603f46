"""Epidemic Learning (de Vos et al., NeurIPS 2023).

Every round a peer trains, pushes its model to ``fanout`` peers drawn uniformly at random
(a fresh draw each round, which is what makes the communication graph randomised and
mixing fast), and averages its own model with every model of the same round that reached
it. Nobody knows in advance how many models will arrive, so the round closes when the
round timer fires.

``candidates`` is whom the peer may push to: its neighbours in a topology, or -- as in the
paper's EL-Oracle/EL-Local settings -- the whole population known to it.
"""

from __future__ import annotations

from typing import Unpack

import torch

from p2pfl.protocols.base import Effect, Event, PeerId
from p2pfl.protocols.synchronous import RoundSettings, SynchronousRoundProtocol


class EpidemicLearning(SynchronousRoundProtocol):
    """EL: push to ``fanout`` random peers, average whatever arrived for the round."""

    name = "epidemic"

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        fanout: int = 3,
        round_timeout: float = 1.0,
        **settings: Unpack[RoundSettings],
    ) -> None:
        super().__init__(peer_id, params, neighbours, round_timeout=round_timeout, **settings)
        if fanout < 1:
            raise ValueError(f"fanout must be >= 1, got {fanout}")
        self.fanout = fanout
        self.unreachable: set[PeerId] = set()

    def _recipients(self) -> list[PeerId]:
        candidates = [p for p in self.neighbours if p not in self.unreachable]
        if len(candidates) <= self.fanout:
            return candidates
        return self.rng.sample(candidates, self.fanout)

    def _expected_senders(self) -> set[PeerId] | None:
        return None  # unknown: the round timer closes the round

    def _accepts_sender(self, sender: PeerId) -> bool:
        return sender != self.peer_id

    def _mixing_weights(self, senders: list[PeerId]) -> torch.Tensor | None:
        return None  # plain average of own and received models

    def handle(self, event: Event) -> list[Effect]:
        if self._note_reachability(event, self.unreachable):
            return []
        return super().handle(event)
