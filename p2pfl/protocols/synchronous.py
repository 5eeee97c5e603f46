"""Shared machinery of round-based protocols: train, send, collect, aggregate.

D-PSGD and Epidemic Learning share one round structure and differ only in whom they send
to, whom they wait for and how they weight what they got. This base class owns the
structure -- round tags, a bounded buffer for early messages, the round timer -- so that
each protocol is a few small hooks.

Round ``r`` of a peer:
1. ``Train`` its model (phase ``training``);
2. on ``TrainingDone``, send the trained model tagged ``r`` to ``_recipients()`` and arm
   the round timer (phase ``collecting``);
3. aggregate its own trained model with the round-``r`` models received, as soon as every
   peer of ``_expected_senders()`` has answered or when the timer fires;
4. emit ``RoundCompleted(r)`` and start round ``r + 1``.

Messages of older rounds are dropped (and counted); messages up to ``max_lead`` rounds
ahead are kept for later, because a fast neighbour may legitimately be one round ahead.
A message further ahead means this peer fell behind (it restarted from a checkpoint, or
was cut off): with ``catch_up`` it jumps to that round instead of staying stale forever.
Only neighbours vouch for a newer round, and the jump waits until ``catch_up_quorum`` of
them (at most all of them) are that far ahead: it goes to the highest round that many
have reached. With a quorum of 2, one hostile identity cannot drag a peer ahead -- past
its honest neighbours, or past its last round -- with one validly signed message.
How far a remote peer may push us ahead is also bounded by the node's round window (wire guard).

Rounds that end by the timer keep their phase: a peer that started more than a round
timeout after its neighbours would stay a round behind them for good, its models always
arriving stale, if a silent neighbour (crashed unnoticed, its models lost) made every
round time out. So a round also ends as soon as a neighbour is already in a later round
while the only expected peers still missing are ones that were missing when the last
round ended as well: the peer follows the others instead of waiting out the timer for
neighbours that are silent anyway (``rounds_realigned``). A neighbour that answered last
round is still waited for, so a slow honest neighbour is not cut off.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar, TypedDict

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
from p2pfl.protocols.contract import MessageSpec, Role

#: ``(stack (n, d), weights (n,) or None, own row index) -> aggregated vector (d,)``
AggregateFn = Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]

class RoundSettings(TypedDict, total=False):
    """Keyword settings every round protocol passes through to this base unchanged.

    Subclasses take them as ``**settings: Unpack[RoundSettings]`` (typed, checked) instead
    of repeating each one in their own signature.
    """

    local_steps: int
    aggregate: AggregateFn | None
    max_lead: int
    catch_up: bool
    catch_up_quorum: int | None
    seed: int


MODEL = "model"
#: distinct neighbours that must be far ahead before a peer jumps to their round: one
#: hostile identity alone cannot drag a peer ahead, in the simulator as on a node
DEFAULT_CATCH_UP_QUORUM = 2
ROUND_TIMER = "round"
#: no peers (shared: most rounds miss nobody)
_NONE: frozenset[str] = frozenset()


def weighted_mean(stack: torch.Tensor, weights: torch.Tensor | None, own: int = 0) -> torch.Tensor:
    """Default aggregation: the (weighted) mean of the rows of ``stack``."""
    if weights is None:
        return stack.mean(dim=0)
    return weights.to(stack.dtype) @ stack


class SynchronousRoundProtocol(Protocol):
    """Base of protocols whose peers move through numbered rounds together."""

    #: a round's trained model, from a neighbour (a full model, float32, bounded)
    messages: ClassVar[Mapping[str, MessageSpec]] = {
        MODEL: MessageSpec(sender=Role.NEIGHBOUR, tensor=True),
    }

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        local_steps: int = 1,
        round_timeout: float = 10.0,
        aggregate: AggregateFn | None = None,
        max_lead: int = 2,
        catch_up: bool = True,
        catch_up_quorum: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(peer_id, params, neighbours, local_steps=local_steps, seed=seed)
        if round_timeout <= 0:
            raise ValueError(f"round_timeout must be > 0, got {round_timeout}")
        if catch_up_quorum is None:
            catch_up_quorum = DEFAULT_CATCH_UP_QUORUM
        if catch_up_quorum < 1:
            raise ValueError(f"catch_up_quorum must be >= 1, got {catch_up_quorum}")
        self.catch_up_quorum = catch_up_quorum
        #: neighbours seen beyond ``max_lead``: their latest such round and model
        self.ahead: dict[PeerId, tuple[int, torch.Tensor]] = {}
        self.round_timeout = round_timeout
        self.aggregate = aggregate
        self.max_lead = max_lead
        self.catch_up = catch_up
        self.phase = "idle"  # idle -> training -> collecting -> (aggregate) -> training ...
        self.trained: torch.Tensor | None = None
        self.inbox: dict[int, dict[PeerId, torch.Tensor]] = {}
        self.dropped_stale = 0
        self.dropped_ahead = 0
        #: expected senders whose model had not come when the last round ended
        self.missed: AbstractSet[PeerId] = _NONE

    # -- hooks -----------------------------------------------------------------------
    @abstractmethod
    def _recipients(self) -> list[PeerId]:
        """Peers that get this round's trained model."""

    @abstractmethod
    def _expected_senders(self) -> set[PeerId] | None:
        """Peers whose model ends the wait early; ``None``: wait for the timer."""

    @abstractmethod
    def _accepts_sender(self, sender: PeerId) -> bool:
        """Whether a model from ``sender`` may enter the aggregation."""

    @abstractmethod
    def _mixing_weights(self, senders: list[PeerId]) -> torch.Tensor | None:
        """Weights of ``[self] + senders`` for the mean (``None``: uniform)."""

    # -- event handling ----------------------------------------------------------------
    def handle(self, event: Event) -> list[Effect]:
        if type(event) is MessageReceived:  # most events: skip the isinstance chain
            return self._on_message(event)
        if isinstance(event, Start):
            return self._start_round()
        if isinstance(event, TrainingDone):
            return self._on_trained(event)
        if isinstance(event, MessageReceived):
            return self._on_message(event)
        if isinstance(event, TimerFired) and event.name == ROUND_TIMER:
            if self.phase == "collecting":
                return self._finish_round(event.now, timed_out=True)
            return []
        return []

    def _model_meta(self) -> dict[str, Any]:
        """The meta fields a trained model carries to the neighbours (none by default)."""
        return {}

    def _start_round(self) -> list[Effect]:
        self.phase = "training"
        self.trained = None
        return [self._train(self.params)]

    def _on_trained(self, event: TrainingDone) -> list[Effect]:
        if self.phase != "training" or event.ticket != self._next_ticket:
            return []  # an answer to a training we no longer wait for
        self.trained = event.params
        self.phase = "collecting"
        message = Message(MODEL, self.round, event.params, self._model_meta())
        effects: list[Effect] = [Send(peer, message) for peer in self._recipients()]
        effects.append(SetTimer(ROUND_TIMER, event.now + self.round_timeout))
        effects.append(Record("train_loss", event.loss))
        effects.extend(self._maybe_finish(event.now))
        return effects

    def _on_message(self, event: MessageReceived) -> list[Effect]:
        message = event.message
        if message.kind != MODEL or message.params is None:
            return []
        if not self._accepts_sender(event.sender):
            return [Record("dropped.not_neighbour", 1.0)]
        if message.round < self.round:
            self.dropped_stale += 1
            return [Record("dropped.stale_round", 1.0)]
        if message.round > self.round + self.max_lead:
            if not self.catch_up or event.sender not in self.neighbours:
                self.dropped_ahead += 1
                return [Record("dropped.future_round", 1.0)]
            return self._vouch(event.sender, message.round, message.params)
        self.inbox.setdefault(message.round, {})[event.sender] = message.params
        return self._maybe_finish(event.now)

    def _vouch(self, sender: PeerId, round_: int, params: torch.Tensor) -> list[Effect]:
        """A neighbour is far ahead: jump once enough distinct neighbours are.

        Each neighbour counts once, with its latest far-ahead round (kept with its model,
        so memory stays one model per neighbour). With ``q = min(catch_up_quorum,
        len(neighbours))`` of them ahead, the peer jumps to the ``q``-th highest of their
        rounds: a round that ``q`` neighbours have reached.
        """
        horizon = self.round + self.max_lead
        self.ahead[sender] = (round_, params)
        self.ahead = {p: seen for p, seen in self.ahead.items() if seen[0] > horizon}
        quorum = min(self.catch_up_quorum, len(self.neighbours))
        if len(self.ahead) < quorum:
            return [Record("catch_up.pending", 1.0)]
        target = sorted((r for r, _ in self.ahead.values()), reverse=True)[quorum - 1]
        models = {p: m for p, (r, m) in self.ahead.items() if r == target}
        self.ahead.clear()
        return self._jump_to(target, models)

    def _jump_to(self, round_: int, models: dict[PeerId, torch.Tensor]) -> list[Effect]:
        """Abandon the current round for a newer one the others are already in.

        A peer that restarts from an old checkpoint, or was cut off for a while, would
        otherwise only ever send stale models. It keeps its own model and joins the
        others' round; the work of the abandoned round is dropped.
        """
        self.round = round_
        for stale in [r for r in self.inbox if r < round_]:
            del self.inbox[stale]
        self.inbox.setdefault(round_, {}).update(models)
        effects: list[Effect] = [CancelTimer(ROUND_TIMER), Record("round_jumps", 1.0)]
        effects.extend(self._start_round())
        return effects

    def _maybe_finish(self, now: float) -> list[Effect]:
        if self.phase != "collecting":
            return []
        expected = self._expected_senders()
        if expected is None:
            return []
        received = self.inbox.get(self.round, {})
        if expected.issubset(received):
            return self._finish_round(now, timed_out=False)
        if self.missed and self._others_moved_on(expected - received.keys()):
            return [Record("rounds_realigned", 1.0), *self._finish_round(now, timed_out=False)]
        return []

    def _others_moved_on(self, missing: set[PeerId]) -> bool:
        """Whether to stop waiting for ``missing``: all of them were silent last round
        too, and a neighbour's model of a later round is here (it has moved on)."""
        if not missing.issubset(self.missed):
            return False
        return any(round_ > self.round and models for round_, models in self.inbox.items())

    def _finish_round(self, now: float, *, timed_out: bool) -> list[Effect]:
        assert self.trained is not None
        received = self.inbox.pop(self.round, {})
        senders = sorted(received)
        expected = self._expected_senders()
        if expected is None or expected.issubset(received):
            self.missed = _NONE  # the usual round: shared, not a new set per peer
        else:
            self.missed = set(expected) - received.keys()
        unmixed = False
        if senders:
            stack = torch.stack([self.trained, *(received[p] for p in senders)])
            weights = self._mixing_weights(senders)
            combine = self.aggregate or weighted_mean
            try:
                self.params = combine(stack, weights, 0)
            except TooFewVectors:
                # A robust rule with a fixed f, and too few models this round (neighbours
                # missing) to tolerate f Byzantine ones: any mix could be the attackers'.
                # The own model is the one that is known to be honest.
                self.params, unmixed = self.trained, True
        else:
            self.params = self.trained
        finished = self.round
        self.round += 1
        for stale in [r for r in self.inbox if r < self.round]:
            del self.inbox[stale]
        effects: list[Effect] = [
            CancelTimer(ROUND_TIMER),
            Record("received_models", float(len(senders))),
            RoundCompleted(finished),
        ]
        if timed_out:
            effects.append(Record("round_timeouts", 1.0))
        if unmixed:
            effects.append(Record("too_few_to_aggregate", 1.0))
        effects.extend(self._start_round())
        return effects

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # A checkpoint is taken between rounds: the round restarts from training on resume.
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.phase = "idle"
        self.trained = None
        self.inbox.clear()
        self.ahead.clear()
        self.missed = _NONE
