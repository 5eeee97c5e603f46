"""Decentralized parallel SGD (D-PSGD) with a fixed mixing matrix.

Every round a peer trains its model for ``local_steps`` steps, sends the result to all its
neighbours, waits for theirs (tagged with the same round) and replaces its model by the
weighted combination ``x_i = sum_j W_ij x_j`` -- Metropolis-Hastings weights by default.

The wait is bounded by ``round_timeout``: a neighbour that crashed or whose message was
lost does not block the round. Its weight then goes to the peer's own model, so the
combination stays a convex one. Any robust aggregator can replace the weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Unpack

import torch

from p2pfl.protocols.base import (
    Effect,
    Event,
    MessageReceived,
    PeerDown,
    PeerId,
    PeerUp,
    SendFailed,
)
from p2pfl.protocols.synchronous import RoundSettings, SynchronousRoundProtocol


class DPSGD(SynchronousRoundProtocol):
    """D-PSGD: train, exchange with every neighbour, mix with fixed weights."""

    name = "dpsgd"

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        weights: Mapping[PeerId, float] | None = None,
        round_timeout: float = 10.0,
        **settings: Unpack[RoundSettings],
    ) -> None:
        super().__init__(peer_id, params, neighbours, round_timeout=round_timeout, **settings)
        if weights is None:  # uniform over self and neighbours
            share = 1.0 / (len(self.neighbours) + 1)
            weights = {p: share for p in self.neighbours}
        unknown = set(weights) - set(self.neighbours) - {peer_id}
        if unknown:
            raise ValueError(
                f"mixing weights name peers that are not neighbours: {sorted(unknown)}"
            )
        self.weights = {p: float(weights.get(p, 0.0)) for p in self.neighbours}
        self.alive: set[PeerId] = set(self.neighbours)
        # Asked on every message received; recomputed only when ``alive`` changes.
        self._live: tuple[list[PeerId], set[PeerId]] | None = None
        self._all_weights: torch.Tensor | None = None

    def _live_neighbours(self) -> tuple[list[PeerId], set[PeerId]]:
        if self._live is None:
            live = [p for p in self.neighbours if p in self.alive]
            self._live = (live, set(live))  # shared: callers only read them
        return self._live

    # -- SynchronousRoundProtocol hooks ----------------------------------------------
    def _recipients(self) -> list[PeerId]:
        return self._live_neighbours()[0]

    def _expected_senders(self) -> set[PeerId]:
        return self._live_neighbours()[1]

    def _accepts_sender(self, sender: PeerId) -> bool:
        return sender in self.weights

    def _mixing_weights(self, senders: list[PeerId]) -> torch.Tensor:
        """Weights for ``[self] + senders``; missing neighbours' weight stays with self.

        Every neighbour answered in most rounds: that tensor is made once (read-only).
        """
        if len(senders) == len(self.weights):
            if self._all_weights is None:
                self._all_weights = self._weights_of(self.neighbours)
            return self._all_weights
        return self._weights_of(senders)

    def _weights_of(self, senders: list[PeerId]) -> torch.Tensor:
        others = [self.weights[p] for p in senders]
        own = 1.0 - sum(others)
        return torch.tensor([own, *others], dtype=torch.float32)

    def handle(self, event: Event) -> list[Effect]:
        if type(event) is MessageReceived:  # most events: straight to the round logic
            return self._on_message(event)
        if isinstance(event, PeerDown):
            self.alive.discard(event.peer)
            self._live = None
            return self._maybe_finish(event.now)
        if isinstance(event, PeerUp):
            if event.peer in self.weights:
                self.alive.add(event.peer)
                self._live = None
            return []
        if isinstance(event, SendFailed):
            self.alive.discard(event.to)
            self._live = None
            return self._maybe_finish(event.now)
        return super().handle(event)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["alive"] = sorted(self.alive)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.alive = set(state.get("alive", self.neighbours)) & set(self.neighbours)
        self._live = None
