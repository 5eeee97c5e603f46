"""Decentralized parallel SGD (D-PSGD) with a fixed mixing matrix.

Every round a peer trains its model for ``local_steps`` steps, sends the result to all its
neighbours, waits for theirs (tagged with the same round) and replaces its model by the
weighted combination ``x_i = sum_j W_ij x_j`` -- Metropolis-Hastings weights by default.

Where the weights come from, one behaviour in every driver:
- given (``weights``): the simulator's graph, a node's topology file. They win;
- otherwise learned: every model carries its sender's degree (meta ``deg``), and the
  weight of neighbour ``j`` is ``1 / (max(deg_i, deg_j) + 1)`` -- the Metropolis-Hastings
  weight, computed by ``i`` and ``j`` alike, so the matrix is symmetric and doubly
  stochastic as in the simulator, with no graph file. ``mixing="uniform"`` ignores the
  degrees: ``1 / (deg_i + 1)`` each.

In both cases the own weight is ``1 - sum`` of the others. A neighbour chooses the
degree it declares, so it is bounded where it matters: a weight is never above
``1 / (deg_i + 1)`` whatever is declared (a small degree cannot buy influence; a large one
only lowers the liar's own weight), and the own weight stays ``>= 1 / (deg_i + 1)``. A
declared degree that disagrees with given Metropolis-Hastings weights is counted
(``dpsgd.degree_mismatch``). A model without a degree (from a protocol whose models do
not carry one, e.g. Bristle's output layers) leaves its sender's weight where it was:
at most the bound.

The wait is bounded by ``round_timeout``: a neighbour that crashed or whose message was
lost does not block the round. Its weight then goes to the peer's own model, so the
combination stays a convex one. Any robust aggregator can replace the weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Unpack

import torch

from p2pfl.protocols.base import (
    Effect,
    Event,
    MessageReceived,
    PeerDown,
    PeerId,
    PeerUp,
    Record,
    SendFailed,
)
from p2pfl.protocols.contract import Int, MessageSpec, Role
from p2pfl.protocols.synchronous import MODEL, RoundSettings, SynchronousRoundProtocol
from topologies.weights import metropolis_hastings_weight

#: meta key of a model message: the sender's degree (its number of neighbours)
DEGREE = "deg"
#: the largest degree a peer may declare (far above any neighbour list a node keeps)
MAX_DEGREE = 1 << 20
#: relative difference beyond which a declared degree disagrees with a given weight
_AGREE = 1e-9


class DPSGD(SynchronousRoundProtocol):
    """D-PSGD: train, exchange with every neighbour, mix with fixed weights."""

    name = "dpsgd"
    #: a peer mixes with its graph neighbours only
    needs_connected_graph: ClassVar[bool] = True
    #: a round's trained model from a neighbour, with the sender's degree (optional on
    #: the wire: a model without one leaves its sender's weight at most the bound)
    messages: ClassVar[Mapping[str, MessageSpec]] = {
        MODEL: MessageSpec(
            sender=Role.NEIGHBOUR, tensor=True, fields={DEGREE: Int(lo=1, hi=MAX_DEGREE)}
        ),
    }

    @classmethod
    def most_models_aggregated(cls, config: Any, degree: int) -> int | None:
        return degree + 1  # its neighbours' models and its own

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        weights: Mapping[PeerId, float] | None = None,
        mixing: Literal["metropolis_hastings", "uniform"] = "metropolis_hastings",
        round_timeout: float = 10.0,
        **settings: Unpack[RoundSettings],
    ) -> None:
        super().__init__(peer_id, params, neighbours, round_timeout=round_timeout, **settings)
        if mixing not in ("metropolis_hastings", "uniform"):
            raise ValueError(f"unknown mixing scheme {mixing!r}")
        self.mixing = mixing
        self.degree = len(self.neighbours)
        #: the weights are learned from declared degrees (none were given)
        self.learns_weights = weights is None and mixing == "metropolis_hastings"
        #: whether this protocol's models carry the degree (a subclass's contract may not)
        self.declares_degree = DEGREE in self.messages[MODEL].fields
        #: the degree each neighbour last declared (taken into account once per change)
        self._declared: dict[PeerId, int] = {}
        if weights is None:  # the bound for everyone until a degree says otherwise
            share = 1.0 / (self.degree + 1)
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

    # -- degrees ---------------------------------------------------------------------
    def _model_meta(self) -> dict[str, Any]:
        """This peer's degree, which each neighbour's Metropolis-Hastings weight needs."""
        return {DEGREE: self.degree} if self.declares_degree else {}

    def _learn_degree(self, event: MessageReceived) -> list[Effect]:
        """Take a neighbour's declared degree into its weight (or check it, if given)."""
        sender = event.sender
        if sender not in self.weights or event.message.kind != MODEL:
            return []
        declared = event.message.meta.get(DEGREE) if type(event.message.meta) is dict else None
        if type(declared) is not int or not 1 <= declared <= MAX_DEGREE:
            return []  # its weight stays where it is: at most the bound
        self._declared[sender] = declared
        if self.mixing != "metropolis_hastings":
            return []
        weight = metropolis_hastings_weight(self.degree, declared)
        current = self.weights[sender]
        if not self.learns_weights:
            if abs(weight - current) > _AGREE * max(weight, current):
                return [Record("dpsgd.degree_mismatch", 1.0)]
            return []
        if weight != current:
            self.weights[sender] = weight
            self._all_weights = None
        return []

    def handle(self, event: Event) -> list[Effect]:
        if type(event) is MessageReceived:  # most events: straight to the round logic
            meta = event.message.meta
            if meta and self._declared.get(event.sender) != meta.get(DEGREE):
                return self._learn_degree(event) + self._on_message(event)
            return self._on_message(event)  # no degree, or the one already taken in
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
