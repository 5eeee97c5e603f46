"""Federated averaging (McMahan et al., 2017) with partial participation: the baseline.

Decentralized protocols claim to learn "as fast as federated learning"; this is the
federated learning they are measured against, written as a sans-I/O protocol like the
others so that the simulator and real nodes run it unchanged. It is star-shaped: one peer
is the *server*, every other peer a *client*; the server's clients are its neighbours (in
the simulator use ``topology.kind = "star"``, whose centre is peer 0, or a complete graph).

Round ``r`` (the server's round):

1. the server draws ``clients_per_round`` clients uniformly from those it has not found
   unreachable (all of them when fewer are left) and sends each the global model
   (kind ``"global"``, tagged ``r``);
2. a client that receives it takes the global model as its own, trains it for
   ``local_steps`` steps and sends the result back (kind ``"update"``, tagged ``r``, with
   its number of training samples ``n``);
3. the server replaces the global model by the sample-weighted mean of the updates,
   ``x = sum_k n_k x_k / sum_k n_k`` (FedAvg's ``n_k / n``; ``weighting = "uniform"``:
   the plain mean), as soon as every sampled client answered or was found unreachable,
   or when the round timer fires (``round_timeout``: a lost client never stalls a
   round). With fewer than
   ``min_updates`` updates by then the round ends with the global model unchanged.
   Then round ``r + 1`` starts.

A client completes round ``r - 1`` when it learns of round ``r`` (a ``"global"`` tagged
``r``): its model is then the global model after round ``r - 1``. Clients that are not
sampled hear nothing (federated traffic is models only) and keep the last global model
they got; the server's model is the one FedAvg's accuracy is quoted for. Because the run
moves with the server, the protocol declares ``progress = "max"``. When the server leaves
(a node that finished its rounds) it tells every client the round it reached (kind
``"round"``, no tensor), so that clients that were not sampled at the end stop too.

The message contract: only the server sends ``"global"`` and ``"round"`` (the
:attr:`~p2pfl.protocols.contract.Role.AGGREGATOR` of every round), and only the clients
the server sampled for a round send that round's ``"update"``
(:attr:`~p2pfl.protocols.contract.Role.SAMPLED`); every tensor is a float32 vector of the
model's size. A client chooses the sample count it declares: the contract bounds it
(``MAX_SAMPLES``), nothing can check it -- a lying client weighs more, as in FedAvg itself.

A robust aggregator (``protocol.aggregator``) replaces the weighted mean; it gets the
previous global model as the server's own row (row 0, weight 0) followed by the updates,
the convention of every protocol here (own model first). A rule with a fixed ``f`` that
this round's updates are too few for (clients timed out or kept silent) leaves the global
model as it is, as a round with fewer than ``min_updates`` does (``too_few_to_aggregate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

import torch

from p2pfl.aggregation import TooFewVectors
from p2pfl.protocols.base import (
    CancelTimer,
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
from p2pfl.protocols.contract import Int, MessageSpec, Role
from p2pfl.protocols.synchronous import AggregateFn, weighted_mean

__all__ = ["GLOBAL", "MAX_SAMPLES", "ROUND", "SAMPLES", "UPDATE", "FedAvg"]

#: server -> sampled client: the global model of the round
GLOBAL = "global"
#: sampled client -> server: its locally trained model, with its sample count
UPDATE = "update"
#: server -> every client, when the server leaves: the round it reached (no tensor)
ROUND = "round"
#: meta key of an update: the client's number of training samples
SAMPLES = "n"
#: the largest sample count a client may declare
MAX_SAMPLES = 1 << 31
#: the server's round timer
ROUND_TIMER = "fedavg.round"
#: sampled sets kept for the contract's role check (the current round and the one before)
_KEEP_SAMPLES = 2


class FedAvg(Protocol):
    """One peer of a federated-averaging network: the server or a client.

    ``server`` names the server's peer id; the peer whose id it is acts as the server,
    over ``neighbours`` as its clients. ``samples`` is this peer's number of training
    samples (the weight of its updates).
    """

    name = "fedavg"
    #: the run moves with the server; clients that are not sampled do not complete rounds
    progress: ClassVar[Literal["min", "max"]] = "max"
    messages: ClassVar[Mapping[str, MessageSpec]] = {
        GLOBAL: MessageSpec(sender=Role.AGGREGATOR, tensor=True),
        UPDATE: MessageSpec(
            sender=Role.SAMPLED,
            tensor=True,
            fields={SAMPLES: Int(lo=1, hi=MAX_SAMPLES)},
            required=frozenset({SAMPLES}),
        ),
        ROUND: MessageSpec(sender=Role.AGGREGATOR),
    }

    aggregation_bound: ClassVar[str | None] = "clients_per_round"

    @classmethod
    def most_models_aggregated(cls, config: Any, degree: int) -> int | None:
        return int(config.clients_per_round) + 1  # the server's row and the updates

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        server: PeerId,
        clients_per_round: int = 10,
        round_timeout: float = 5.0,
        min_updates: int = 1,
        samples: int = 1,
        weighting: Literal["samples", "uniform"] = "samples",
        aggregate: AggregateFn | None = None,
        local_steps: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(peer_id, params, neighbours, local_steps=local_steps, seed=seed)
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if round_timeout <= 0:
            raise ValueError(f"round_timeout must be > 0, got {round_timeout}")
        if min_updates < 1:
            raise ValueError(f"min_updates must be >= 1, got {min_updates}")
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.weighting = weighting
        self.server = server
        self.is_server = peer_id == server
        self.clients: list[PeerId] = [p for p in self.neighbours if p != peer_id]
        self.clients_per_round = clients_per_round
        self.round_timeout = round_timeout
        self.min_updates = min_updates
        self.samples = max(1, min(int(samples), MAX_SAMPLES))
        self.aggregate = aggregate
        # -- server state
        self.phase: Literal["idle", "collecting", "waiting"] = "idle"
        #: the clients sampled for each recent round (the contract's SAMPLED role)
        self.sampled: dict[int, frozenset[PeerId]] = {}
        self.updates: dict[PeerId, tuple[torch.Tensor, int]] = {}
        self.unreachable: set[PeerId] = set()
        # -- client state
        #: the last round this peer completed (a client: the round before the last global)
        self.completed = -1
        self._training_round: int | None = None
        self._last_global = -1

    def declare_samples(self, samples: int) -> None:
        """The weight of this peer's updates (bounded as the contract bounds received ones)."""
        self.samples = max(1, min(int(samples), MAX_SAMPLES))

    # -- the contract's roles ------------------------------------------------------------

    def has_role(self, role: Role, sender: PeerId, message: Message) -> bool:
        if role is Role.AGGREGATOR:
            return not self.is_server and sender == self.server
        if role is Role.SAMPLED:
            sample = self.sampled.get(message.round) if self.is_server else None
            return sample is not None and sender in sample
        return super().has_role(role, sender, message)

    # -- events -----------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Effect]:
        if self._note_reachability(event, self.unreachable):
            if self.is_server and self.phase == "collecting":
                return self._maybe_finish(event.now)
            return []
        if self.is_server:
            return self._serve(event)
        return self._participate(event)

    # -- the server ---------------------------------------------------------------------------
    def _serve(self, event: Event) -> list[Effect]:
        if isinstance(event, MessageReceived):
            return self._on_update(event)
        if isinstance(event, Start):
            return self._open_round(event.now)
        if isinstance(event, TimerFired) and event.name == ROUND_TIMER:
            if self.phase == "collecting":
                return self._finish_round(event.now, timed_out=True)
            if self.phase == "waiting":
                return self._open_round(event.now)
        return []

    def _open_round(self, now: float) -> list[Effect]:
        """Sample this round's clients and send them the global model."""
        available = [c for c in self.clients if c not in self.unreachable]
        if not available:  # nobody to ask: try again after a round timeout
            self.phase = "waiting"
            return [
                Record("fedavg.no_clients", 1.0),
                SetTimer(ROUND_TIMER, now + self.round_timeout),
            ]
        chosen = self.rng.sample(available, min(self.clients_per_round, len(available)))
        sample = sorted(chosen)
        self.sampled[self.round] = frozenset(sample)
        for old in sorted(self.sampled)[:-_KEEP_SAMPLES]:
            del self.sampled[old]
        self.updates = {}
        self.phase = "collecting"
        message = Message(GLOBAL, self.round, self.params)
        effects: list[Effect] = [Send(client, message) for client in sample]
        effects.append(SetTimer(ROUND_TIMER, now + self.round_timeout))
        effects.append(Record("fedavg.sampled", float(len(sample))))
        return effects

    def _on_update(self, event: MessageReceived) -> list[Effect]:
        message = event.message
        if message.kind != UPDATE or message.params is None:
            return []
        if self.phase != "collecting" or message.round != self.round:
            return [Record("fedavg.late_update", 1.0)]
        if event.sender in self.updates:
            return [Record("fedavg.duplicate_update", 1.0)]
        self.updates[event.sender] = (message.params, int(message.meta[SAMPLES]))
        return self._maybe_finish(event.now)

    def _maybe_finish(self, now: float) -> list[Effect]:
        sample = self.sampled.get(self.round, frozenset())
        if sample - self.updates.keys() - self.unreachable:
            return []  # a sampled client that may still answer
        return self._finish_round(now, timed_out=False)

    def _finish_round(self, now: float, *, timed_out: bool) -> list[Effect]:
        senders = sorted(self.updates)
        effects: list[Effect] = [CancelTimer(ROUND_TIMER)]
        if len(senders) >= self.min_updates:
            try:
                self.params = self._combine(senders)
            except TooFewVectors:
                # too few updates for the rule's f (silent clients): any mix of them could
                # be the attackers'; the global model stays (and the run goes on)
                effects.append(Record("too_few_to_aggregate", 1.0))
        else:
            effects.append(Record("fedavg.empty_rounds", 1.0))
        if timed_out:
            effects.append(Record("round_timeouts", 1.0))
        effects.append(Record("received_models", float(len(senders))))
        finished = self.round
        self.completed = finished
        self.round += 1
        self.updates = {}
        effects.append(RoundCompleted(finished))
        effects.extend(self._open_round(now))
        return effects

    def _shares(self, senders: list[PeerId]) -> list[float]:
        """Each sender's share of the mean: ``n_k / n`` (``weighting = "samples"``) or
        ``1 / k`` (``"uniform"``)."""
        if self.weighting == "uniform":
            return [1.0 / len(senders)] * len(senders)
        counts = [self.updates[p][1] for p in senders]
        total = float(sum(counts))
        return [c / total for c in counts]

    def _combine(self, senders: list[PeerId]) -> torch.Tensor:
        """FedAvg's sample-weighted mean of the updates (or the configured rule)."""
        weights = torch.tensor([0.0, *self._shares(senders)], dtype=torch.float32)
        stack = torch.stack([self.params, *(self.updates[p][0] for p in senders)])
        combine = self.aggregate or weighted_mean
        return combine(stack, weights, 0)

    # -- a client ----------------------------------------------------------------------------
    def _participate(self, event: Event) -> list[Effect]:
        if isinstance(event, MessageReceived):
            message = event.message
            if message.kind == GLOBAL and message.params is not None:
                return self._on_global(message)
            if message.kind == ROUND:
                return self._learn_round(message.round)
            return []
        if isinstance(event, TrainingDone):
            return self._on_trained(event)
        return []  # Start: a client waits for the server

    def _learn_round(self, round_: int) -> list[Effect]:
        """The server is in ``round_``: every round before it is complete."""
        effects: list[Effect] = []
        if round_ - 1 > self.completed:
            self.completed = round_ - 1
            effects.append(RoundCompleted(round_ - 1))
        self.round = max(self.round, round_)
        return effects

    def _on_global(self, message: Message) -> list[Effect]:
        if message.round < self.round or message.round <= self._last_global:
            return [Record("fedavg.stale_global", 1.0)]
        assert message.params is not None
        self._last_global = message.round
        self.params = message.params  # the model a client holds is the server's
        effects = self._learn_round(message.round)
        self._training_round = message.round
        effects.append(self._train(message.params))
        return effects

    def _on_trained(self, event: TrainingDone) -> list[Effect]:
        if event.ticket != self._next_ticket or self._training_round is None:
            return []  # superseded by a newer global
        round_, self._training_round = self._training_round, None
        if round_ < self.round:
            return []
        update = Message(UPDATE, round_, event.params, {SAMPLES: self.samples})
        return [Send(self.server, update), Record("train_loss", event.loss)]

    # -- lifecycle ------------------------------------------------------------------------------
    def leave(self, now: float) -> list[Effect]:
        """The server tells every client the round it reached, so that they stop too."""
        if not self.is_server:
            return []
        notice = Message(ROUND, self.round)
        return [Send(client, notice) for client in self.clients]

    def withhold(self, peers: Iterable[PeerId]) -> None:
        """Late joiners are not sampled until they come up."""
        self.unreachable.update(peers)

    def report(self) -> dict[str, Any]:
        return {"role": "server" if self.is_server else "client", "completed": self.completed}

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["completed"] = self.completed
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # resumed between rounds: a server opens its round again on Start
        super().load_state_dict(state)
        self.completed = int(state.get("completed", self.round - 1))
        self.phase = "idle"
        self.updates = {}
        self.sampled = {}
        self._training_round = None
        self._last_global = self.completed
