"""SybilWall (Werthenbach and Pouwelse, 2023): Sybil-resistant decentralized learning.

A Sybil adversary's identities pursue one goal, so the updates they send point the same
way, while honest peers, each on its own non-IID data, disagree. SybilWall runs D-PSGD's
round structure (train, send to every neighbour, wait for them or the round timer) and
changes how a peer mixes:

1. **Histories.** For each direct neighbour ``j`` a peer keeps ``h_j``, the running sum of
   ``j``'s updates as it sees them: ``received model of j - own model at the start of the
   round`` (both come from the same starting point after mixing, so the difference is
   essentially what ``j``'s local training did). The sum is kept locally: a peer never
   trusts anyone else's account of its own neighbours.
2. **History gossip.** Every round a peer sends each neighbour one stored history (kind
   ``"history"``, with its subject and hop distance), drawn with probability
   ``gossip_decay ** hops``: mostly its own neighbours' (1 hop), sometimes ones it heard of
   (2, 3... hops). A received history is stored at ``hops + 1``; at most ``max_known`` such
   histories are kept (the farthest go first). This is what lets a peer see that its one
   Sybil neighbour has twins elsewhere in the network.
3. **Scoring.** All known histories -- direct and gossiped, one row per peer -- are scored
   FoolsGold-style (:func:`p2pfl.aggregation.sybilwall_weights`: cosine similarity,
   pardoning, logit), and each direct neighbour's model is weighted by its score, the
   peer's own model by 1: ``x = (x_own + sum_j w_j x_j) / (1 + sum_j w_j)``.

The weights are aligned to the models they weight by construction (the reference code
mis-aligned them once gossiped histories were present: we implement the intent).
Gossiped histories are taken at face value: a liar could gossip fabricated histories of
honest peers; the paper assumes it does not, and so do we.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from p2pfl.aggregation import sybilwall_weights
from p2pfl.protocols.base import (
    Effect,
    Event,
    Message,
    MessageReceived,
    PeerId,
    Record,
    Send,
    TrainingDone,
)
from p2pfl.protocols.dpsgd import DPSGD
from p2pfl.protocols.synchronous import AggregateFn

HISTORY = "history"


class SybilWall(DPSGD):
    """D-PSGD whose neighbours are weighted by how unlike each other their histories are."""

    name = "sybilwall"

    def __init__(
        self,
        peer_id: PeerId,
        params: Tensor,
        neighbours: list[PeerId],
        *,
        gossip_decay: float = 0.5,
        max_known: int = 16,
        kappa: float = 1.0,
        local_steps: int = 1,
        round_timeout: float = 10.0,
        aggregate: AggregateFn | None = None,
        catch_up: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            peer_id,
            params,
            neighbours,
            local_steps=local_steps,
            round_timeout=round_timeout,
            aggregate=aggregate,
            catch_up=catch_up,
            seed=seed,
        )
        if not 0 < gossip_decay <= 1:
            raise ValueError(f"gossip_decay must be in (0, 1], got {gossip_decay}")
        if max_known < 0:
            raise ValueError(f"max_known must be >= 0, got {max_known}")
        if not kappa > 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        self.gossip_decay = float(gossip_decay)
        self.max_known = int(max_known)
        self.kappa = float(kappa)
        #: direct neighbours' histories, kept locally
        self.histories: dict[PeerId, Tensor] = {}
        #: farther peers' histories heard by gossip: subject -> (history, hops)
        self.gossiped: dict[PeerId, tuple[Tensor, int]] = {}
        #: the weight of each sender in the round being mixed
        self.trust: dict[PeerId, float] = {}
        self.round_start: Tensor = params

    # -- rounds -----------------------------------------------------------------------------
    def _start_round(self) -> list[Effect]:
        self.round_start = self.params
        return super()._start_round()

    def _on_trained(self, event: TrainingDone) -> list[Effect]:
        if self.phase != "training" or event.ticket != self._next_ticket:
            return []
        gossip = self._gossip()  # tagged with the round the models are sent in
        return gossip + super()._on_trained(event)

    def _finish_round(self, now: float, *, timed_out: bool) -> list[Effect]:
        received = self.inbox.get(self.round, {})
        senders = sorted(received)
        effects: list[Effect] = []
        if senders:
            start = self.round_start
            for peer in senders:
                update = (received[peer] - start).to(torch.float32)
                previous = self.histories.get(peer)
                # out of place: a history already gossiped must not change under the receiver
                self.histories[peer] = update if previous is None else previous + update
            scores = self._score(senders)
            self.trust = dict(zip(senders, scores.tolist(), strict=True))
            effects.append(Record("sybilwall.zero_weight", float((scores == 0).sum())))
        return effects + super()._finish_round(now, timed_out=timed_out)

    def _score(self, senders: list[PeerId]) -> Tensor:
        """SybilWall weights of ``senders``, scored against every history known."""
        others = sorted(p for p in self.histories if p not in set(senders))
        rows = [self.histories[p] for p in senders] + [self.histories[p] for p in others]
        rows += [history for history, _ in self.gossiped.values()]
        return sybilwall_weights(
            torch.stack(rows), direct=list(range(len(senders))), kappa=self.kappa
        )

    def _mixing_weights(self, senders: list[PeerId]) -> Tensor:
        """Own model weight 1, each sender its score; normalised to sum to 1."""
        weights = torch.tensor(
            [1.0, *(self.trust.get(p, 0.0) for p in senders)], dtype=torch.float32
        )
        return weights / weights.sum()

    # -- history gossip ------------------------------------------------------------------
    def _known(self) -> list[tuple[PeerId, Tensor, int]]:
        direct = [(p, self.histories[p], 1) for p in sorted(self.histories)]
        far = [(p, h, hops) for p, (h, hops) in sorted(self.gossiped.items())]
        return direct + far

    def _gossip(self) -> list[Effect]:
        if self.max_known == 0:
            return []
        known = self._known()
        effects: list[Effect] = []
        for peer in self._recipients():
            candidates = [k for k in known if k[0] != peer]
            if not candidates:
                continue
            weights = [self.gossip_decay**hops for _, _, hops in candidates]
            subject, history, hops = self.rng.choices(candidates, weights=weights)[0]
            meta = {"subject": subject, "hops": hops}
            effects.append(Send(peer, Message(HISTORY, self.round, history, meta)))
        return effects

    def _on_history(self, event: MessageReceived) -> list[Effect]:
        message = event.message
        subject, hops = message.meta.get("subject"), message.meta.get("hops")
        history = message.params
        valid = (
            event.sender in self.weights
            and isinstance(subject, str)
            and isinstance(hops, int)
            and not isinstance(hops, bool)
            and hops >= 1
            and history is not None
            and history.shape == self.params.shape
        )
        if not valid:
            return [Record("sybilwall.bad_history", 1.0)]
        if subject == self.peer_id or subject in self.weights or self.max_known == 0:
            return []  # our own neighbours' histories we keep ourselves
        self.gossiped.pop(subject, None)  # re-inserted last: the freshest
        self.gossiped[subject] = (history, hops + 1)
        while len(self.gossiped) > self.max_known:
            farthest = max(self.gossiped.values(), key=lambda entry: entry[1])[1]
            victim = next(p for p, (_, h) in self.gossiped.items() if h == farthest)
            del self.gossiped[victim]
        return []

    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, MessageReceived) and event.message.kind == HISTORY:
            return self._on_history(event)
        return super().handle(event)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["histories"] = {p: h.clone() for p, h in self.histories.items()}
        state["gossiped"] = {p: [h.clone(), hops] for p, (h, hops) in self.gossiped.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.histories = {p: h.clone() for p, h in state.get("histories", {}).items()}
        self.gossiped = {
            p: (h.clone(), int(hops)) for p, (h, hops) in state.get("gossiped", {}).items()
        }
        self.round_start = self.params
