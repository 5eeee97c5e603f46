"""FoolsGold (Fung, Yoon and Beschastnikh, 2020) as a defence of its own: the FL baseline.

Sybil identities of one adversary share one goal, so their updates point the same way
round after round, while honest clients, each on its own data, disagree. FoolsGold is the
server-side defence of federated learning built on that: it is :class:`FedAvg` whose
server weights each update by how *unlike* every other client's its history is.

The server, per client ``i`` it has ever heard from (Algorithm 1 of the paper):

1. **History.** ``H_i += Δ_i``, where ``Δ_i = x_i - x`` is the client's update of this
   round: the model it sent minus the global model it was sent.
2. **Similarity.** ``cs_ij`` = cosine similarity of ``H_i`` and ``H_j`` over *all* clients
   with a history (not only this round's: a Sybil sampled alone in a round is still
   compared with its twins of earlier rounds); ``v_i = max_{j != i} cs_ij``.
3. **Pardoning.** When ``v_j > v_i``: ``cs_ij *= v_i / v_j`` -- an honest client that
   merely resembles a Sybil is less similar to anyone than the Sybil is, and is pardoned.
4. ``α_i = 1 - max_{j != i} cs_ij``, clipped to ``[0, 1]``; rescaled ``α /= max(α)``.
5. **Logit.** ``α_i = κ (ln(α_i / (1 - α_i)) + 0.5)`` (with 1 taken as 0.99), clipped to
   ``[0, 1]``: distinct clients saturate at 1, near-twins drop to 0.

Steps 2-5 are :func:`p2pfl.aggregation.foolsgold_weights` (one scoring function, also
used by SybilWall). The paper's optional per-feature importance weighting is not applied.

The global model then moves by the ``α``-weighted mean of this round's updates,
``x += sum_i a_i Δ_i / sum_i a_i`` with ``a_i = α_i`` times FedAvg's share of ``i``
(``weighting``: sample counts or uniform). The paper writes the unnormalised sum
``sum_i α_i Δ_i`` with its learning rate folded in; normalising keeps the step of a round
where every client is honest exactly FedAvg's. If every ``α`` is 0 (all updates alike,
e.g. a round answered by Sybils only) the global model is kept (``foolsgold.all_zero``).

The decentralised counterpart -- each peer scoring its own neighbours' histories, no
server -- is SybilWall without history gossip: ``protocol.name = "sybilwall"``,
``max_known = 0``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from p2pfl.aggregation import foolsgold_weights
from p2pfl.protocols.base import Effect, PeerId, Record
from p2pfl.protocols.fedavg import FedAvg
from p2pfl.protocols.synchronous import AggregateFn

__all__ = ["FoolsGold"]


class FoolsGold(FedAvg):
    """Federated averaging whose server weights updates by FoolsGold scores."""

    name = "foolsgold"

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        server: PeerId,
        kappa: float = 1.0,
        clients_per_round: int = 10,
        round_timeout: float = 5.0,
        min_updates: int = 1,
        samples: int = 1,
        weighting: Literal["samples", "uniform"] = "samples",
        aggregate: AggregateFn | None = None,
        local_steps: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            peer_id,
            params,
            neighbours,
            server=server,
            clients_per_round=clients_per_round,
            round_timeout=round_timeout,
            min_updates=min_updates,
            samples=samples,
            weighting=weighting,
            aggregate=aggregate,
            local_steps=local_steps,
            seed=seed,
        )
        if not kappa > 0:
            raise ValueError(f"kappa must be > 0, got {kappa!r}")
        self.kappa = float(kappa)
        #: the server's running sum of each client's updates (float64: sums of many rounds)
        self.history: dict[PeerId, torch.Tensor] = {}
        #: the latest round's weights, by client (what ``report`` shows)
        self.scores: dict[PeerId, float] = {}
        self._effects: list[Effect] = []

    def _combine(self, senders: list[PeerId]) -> torch.Tensor:
        start = self.params.to(torch.float64)
        deltas = {p: self.updates[p][0].to(torch.float64) - start for p in senders}
        for peer, delta in deltas.items():
            previous = self.history.get(peer)
            self.history[peer] = delta.clone() if previous is None else previous + delta
        known = sorted(self.history)
        alpha = foolsgold_weights(torch.stack([self.history[p] for p in known]), self.kappa)
        score = dict(zip(known, alpha.tolist(), strict=True))
        self.scores = {p: score[p] for p in senders}
        weights = [
            score[p] * share for p, share in zip(senders, self._shares(senders), strict=True)
        ]
        total = sum(weights)
        self._effects.append(Record("foolsgold.zero_weights", float(sum(w == 0 for w in weights))))
        if total <= 0:
            self._effects.append(Record("foolsgold.all_zero", 1.0))
            return self.params
        step = sum((w / total) * deltas[p] for p, w in zip(senders, weights, strict=True))
        assert isinstance(step, torch.Tensor)
        return (start + step).to(self.params.dtype)

    def _finish_round(self, now: float, *, timed_out: bool) -> list[Effect]:
        effects = super()._finish_round(now, timed_out=timed_out)
        recorded, self._effects = self._effects, []
        return recorded + effects

    def report(self) -> dict[str, Any]:
        return {**super().report(), "foolsgold_scores": dict(self.scores)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["history"] = {p: h.clone() for p, h in self.history.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = {p: h.clone() for p, h in state.get("history", {}).items()}
