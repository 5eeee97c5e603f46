"""The sans-I/O contract every learning protocol follows.

A protocol is a plain state machine owned by one peer. A driver (the asyncio node or the
simulator) feeds it *events* and carries out the *effects* it returns. The protocol never
reads a clock, never sleeps, never touches a socket and never trains a model itself: it
asks the driver to train (``Train``) and is told when that is done (``TrainingDone``).
That last point is what lets the simulator batch the training of thousands of peers.

Time is a float the driver passes in as ``now`` (seconds: virtual in the simulator, wall
clock on a real node). Parameters are flat 1-D float32 tensors (see ``p2pfl.model``).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

# the message types live in a leaf module that p2pfl.wire also uses (wire never imports
# protocols); re-exported here, where protocol code has always found them
from p2pfl.messages import ENVELOPE_OVERHEAD, Message, PeerId, _meta_size  # noqa: F401
from p2pfl.protocols.contract import (
    DEFAULT_MAX_ABS,
    DEFAULT_ROUND_LEAD,
    MessageSpec,
    Role,
    check_message,
)

#: rounds behind ours a received message may be before a node's guard refuses it as stale
#: (unless the protocol declares otherwise: ``Protocol.max_round_lag``)
DEFAULT_ROUND_LAG = 4

# ---------------------------------------------------------------- events (driver -> protocol)
#
# Events and effects are values: nothing changes one once it is made. They are not
# ``frozen`` dataclasses because frozen construction costs three times as much (a call to
# ``object.__setattr__`` per field) and a simulator makes about seventeen of them per peer
# per round: at 1,000 peers that alone was ~5% of a D-PSGD simulation's time.


@dataclass(slots=True)
class Start:
    """The peer starts (or restarts from a checkpoint) at ``now``."""

    now: float


@dataclass(slots=True)
class MessageReceived:
    now: float
    sender: PeerId
    message: Message


@dataclass(slots=True)
class TimerFired:
    now: float
    name: str


@dataclass(slots=True)
class TrainingDone:
    """The driver finished the ``Train`` effect with the same ``ticket``."""

    now: float
    ticket: int
    params: torch.Tensor
    loss: float = float("nan")


@dataclass(slots=True)
class LossesEvaluated:
    """The driver finished the ``EvaluateLosses`` effect with the same ``ticket``:
    ``losses[k]`` is the loss of its ``params[k]`` on the one mini-batch it drew (NaN
    for a peer that holds no data). Zeroth-order protocols (n6) learn from these."""

    now: float
    ticket: int
    losses: list[float]


@dataclass(slots=True)
class PeerUp:
    """A peer became reachable (joined, reconnected)."""

    now: float
    peer: PeerId


@dataclass(slots=True)
class PeerDown:
    """A peer is known to be unreachable (crash detected, left, link lost)."""

    now: float
    peer: PeerId


@dataclass(slots=True)
class SendFailed:
    """The driver could not deliver a message (peer unreachable)."""

    now: float
    to: PeerId
    message: Message


Event = (
    Start
    | MessageReceived
    | TimerFired
    | TrainingDone
    | LossesEvaluated
    | PeerUp
    | PeerDown
    | SendFailed
)

# ---------------------------------------------------------------- effects (protocol -> driver)


@dataclass(slots=True)
class Send:
    to: PeerId
    message: Message


@dataclass(slots=True)
class Train:
    """Run ``steps`` local SGD steps starting from ``params``; answer with ``TrainingDone``."""

    ticket: int
    params: torch.Tensor
    steps: int


@dataclass(slots=True)
class EvaluateLosses:
    """Draw one mini-batch of this peer's data (its next, as ``Train`` would) and compute
    the mean loss of each of ``params`` on that same batch; answer with
    ``LossesEvaluated``. No gradient: what a zeroth-order protocol (SPSA) needs (n6)."""

    ticket: int
    params: list[torch.Tensor]


@dataclass(slots=True)
class SetTimer:
    """Fire ``TimerFired(name)`` at absolute time ``at``. Setting a name again replaces it."""

    name: str
    at: float


@dataclass(slots=True)
class CancelTimer:
    name: str


@dataclass(slots=True)
class Record:
    """A metric the driver logs: ``name`` -> ``value`` for this peer at this time."""

    name: str
    value: float


@dataclass(slots=True)
class RoundCompleted:
    """The peer finished round ``round`` with the model ``params``, or, when ``None``,
    with its current model (``Protocol.params``).

    A protocol that may move past a round within the same event gives ``params``: a
    MoDeST peer that trains round r and aggregates round r + 1 is done with both when its
    own trained model is the last one its aggregation waited for, and by the time a
    driver reads ``Protocol.params`` it holds the aggregate, not round r's model (the
    drivers then evaluated, and the equivalence test compared, the wrong model for r).
    """

    round: int
    #: not compared: two completions of a round are equal whatever tensor they hold
    params: torch.Tensor | None = field(default=None, compare=False)

    def model(self, protocol: Protocol) -> torch.Tensor:
        """The model the round ended with."""
        return protocol.params if self.params is None else self.params


Effect = Send | Train | EvaluateLosses | SetTimer | CancelTimer | Record | RoundCompleted


class Protocol(ABC):
    """Base class of the sans-I/O learning protocols.

    Subclasses implement ``handle``. They hold their own model (``params``), their round,
    and a private ``random.Random`` seeded by the driver, so a run is reproducible.

    Everything a driver needs to know of a protocol is declared here, so that no driver
    branches on a protocol's name or probes its attributes: the class attributes below
    (read from the class the configuration names, before any peer is built:
    ``p2pfl.protocols.registry.protocol_class``), the message contract (``messages``,
    ``screen``, ``message_dim``, ``message_params``), and the lifecycle hooks
    (``settled``, ``leave``, ``withhold``, ``report``), whose defaults suit a protocol
    that keeps no population and sends nothing on its own when it stops.
    """

    #: name used in scenario files and on the wire
    name: str = "base"
    #: what this protocol accepts from the network, per message kind (see
    #: ``p2pfl.protocols.contract``); a kind not declared here is refused
    messages: ClassVar[Mapping[str, MessageSpec]] = {}
    #: how far ahead of ``round`` a received round number may be (tags and fields)
    max_round_lead: int = DEFAULT_ROUND_LEAD
    #: bound on the magnitude of every entry of a received tensor
    max_abs: float = DEFAULT_MAX_ABS
    #: how a simulator measures a run's progress: "min", the round every live peer has
    #: reached (rounds that advance together), or "max", the furthest peer's (a system
    #: that moves on without waiting for everyone, as MoDeST's samples do)
    progress: ClassVar[Literal["min", "max"]] = "min"
    #: rounds behind ours a received message may be before a node's guard refuses it;
    #: ``None``: no such window (the protocol answers stale messages itself, as a MoDeST
    #: peer must: one not sampled for a while is legitimately many rounds behind)
    max_round_lag: ClassVar[int | None] = DEFAULT_ROUND_LAG
    #: whether peers only ever mix with their graph neighbours, so that over a
    #: disconnected graph they can never agree (a simulator refuses such a graph)
    needs_connected_graph: ClassVar[bool] = False

    #: the protocol config key that bounds ``most_models_aggregated`` (``None``: a
    #: peer's neighbours do), named in the message of a rule it can never feed
    aggregation_bound: ClassVar[str | None] = None

    @classmethod
    def most_models_aggregated(cls, config: Any, degree: int) -> int | None:
        """The most models one aggregation of this protocol combines, its own included,
        at a peer with ``degree`` neighbours under ``config`` (its protocol config);
        ``None``: not bounded by the configuration, or no configurable rule. Drivers check
        a robust rule's ``f`` against it before a run: a rule that so many models can
        never feed would keep the peer's own model every round (``too_few_to_aggregate``)."""
        return None

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        local_steps: int = 1,
        seed: int = 0,
    ) -> None:
        self.peer_id = peer_id
        self.params = params
        self.neighbours: list[PeerId] = sorted(neighbours)
        self._neighbour_lookup = frozenset(self.neighbours)
        self.local_steps = local_steps
        self.round = 0
        self._seed = seed
        self._model_size = params.numel()
        self._content_key: tuple[int, float] | None = None
        self.rng = random.Random(f"{seed}:{peer_id}")
        self._next_ticket = 0

    # -- the one entry point -------------------------------------------------------
    @abstractmethod
    def handle(self, event: Event) -> list[Effect]:
        """Consume one event and return the effects the driver must carry out."""

    def use_stream(self, label: str) -> None:
        """Seed the random stream from ``(seed, label)`` instead of ``(seed, peer id)``.

        A peer's id differs between the drivers (the simulator's ``p3``, a node's key),
        its index in the configuration does not: the assembly of a peer labels the stream
        by the index, so a node and its simulated twin draw the same random numbers.
        """
        self.rng = random.Random(f"{self._seed}:{label}")

    # -- the message contract ------------------------------------------------------
    #: ``screen(sender, message)``: the contract's verdict on a received message; ``None``:
    #: hand it to ``handle``. Drivers call it before ``handle(MessageReceived(...))`` and
    #: drop (and count) what it refuses, so ``handle`` only ever sees declared kinds,
    #: fields and tensors. The check itself (no wrapper call: a simulator screens every
    #: message every peer receives); a wrapper of a protocol overrides it to delegate.
    screen = check_message

    @property
    def message_dim(self) -> int:
        """Elements of the tensor a message of this protocol carries (the whole model).

        Asked for every message received: the model's size, taken once (it never changes).
        """
        return self._model_size

    @property
    def content_key(self) -> tuple[int, float]:
        """What a message's content verdict depends on at this receiver: the tensor's
        length and bound. Receivers with equal keys share one verdict per message."""
        key = self._content_key
        if key is None:
            key = self._content_key = (self.message_dim, self.max_abs)
        return key

    def message_params(self, full: torch.Tensor) -> torch.Tensor:
        """What travels for a full parameter vector: the vector itself, unless a protocol
        exchanges part of its model only (Bristle: the output layer)."""
        return full

    def message_spec(self, kind: str) -> MessageSpec | None:
        """The declared spec of message ``kind`` (``None``: not a kind this protocol takes)."""
        return self.messages.get(kind)

    def has_role(self, role: Role, sender: PeerId, message: Message) -> bool:
        """Whether ``sender`` may send ``message`` in ``role``; protocols with roles of
        their own (a view, samples, aggregators) extend this."""
        if role is Role.ANYONE:
            return sender != self.peer_id
        if role is Role.NEIGHBOUR:  # checked inline by the contract too: never redefine it
            return sender in self._neighbour_lookup
        raise NotImplementedError(f"{type(self).__name__} declares role {role} but cannot check it")

    # -- lifecycle ---------------------------------------------------------------
    @property
    def settled(self) -> bool:
        """Whether nothing this peer owes others is still waiting to go out; a driver about
        to stop (or ``leave``) waits for it, up to a timeout, so that nothing is lost."""
        return True

    def leave(self, now: float) -> list[Effect]:
        """Leave for good: the effects that tell the others (a protocol that tracks its
        population announces it); afterwards the peer takes no further part."""
        return []

    def withhold(self, peers: Iterable[PeerId]) -> None:
        """Before ``Start``: ``peers`` are not there yet and will join later (a driver that
        knows its late joiners in advance, the simulator, tells every peer). Protocols
        that learn their population keep them out of it until they announce themselves."""
        return None

    def report(self) -> dict[str, Any]:
        """Counters a driver shows in its status (e.g. what a Byzantine wrapper crafted)."""
        return {}

    # -- helpers for subclasses ----------------------------------------------------
    def _note_reachability(self, event: Event, unreachable: set[PeerId]) -> bool:
        """Keep ``unreachable`` up to date; say whether ``event`` was about reachability.

        A peer is unreachable after ``PeerDown`` or a failed send, and reachable again
        after ``PeerUp``.
        """
        if isinstance(event, PeerDown):
            unreachable.add(event.peer)
        elif isinstance(event, SendFailed):
            unreachable.add(event.to)
        elif isinstance(event, PeerUp):
            unreachable.discard(event.peer)
        else:
            return False
        return True

    def declare_samples(self, samples: int) -> None:
        """The number of training samples this peer says it holds, from now on.

        Only protocols that weight updates by sample counts (FedAvg) keep it; the others
        ignore it. A driver that hands a peer its data after the protocol is built (the
        simulator's Sybil identities) says so through this, never by probing attributes.
        """
        del samples  # not kept: this protocol does not weight by sample counts

    def _train(self, params: torch.Tensor, steps: int | None = None) -> Train:
        self._next_ticket += 1
        return Train(self._next_ticket, params, self.local_steps if steps is None else steps)

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this peer: model, round and protocol state.

        Subclasses extend it; values must be tensors or msgpack-able plain data.
        """
        return {
            "protocol": self.name,
            "peer_id": self.peer_id,
            "round": self.round,
            "params": self.params.clone(),
            "rng": self.rng.getstate(),
            "next_ticket": self._next_ticket,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("protocol") != self.name:
            raise ValueError(
                f"checkpoint is for protocol {state.get('protocol')!r}, not {self.name!r}"
            )
        self.round = int(state["round"])
        self.params = state["params"].clone()
        rng_state = state["rng"]
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self._next_ticket = int(state["next_ticket"])
