"""MoDeST (de Vos et al.): FL-like rounds without a server, by decentralized sampling.

Each round ``r`` has a *sample* of ``s`` peers that train and, among them, ``a``
*aggregators*. Nobody picks them: every peer derives them from its population view (the
candidates in SHA-256 order of ``(r, peer)``, see ``view.py``) and keeps the first ones
that answer a ping (``sampling.py``). One round, seen by the messages it moves:

1. trainers of round ``r-1`` send their model, tagged ``r``, to the aggregators of ``r``
   (kind ``"aggregate"``);
2. an aggregator of ``r`` collects until it has a quorum (``success_fraction * s``), or
   its timer fires with at least ``min_aggregation_count`` models, and averages them;
3. it sends the result, tagged ``r``, to the sample of ``r`` (kind ``"train"``);
4. a sampled peer trains the first round-``r`` model it gets for ``local_steps`` and goes
   back to step 1 with ``r+1``.

Bootstrapping: at ``Start`` every peer finds the aggregators of round 1 (pinging the first
candidates of round 1); those aggregators skip step 2 and send their own initial
parameters as the round-1 model. Peers should therefore start from the same initial
parameters (same seed), as in FL; otherwise the round-1 sample trains ``a`` different
models and round 2 averages them. A fresh peer whose pings show the system past round 1
started late: it joins (below) instead.

Progress, and what cancels what. ``self.round`` is the highest round tag seen (in a model
message, in a pong's ``at``) or produced. A tag ``R`` proves that stage ``R-1`` finished
somewhere, so all work whose output would be tagged below ``R`` is abandoned: collecting
for a round below ``R``, training whose result would be tagged below ``R``, sending to the
sample of a round below ``R``. ``done`` (the highest round known to be aggregated) ends
the delivery of trained models for that round: the aggregators no longer need them.

Liveness. No wait is without a timer: pings expire (the candidate is passed over and
suspected), aggregators time out, and every model delivery is rechecked after
``retry_interval`` (up to ``max_retries`` times): recipients that stopped answering are
replaced by the next candidates, which is how rounds go on when peers crash silently,
aggregators included. Suspected peers (ping timeout, ``SendFailed``, ``PeerDown``) are
skipped without a ping for ``suspect_rounds`` rounds, or until heard from again; they stay
in the view (they did not leave), so a recovered peer is sampled again.

The idle watchdog. A round can still be lost for good: its only aggregator crashes (or
leaves, its work done) after collecting but before sending. Every peer therefore checks,
every ``idle_timeout``, whether it saw any progress (a new round tag, a newly finished
round, a message about a round ahead of its own) and had nothing in flight. If not, it
*restarts*: it pings the candidates of round ``round + 1`` and, if it is one of that
round's first ``a`` responsive candidates (an aggregator: the others would refuse its
model), sends its current model as the aggregate of that round to its sample, like the
aggregators of round 1 do; otherwise it leaves the restart to them. The restart's pings
double as a probe: if the pongs vouch (see below) for that round or beyond, the system
was not stuck, just out of sight (a large population samples each peer rarely); the
restart is abandoned and the peer has learnt the current round. Only a stalled system
ever receives the model.

Joins and leaves. A late joiner (``joining=True``) announces itself to ``announce_fanout``
random known peers, which answer with their view. Announced joins are held back and
applied to a peer's view only after its next model send (so they do not reorder the
sample a round is in the middle of using) and travel, meanwhile, in that send's
``joins`` field. Leaves (``leave()``) are applied at once; they reach the likely samples
of the rounds at hand, and a peer that left answers a ping or a model with its leave, so
nobody waits out a timer for it. The view, the pending joins and the rules for merging
what others send are :class:`~.membership.Membership`'s (``self.membership``); the
announcements, their retries and the rejoin of a peer that others think has left are
this module's.

Signed view entries (``signer``, issue 8). Views are relayed, so an unsigned entry can be
rewritten by any relayer; with a :class:`~p2pfl.protocols.records.RecordSigner` every
entry about a peer travels with that peer's own signed record. How entries are taken,
signed or not, is ``membership.py``'s and ``signed.py``'s job; this module only asks.

A hostile peer (issue 12). The message contract (``messages`` and ``has_role``) refuses
what no honest peer sends; what it cannot tell, ``handle`` checks:

- Roles. ``train`` only from an aggregator of its round, ``aggregate`` only from a member
  of the sample that trained it (the round before), ``status``/``leave`` from members
  (a leave is about its sender only), ``view`` from members or a peer this peer
  announced its join to. "An aggregator" is one of the first ``a + role_slack`` live
  candidates of the round in this peer's view, where candidates found unresponsive and
  not heard from since do not count and the rest are scaled by the share of this peer's
  recent pings that were answered. The contract allows ``OUTER_RANKS`` times as deep (an
  aggregator sits far down the order after a crash, behind dead peers this peer never
  pinged); between the two, ``handle`` pings the live-looking candidates ahead once,
  holds the model, and takes or refuses it (``modest.trains_refused``) when they have
  answered or timed out. So no peer adopts a model from a peer it would not have chosen.
  A peer that is itself no aggregator of a round takes a lone model for it as its own
  aggregate only when it finds itself within the outer bound (``_may_aggregate``).
- Round claims. A round tag or an ``at``/``done`` field is a *claim* that the round
  exists. Each member's highest claim counts once towards ``catch_up_quorum`` (capped by
  the live population - 1); the highest round that many distinct members claim is
  *vouched* (``_confirmed``). Passive claims (pongs, statuses, views, pings) move this
  peer only as far as the vouched round; a model may be ``round_lead`` rounds beyond it,
  its sender's role being checked. One identity's word, repeated or not, moves nothing
  (``modest.claims_pending``). A model too far ahead (a train, or a trained model at its
  aggregator) is held and the likely trainers of the round before it are pinged (with this peer's own round, so a probe never spreads a
  forged one): their pongs vouch for a real round, and a peer that was not sampled for
  many rounds catches up within a round trip (``modest.catch_ups``).
- Membership. A message adds at most ``max_new_members`` new members to the view (or the
  pending joins), and a sender at most ``member_budget`` in all, besides itself; the
  answers to this peer's own join announcement are exempt (the joiner chose whom to
  ask). Refused entries are counted (``modest.entries_refused``).

What this does not cover: a hostile peer that *is* an aggregator of a round (one of the
first ``a`` responsive candidates) is trusted with that round's model, as MoDeST trusts
its aggregators; it can poison that round, or tag its model up to ``round_lead`` rounds
ahead. Robust aggregation (``aggregate``) covers hostile trainers, not aggregators.
Unsigned views (``signer=None``) let honest peers relay the few names a hostile one got
into their views: growth is bounded by ``member_budget`` per sender, not zero.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from p2pfl.aggregation import TooFewVectors
from p2pfl.protocols.base import (
    CancelTimer,
    Effect,
    Event,
    Message,
    MessageReceived,
    PeerDown,
    PeerId,
    PeerUp,
    Protocol,
    Record,
    RoundCompleted,
    Send,
    SendFailed,
    SetTimer,
    Start,
    TimerFired,
    TrainingDone,
)
from p2pfl.protocols.contract import (
    Bool,
    Bytes,
    Float,
    Int,
    MapOf,
    MessageSpec,
    PeerName,
    Role,
    RoundNumber,
    Tuple,
)
from p2pfl.protocols.modest.membership import (
    MAX_NEW_MEMBERS,
    MEMBER_BUDGET,
    Membership,
    Merged,
    PlainMembership,
)
from p2pfl.protocols.modest.sampling import SampleResolver
from p2pfl.protocols.modest.signed import Proven, SignedMembership
from p2pfl.protocols.modest.signed import entry_record as entry_record  # re-export (benchmarks)
from p2pfl.protocols.modest.view import PopulationView, derive_candidates

if TYPE_CHECKING:
    from p2pfl.protocols.records import RecordSigner

#: ``(stack (n, d), weights (n,) or None, own_index or -1) -> aggregated (d,)``
Aggregate = Callable[[Tensor, Tensor | None, int], Tensor]

# message kinds
PING = "ping"
PONG = "pong"
AGGREGATE = "aggregate"  # a trained model, to an aggregator of its round
TRAIN = "train"  # an aggregated model, to a member of its round's sample
STATUS = "status"  # "your model came too late": the round it is at, and done
JOIN = "join"
VIEW = "view"  # the answer to a join
LEAVE = "leave"

#: a view entry on the wire: ``[round, left, counter]``, signed: ``+ [record]``
WIRE_ENTRY = Tuple(
    (RoundNumber(), Bool(as_int=True), Int(lo=0, hi=(1 << 32) - 1), Bytes(max_len=4096)),
    optional=1,
)
#: a view (or the joins) on the wire; how many entries one message may carry is the
#: receiving protocol's ``max_view_entries``
WIRE_VIEW = MapOf(PeerName(), WIRE_ENTRY, max_len="max_view_entries")
_PROGRESS = {"at": RoundNumber(), "done": RoundNumber()}
_MODEL_FIELDS = {"view": WIRE_VIEW, "joins": WIRE_VIEW, "w": Float(lo=0.0)}

#: how far beyond the round vouched for by a quorum of members a model message's round may
#: be and still be acted on at one sender's word (the sender's role is checked too)
DEFAULT_LEAD = 2
#: distinct members that must claim a round before this peer takes it as reached
#: (capped by the live population - 1)
DEFAULT_CATCH_UP_QUORUM = 2
#: live candidates beyond the first ``a`` (aggregators) or ``s`` (sample) that may still
#: be taken for one. 0: exactly whom this peer would have chosen (candidates ahead that it
#: did not know to be down are pinged first). Views that differ by a join cost a model
#: now and then (a slower round); each slot of slack is a slot for a hostile peer
DEFAULT_ROLE_SLACK = 0
#: models held back at most, waiting for their round to be vouched for
MAX_HELD = 8
#: pings whose outcome estimates the share of candidates that answer (see ``_scaled``)
PING_MEMORY = 32
#: the contract's bound on a role, in multiples of the ranks that hold it (see has_role):
#: after a crash of 80% of the peers, an honest aggregator sits ~5x deeper than it would
OUTER_RANKS = 8


class Timer(Enum):
    """The kinds of timers this protocol sets, each handled by one method (see
    ``ModestProtocol._on_timer_kind``). The value is the timer name's prefix; a keyed
    kind (several at once) appends its payload: ``modest.ping:<round>:<wave>``."""

    PING = "modest.ping"  # payload (round, wave): a wave of pings expires
    AGGREGATE = "modest.aggregate"  # payload (round,): an aggregator's collection times out
    WATCH = "modest.watch"  # payload (kind, round): recheck a delivery's recipients
    IDLE = "modest.idle"  # the idle watchdog
    VERIFY = "modest.verify"  # pings checking a model's sender expire
    JOIN = "modest.join"  # re-announce an unanswered join

    def name_for(self, payload: tuple[Any, ...]) -> str:
        """The timer's name as the driver sees it: unique per pending timer."""
        if self in _KEYED_TIMERS:
            return ":".join([self.value, *map(str, payload)])
        return self.value


_KEYED_TIMERS = frozenset({Timer.PING, Timer.WATCH})


def weighted_mean(stack: Tensor, weights: Tensor | None, own_index: int) -> Tensor:
    """Default aggregation: mean of the rows, weighted by sample counts when all are known."""
    del own_index  # the plain mean treats the aggregator's own model like any other
    if weights is None or float(weights.sum()) <= 0.0:
        return stack.mean(dim=0)
    w = weights.to(dtype=stack.dtype)
    return (w / w.sum()) @ stack


@dataclass(slots=True)
class _Aggregation:
    """Models collected by an aggregator for one round: sender -> (params, weight)."""

    round: int
    models: dict[PeerId, tuple[Tensor, float | None]] = field(default_factory=dict)
    retries: int = 0


@dataclass(slots=True)
class _Delivery:
    """A model to send to the first ``target`` responsive candidates of ``round``."""

    kind: str
    round: int
    target: int
    params: Tensor
    sent: set[PeerId] = field(default_factory=set)
    retries: int = 0


def _int(value: Any, default: int = 0) -> int:
    """A non-negative int from untrusted meta, else ``default``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


class ModestProtocol(Protocol):
    """MoDeST for one peer: sample derivation, pings, aggregation quorum, churn.

    Parameters (besides the base ``peer_id, params, neighbours, local_steps, seed``):

    - ``population``: the peers known at start (the whole population, or for a joiner its
      bootstrap peers); ``None`` means ``neighbours``. ``neighbours`` is otherwise unused:
      MoDeST samples from the whole view, not from a graph.
    - ``sample_size`` (s), ``num_aggregators`` (a <= s).
    - ``success_fraction``: the quorum is ``ceil(success_fraction * s)`` models, or of the
      live population when fewer than ``s`` are left (members not marked left and not
      suspected): a population that shrank below ``s`` would never reach the full quorum.
    - ``ping_timeout``: after it, an unanswered candidate is passed over.
    - ``aggregation_timeout``: how long an aggregator waits for its quorum; it then goes on
      with at least ``min_aggregation_count`` models, or waits again (``max_retries``
      times) and finally abandons the round.
    - ``aggregate``: ``(stack, weights, own_index) -> vector``; weights are the senders'
      ``num_samples`` when every sender gave one, else ``None``; ``own_index`` is the row of
      the aggregator's own model. When the aggregator sent none (the usual case), its
      current model is appended as a reference row of weight 0 and ``own_index`` points
      to it (see ``_stack``). Default: ``weighted_mean``.
    - ``num_samples``: size of the local data set, sent with trained models as weight.
    - ``joining``: this peer joins a running population (announces itself, no bootstrap).
    - ``announce_fanout``: how many random peers hear a join or leave announcement.
    - ``retry_interval`` (default ``aggregation_timeout``) and ``max_retries``: rechecks of
      a model's recipients, re-announcements of a join, and aggregation extensions.
    - ``suspect_rounds``: how long an unresponsive peer is skipped without a ping.
    - ``idle_timeout``: period of the idle watchdog (default ``4 * aggregation_timeout``).
    - ``signer``: a :class:`~p2pfl.protocols.records.RecordSigner` to sign this peer's own
      view entry and check relayed ones (a :class:`~.signed.SignedMembership`, see
      ``signed.py``); ``None``: views travel unsigned (a :class:`~.membership.PlainMembership`).
    - ``round_lead``, ``catch_up_quorum``: how far beyond the vouched round a model may
      be, and how many distinct members vouch for a round (see "A hostile peer").
    - ``role_slack``: live candidates beyond the first ``a`` (or ``s``) still taken for
      an aggregator (or a trainer).
    - ``max_new_members``, ``member_budget``: new view members per message and per sender.

    ``params`` is always the latest model this peer received or produced (the model it was
    sent to train, its trained model, or its aggregate), so every peer can be evaluated,
    sampled or not. ``round`` is the highest round tag it has seen or produced.
    ``RoundCompleted(r)`` is emitted once per round, when the peer first finishes an
    aggregation or a training of ``r``. The driver calls ``leave(now)`` to make it leave.

    ``membership`` holds the population view (``view``) and the pending joins and decides
    what is taken from others' views; this class keeps the rounds: sampling, aggregation,
    deliveries, round claims, the watchdog. Timers are dispatched by their :class:`Timer`
    kind (``_on_timer_kind``).
    """

    name = "modest"
    #: the system's progress is its furthest round: samples move on without everyone
    progress: ClassVar[Literal["min", "max"]] = "max"
    #: no round window in a node's guard: a peer not sampled for a while is legitimately
    #: many rounds behind, and a joiner starts at round 0; stale messages are answered here
    max_round_lag: ClassVar[int | None] = None
    messages: ClassVar[Mapping[str, MessageSpec]] = {
        PING: MessageSpec(sender=Role.ANYONE),
        PONG: MessageSpec(sender=Role.ANYONE, fields=_PROGRESS),
        STATUS: MessageSpec(sender=Role.MEMBER, fields=_PROGRESS),
        # an aggregated model: only from a plausible aggregator of its round (see has_role)
        TRAIN: MessageSpec(sender=Role.AGGREGATOR, tensor=True, fields=_MODEL_FIELDS),
        # a trained model: only from a plausible member of the sample that trained it
        AGGREGATE: MessageSpec(sender=Role.SAMPLED, tensor=True, fields=_MODEL_FIELDS),
        JOIN: MessageSpec(
            sender=Role.ANYONE, fields={"entry": WIRE_ENTRY}, required=frozenset({"entry"})
        ),
        # a member, or a peer this peer announced its join to (see has_role)
        VIEW: MessageSpec(sender=Role.MEMBER, fields={"view": WIRE_VIEW, **_PROGRESS}),
        # a leave is always about its sender: a member can only announce its own
        LEAVE: MessageSpec(
            sender=Role.MEMBER, fields={"entry": WIRE_ENTRY}, required=frozenset({"entry"})
        ),
    }
    #: entries one received view (or set of joins) may carry
    max_view_entries: int = 1 << 16

    aggregation_bound: ClassVar[str | None] = "sample_size"

    @classmethod
    def most_models_aggregated(cls, config: Any, degree: int) -> int | None:
        return int(config.sample_size) + 1  # a round's sample, and the aggregator's own

    def __init__(
        self,
        peer_id: PeerId,
        params: Tensor,
        neighbours: list[PeerId],
        *,
        population: list[PeerId] | None = None,
        sample_size: int = 10,
        num_aggregators: int = 1,
        success_fraction: float = 1.0,
        ping_timeout: float = 1.0,
        aggregation_timeout: float = 10.0,
        min_aggregation_count: int = 1,
        local_steps: int = 1,
        seed: int = 0,
        aggregate: Aggregate | None = None,
        num_samples: int | None = None,
        joining: bool = False,
        announce_fanout: int = 3,
        retry_interval: float | None = None,
        max_retries: int = 3,
        suspect_rounds: int = 10,
        idle_timeout: float | None = None,
        signer: RecordSigner | None = None,
        round_lead: int = DEFAULT_LEAD,
        catch_up_quorum: int = DEFAULT_CATCH_UP_QUORUM,
        role_slack: int = DEFAULT_ROLE_SLACK,
        max_new_members: int = MAX_NEW_MEMBERS,
        member_budget: int = MEMBER_BUDGET,
    ) -> None:
        super().__init__(peer_id, params, neighbours, local_steps=local_steps, seed=seed)
        if round_lead < 1 or catch_up_quorum < 1 or role_slack < 0:
            raise ValueError("round_lead >= 1, catch_up_quorum >= 1, role_slack >= 0")
        if max_new_members < 0 or member_budget < max_new_members:
            raise ValueError("max_new_members >= 0 and member_budget >= max_new_members")
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        if not 1 <= num_aggregators <= sample_size:
            raise ValueError(
                f"num_aggregators must be in [1, sample_size={sample_size}], got {num_aggregators}"
            )
        if not 0.0 < success_fraction <= 1.0:
            raise ValueError(f"success_fraction must be in (0, 1], got {success_fraction}")
        if ping_timeout <= 0 or aggregation_timeout <= 0:
            raise ValueError("ping_timeout and aggregation_timeout must be > 0")
        if min_aggregation_count < 1:
            raise ValueError(f"min_aggregation_count must be >= 1, got {min_aggregation_count}")
        if retry_interval is not None and retry_interval <= 0:
            raise ValueError(f"retry_interval must be > 0, got {retry_interval}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be > 0, got {idle_timeout}")
        if max_retries < 0 or suspect_rounds < 1 or announce_fanout < 1:
            raise ValueError("max_retries >= 0, suspect_rounds >= 1, announce_fanout >= 1")
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.sample_size = sample_size
        self.num_aggregators = num_aggregators
        self.success_fraction = success_fraction
        self.quorum = max(1, math.ceil(success_fraction * sample_size - 1e-9))
        self.ping_timeout = ping_timeout
        self.aggregation_timeout = aggregation_timeout
        self.min_aggregation_count = min_aggregation_count
        self.aggregate: Aggregate = aggregate if aggregate is not None else weighted_mean
        self.num_samples = num_samples
        self.joining = joining
        self.announce_fanout = announce_fanout
        self.retry_interval = aggregation_timeout if retry_interval is None else retry_interval
        self.max_retries = max_retries
        self.suspect_rounds = suspect_rounds
        self.idle_timeout = 4 * aggregation_timeout if idle_timeout is None else idle_timeout
        self.signer = signer
        self.round_lead = round_lead
        self.catch_up_quorum = catch_up_quorum
        self.role_slack = role_slack
        #: the population view, the pending joins and what is taken from others' views;
        #: the one place where signing changes how this peer treats views
        members = population if population is not None else neighbours
        caps = {"max_new_members": max_new_members, "member_budget": member_budget}
        self.membership: Membership = (
            PlainMembership(peer_id, members, **caps)
            if signer is None
            else SignedMembership(peer_id, members, signer, **caps)
        )
        # durable state (checkpointed)
        self._suspects: dict[PeerId, int] = {}  # peer -> round it was suspected in
        self._done = 0  # highest round known to be aggregated (by anyone)
        self._agg_done = 0  # highest round this peer aggregated
        self._trained_round = 0  # highest round whose model this peer started training
        self._completed = 0  # highest round announced with RoundCompleted
        self._left = False
        self._join_confirmed = False
        # transient state (dropped on restore)
        self._resolvers: dict[int, SampleResolver] = {}
        self._deliveries: dict[tuple[str, int], _Delivery] = {}
        self._agg: _Aggregation | None = None
        self._training: tuple[int, int] | None = None  # (ticket, round)
        self._timers: dict[str, tuple[Timer, tuple[Any, ...]]] = {}  # name -> (kind, payload)
        self._on_timer_kind: dict[Timer, Callable[[float, tuple[Any, ...], list[Effect]], None]]
        self._on_timer_kind = {
            Timer.PING: self._on_ping_timeout,
            Timer.AGGREGATE: self._on_aggregation_timeout,
            Timer.WATCH: self._on_watch,
            Timer.IDLE: self._on_idle_check,
            Timer.VERIFY: self._on_verified,
            Timer.JOIN: self._on_join_timeout,
        }
        self._wave = 0
        self._bootstrapping = False
        self._join_attempts = 0
        self._active = False  # progress seen since the last idle check
        self._restart = 0  # the round of a restart in progress (0: none)
        # hostile-peer defences (see "A hostile peer" in the module docstring)
        self._confirmed = 0  # highest round vouched for by catch_up_quorum distinct members
        self._claims: dict[PeerId, int] = {}  # member -> highest round claimed, > _confirmed
        #: models held back, awaiting vouchers for their round or a check of their sender
        self._held: dict[tuple[PeerId, str], Message] = {}
        self._probed: set[int] = set()  # rounds of held trains already probed for
        self._silent: dict[PeerId, int] = {}  # unresponsive (since round), not heard from since
        #: whether this peer's latest pings were answered: the share of candidates alive
        self._ping_outcomes: deque[bool] = deque(maxlen=PING_MEMORY)
        self._verifying: set[PeerId] = set()  # candidates pinged to check a train's sender
        self._verified: set[tuple[str, int]] = set()  # (kind, round) checked by pings
        self._replay_due = False  # something changed that may free held trains
        self._announced_to: set[PeerId] = set()  # peers whose answer to our join is awaited
        self._orders: dict[int, tuple[int, list[PeerId]]] = {}  # round -> (view version, order)

    # ------------------------------------------------------------------ public API
    @property
    def view(self) -> PopulationView:
        """This peer's population view (owned by ``membership``)."""
        return self.membership.view

    @property
    def _proofs(self) -> dict[PeerId, Proven]:
        """The records proving the view's entries (signed mode; empty otherwise); kept
        for the benchmarks and node tests that inspect them."""
        members = self.membership
        return members.proofs if isinstance(members, SignedMembership) else {}

    def _view_wire(self) -> dict[str, Any]:
        """The view as sent (kept for the benchmarks and tests that build messages)."""
        return self.membership.view_wire()

    @property
    def done_round(self) -> int:
        """Highest round this peer knows to have been aggregated."""
        return self._done

    @property
    def aggregated_round(self) -> int:
        """Highest round this peer aggregated itself (0: none)."""
        return self._agg_done

    @property
    def aggregating_round(self) -> int | None:
        """The round this peer is collecting models for, if any."""
        return None if self._agg is None else self._agg.round

    @property
    def suspects(self) -> frozenset[PeerId]:
        """Peers currently skipped without a ping (unresponsive, not left)."""
        return frozenset(self._suspects)

    @property
    def has_left(self) -> bool:
        return self._left

    @property
    def settled(self) -> bool:
        """No model is waiting to go out: every delivery reached its first recipients.

        A driver about to stop (or leave) waits for this, so that an aggregate it just
        made is not lost with it.
        """
        return all(delivery.sent for delivery in self._deliveries.values())

    def has_role(self, role: Role, sender: PeerId, message: Message) -> bool:
        """MEMBER: in the view, not left (for a ``view``: also a peer we announced our join
        to); AGGREGATOR: a member among the first ``OUTER_RANKS * (a + role_slack)`` live
        candidates of the message's round (``handle`` then narrows it to ``a +
        role_slack``, pinging the candidates ahead to tell); SAMPLED: a member among the
        first ``OUTER_RANKS * (s + role_slack)`` of the round whose sample made the message
        (the previous one for a trained model). Honest samples reach deep down the order
        when candidates ahead timed out for their resolver but not (yet) for this peer."""
        if role is Role.MEMBER:
            if message.kind == VIEW and sender in self._announced_to:
                return True
            return self._is_member(sender)
        if role is Role.AGGREGATOR:
            return self._plausible(sender, message.round, OUTER_RANKS * self._ranks(AGGREGATE))
        if role is Role.SAMPLED:
            round_ = message.round - 1 if message.kind == AGGREGATE else message.round
            return self._plausible(sender, round_, OUTER_RANKS * self._ranks(TRAIN))
        return super().has_role(role, sender, message)

    def _ranks(self, kind: str) -> int:
        """Live candidates that may hold a role: aggregators (who receive ``aggregate``)
        or the sample (who receive ``train``), plus ``role_slack`` for views that differ."""
        first = self.num_aggregators if kind == AGGREGATE else self.sample_size
        return first + self.role_slack

    def _is_member(self, peer: PeerId) -> bool:
        entry = self.view.get(peer)
        return entry is not None and not entry.left and peer != self.peer_id

    def _plausible(self, sender: PeerId, round_: int, ranks: int) -> bool:
        """Whether member ``sender`` is among the first ``ranks`` live candidates of
        ``round_`` (see ``_live_ahead``)."""
        return round_ >= 0 and self._is_member(sender) and self._within(sender, round_, ranks)

    def _within(self, peer: PeerId, round_: int, ranks: int) -> bool:
        ahead = self._live_ahead(peer, round_, ranks)
        return ahead is not None and len(ahead) < self._scaled(ranks)

    def _scaled(self, ranks: int) -> int:
        """``ranks`` over the share of this peer's recent pings that were answered: after a
        mass crash the survivors sit far down every order, among dead peers this peer has
        not pinged yet."""
        outcomes = self._ping_outcomes
        answered = sum(outcomes) / len(outcomes) if outcomes else 1.0
        return math.ceil(ranks / max(answered, 0.1))

    def _live_ahead(self, peer: PeerId, round_: int, ranks: int) -> list[PeerId] | None:
        """Candidates of ``round_`` ahead of ``peer`` not found unresponsive, at most
        ``_scaled(ranks)`` of them (enough to tell ``peer`` is not within ``ranks``);
        ``None`` when ``peer`` is no candidate at all."""
        limit = self._scaled(ranks)
        ahead: list[PeerId] = []
        silent, suspects = self._silent, self._suspects
        for candidate in self._candidates(round_):
            if candidate == peer:
                return ahead
            if candidate not in silent and candidate not in suspects:
                ahead.append(candidate)
                if len(ahead) >= limit:
                    return ahead
        return None

    def _candidates(self, round_: int) -> list[PeerId]:
        """``derive_candidates(view, round_)``, cached while the membership is unchanged."""
        version = self.view.version
        cached = self._orders.get(round_)
        if cached is not None and cached[0] == version:
            return cached[1]
        order = derive_candidates(self.view, round_)
        if len(self._orders) >= 16:
            del self._orders[next(iter(self._orders))]
        self._orders[round_] = (version, order)
        return order

    def handle(self, event: Event) -> list[Effect]:
        out: list[Effect] = []
        if self._left:
            return self._answer_as_left(event)
        match event:
            case Start(now):
                self._on_start(now, out)
            case MessageReceived(now, sender, message):
                self.membership.begin_message()
                self._on_message(now, sender, message, out)
            case TimerFired(now, name):
                self._on_timer(now, name, out)
            case TrainingDone(now, ticket, params, _loss):
                self._on_trained(now, ticket, params, out)
            case PeerUp(_now, peer):
                self._suspects.pop(peer, None)
                self._silent.pop(peer, None)
            case PeerDown(now, peer):
                self._on_unreachable(now, peer, out)
            case SendFailed(now, to, _message):
                self._on_unreachable(now, to, out)
        if self._held and self._replay_due and not self._left:
            self._replay_held(getattr(event, "now", 0.0), out)
        bad, refused = self.membership.take_counts()
        if bad:
            out.append(Record("modest.bad_entry", float(bad)))
        if refused:
            out.append(Record("modest.entries_refused", float(refused)))
        return out

    def _answer_as_left(self, event: Event) -> list[Effect]:
        """A peer that left answers whoever still counts on it with its leave announcement.

        A leave reaches ``announce_fanout`` random peers only; the others still ping this
        peer as a candidate, or send it their model as to an aggregator. Unanswered, each
        waited out its ping timeout (or its liveness checks) for a peer that was gone: at
        the end of a node run with one aggregator, the nodes still delivering their last
        model stalled ~15 s in 29 runs of 40. Told, the sender passes over this peer at once
        (``_on_leave``) and its model goes to the next candidate. Only to what asks for an
        answer (pings, models), one reply per message, as a pong would be.
        """
        if type(event) is not MessageReceived or event.sender == self.peer_id:
            return []
        if event.message.kind not in (PING, AGGREGATE, TRAIN):
            return []
        notice = Message(LEAVE, self.round, None, {"entry": self.membership.own_wire()})
        return [Send(event.sender, notice), Record("modest.left_answered", 1.0)]

    def withhold(self, peers: Iterable[PeerId]) -> None:
        """Before ``Start``: ``peers`` are not there yet and will join later.

        They are dropped from the initial view, so nobody samples them before they
        announce themselves. If this peer is one of them, it joins (``joining``: announces
        itself to the peers it knows) instead of bootstrapping round 1. Drivers that know
        their late joiners in advance (the simulator) call this on every peer.
        """
        absent = set(peers) - {self.peer_id}
        if self.peer_id in set(peers):
            self.joining = True
        self.membership.withhold(absent)

    def leave(self, now: float) -> list[Effect]:
        """Leave the population for good: announce it and stop taking part.

        The contract has no "leave" event, so a driver calls this directly. Afterwards
        ``handle`` takes part in nothing: it only answers a ping or a model with the leave
        announcement (``_answer_as_left``), so that nobody waits for this peer.
        """
        out: list[Effect] = []
        if self._left:
            return out
        wire = self.membership.leave()
        notice = Message(LEAVE, self.round, None, {"entry": wire})
        out.extend(Send(peer, notice) for peer in self._leave_recipients())
        for name in list(self._timers):
            self._cancel(name, out)
        self._resolvers.clear()
        self._deliveries.clear()
        self._agg = None
        self._training = None
        self._left = True
        return out

    def _leave_recipients(self) -> list[PeerId]:
        """Who hears this peer's leave: ``announce_fanout`` random peers (the leave spreads
        from them with their views), and the likely samples of the round before this
        peer's and of its own, in this peer's view: they are the peers that ping it as a
        candidate or send it their model, and would wait out a timer for it (seen on
        nodes: the trainers of a run's last round waited ~15 s for an aggregator that had
        left, when its answer to their pings came too late or not at all). At most
        ``announce_fanout + 2 * sample_size`` peers, each told once."""
        told = self._random_peers(self.announce_fanout)
        for round_ in (self.round - 1, self.round) if self.round > 0 else ():
            likely = [
                p for p in self._candidates(round_) if p != self.peer_id and p not in self._suspects
            ]
            told.extend(likely[: self.sample_size])
        return list(dict.fromkeys(told))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        members = self.membership.state_dict()
        state.update(
            view=members["view"],
            pending_joins=members["pending_joins"],
            suspects=dict(self._suspects),
            done=self._done,
            agg_done=self._agg_done,
            trained_round=self._trained_round,
            completed=self._completed,
            confirmed=self._confirmed,
            left=self._left,
            joining=self.joining,
            join_confirmed=self._join_confirmed,
            proofs=members["proofs"],
            join_proofs=members["join_proofs"],
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint. Work in flight (pings, collections, training) is not
        saved: a restored peer waits for the next message of its round."""
        super().load_state_dict(state)
        self.membership.load_state_dict(state)
        self._suspects = {str(p): int(r) for p, r in state["suspects"].items()}
        self._done = int(state["done"])
        self._agg_done = int(state["agg_done"])
        self._trained_round = int(state["trained_round"])
        self._completed = int(state["completed"])
        self._confirmed = int(state.get("confirmed", self.round))
        self._left = bool(state["left"])
        self.joining = bool(state["joining"])
        self._join_confirmed = bool(state["join_confirmed"])
        self._resolvers.clear()
        self._deliveries.clear()
        self._agg = None
        self._training = None
        self._timers.clear()
        self._bootstrapping = False
        self._join_attempts = 0
        self._active = False  # progress seen since the last idle check
        self._restart = 0  # the round of a restart in progress (0: none)
        self._claims.clear()
        self._held.clear()
        self._probed.clear()
        self._silent.clear()
        self._ping_outcomes.clear()
        self._verifying.clear()
        self._verified.clear()
        self._replay_due = False
        self._announced_to.clear()
        self._orders.clear()

    # ------------------------------------------------------------------ events
    def _on_start(self, now: float, out: list[Effect]) -> None:
        self._active = True
        self._set_timer(Timer.IDLE, now + self.idle_timeout, (), out)
        if self.joining:
            if not self._join_confirmed:
                self._announce_join(now, out)
        elif self.round == 0 and self._trained_round == 0 and self._agg_done == 0:
            self._bootstrapping = True
            self._need(now, 1, self.num_aggregators, out)

    def _on_message(self, now: float, sender: PeerId, msg: Message, out: list[Effect]) -> None:
        if not isinstance(msg.round, int) or msg.round < 0 or not isinstance(msg.meta, dict):
            return
        if sender != self.peer_id:
            self._heard_from(sender, out)  # it just spoke: it is up
            if self.round < msg.round <= self._confirmed + self.round_lead:
                self._active = True  # someone works on a round ahead of ours
        match msg.kind:
            case "ping":
                # the pinger resolves round r: it knows that round r - 1 exists
                self._hear(sender, msg.round - 1, out)
                meta = {"at": self.round, "done": self._done}
                out.append(Send(sender, Message(PONG, msg.round, None, meta)))
            case "pong":
                self._on_pong(now, sender, msg, out)
            case "status":
                self._learn_progress(sender, msg.meta, out)
            case "train":
                self._on_train_msg(now, sender, msg, out)
            case "aggregate":
                self._on_aggregate_msg(now, sender, msg, out)
            case "join":
                self._on_join(sender, msg, out)
            case "view":
                solicited = sender in self._announced_to
                self._announced_to.discard(sender)  # one answer per announcement
                merged = self.membership.merge_view(
                    sender, msg.meta.get("view"), solicited=solicited
                )
                self._merged(now, merged, out)
                self._learn_progress(sender, msg.meta, out)
                if not self._join_confirmed:
                    self._join_confirmed = True
                    self._cancel_timer(Timer.JOIN, out)
            case "leave":
                self._on_leave(now, sender, msg, out)

    def _on_pong(self, now: float, sender: PeerId, msg: Message, out: list[Effect]) -> None:
        if self._bootstrapping and _int(msg.meta.get("at")) > 1 and self._is_member(sender):
            # a fresh peer that started after round 1: the others may not know it, so it
            # joins like a late joiner instead of waiting to be sampled
            self._bootstrapping = False
            self.joining = True
            self._announce_join(now, out)
        self._learn_progress(sender, msg.meta, out)
        if self._restart and self.round >= self._restart:
            # the system is at the restart's round already: it was not stuck
            self._drop_delivery(TRAIN, self._restart, out)
            self._restart = 0
            out.append(Record("modest.restarts_abandoned", 1.0))
        resolver = self._resolvers.get(msg.round)
        if resolver is not None and resolver.answer(sender):
            self._ping_outcomes.append(True)
            self._advance_resolver(now, resolver, out)

    def _on_train_msg(self, now: float, sender: PeerId, msg: Message, out: list[Effect]) -> None:
        """An aggregated model of round r: train it if r is new and not already stale."""
        if msg.params is None:
            return
        r = msg.round
        self._merge_meta(now, sender, msg, out)
        if not self._claim(sender, r, out):
            self._hold(sender, msg, out)  # too far ahead on one word: ask others first
            return
        if not self._checked_role(now, sender, msg, out):
            return
        self._advance(r, out)
        self._learn_done(r, out)  # someone aggregated round r
        if r == self._trained_round:
            return  # the same round from another aggregator: the first one wins
        if r < self._trained_round or r + 1 < self.round:
            out.append(Record("modest.stale_dropped", 1.0))
            return
        outer = OUTER_RANKS * self._ranks(TRAIN)
        if sender != self.peer_id and not self._within(self.peer_id, r, outer):
            # not for us: only the sample of r takes the model of r as its own (generous:
            # this peer may not know yet of crashed candidates ahead of it)
            out.append(Record("modest.trains_not_sampled", 1.0))
            return
        self._trained_round = r
        self.params = msg.params  # the latest model, also for evaluating this peer
        train = self._train(msg.params)
        self._training = (train.ticket, r)  # replaces (abandons) any older training
        out.append(train)

    def _on_aggregate_msg(
        self, now: float, sender: PeerId, msg: Message, out: list[Effect]
    ) -> None:
        """A trained model for round r: collect it if this peer may still aggregate r."""
        if msg.params is None:
            return
        r = msg.round
        self._merge_meta(now, sender, msg, out)
        if not self._claim(sender, r, out):
            # Too far ahead on one word: held, and the round probed for. With one
            # aggregator a round's only vouchers may be its trainers' models: dropping the
            # first ones made the aggregator wait out its timer for models it had thrown
            # away (seen on nodes: a 60 s stall and a model short in ~1 run of 3).
            self._hold(sender, msg, out)
            return
        if not self._checked_role(now, sender, msg, out):
            return  # a trained model from outside the sample that trained
        self._advance(r, out)
        if r < self.round or r <= self._agg_done:
            out.append(Record("modest.late_models", 1.0))
            if sender != self.peer_id:
                meta = {"at": self.round, "done": self._done}
                out.append(Send(sender, Message(STATUS, self.round, None, meta)))
            return
        if self._agg is None or self._agg.round != r:
            self._agg = _Aggregation(r)
            self._set_timer(Timer.AGGREGATE, now + self.aggregation_timeout, (r,), out)
        weight = msg.meta.get("w")  # the contract: a finite number >= 0, when present
        valid = isinstance(weight, int | float) and not isinstance(weight, bool) and weight >= 0
        self._agg.models[sender] = (
            msg.params,
            float(weight) if valid and isinstance(weight, int | float) else None,
        )
        if len(self._agg.models) >= self._quorum():
            self._finish_aggregation(now, out, timed_out=False)

    def _on_trained(self, now: float, ticket: int, params: Tensor, out: list[Effect]) -> None:
        if self._training is None or self._training[0] != ticket:
            return  # abandoned for a newer round
        r = self._training[1]
        self._training = None
        self.params = params
        self._complete(r, out)
        self._start_delivery(now, AGGREGATE, r + 1, self.num_aggregators, params, out)

    def _on_join(self, sender: PeerId, msg: Message, out: list[Effect]) -> None:
        if not self.membership.take_join(sender, msg.meta.get("entry")):
            return
        meta = {"view": self.membership.view_wire(), "at": self.round, "done": self._done}
        out.append(Send(sender, Message(VIEW, self.round, None, meta)))

    def _on_leave(self, now: float, sender: PeerId, msg: Message, out: list[Effect]) -> None:
        if self.membership.take_leave(sender, msg.meta.get("entry")):  # applied at once
            self._on_unreachable(now, sender, out, suspect=False)

    def _on_unreachable(
        self, now: float, peer: PeerId, out: list[Effect], *, suspect: bool = True
    ) -> None:
        """``peer`` cannot be reached: pass over it in every sample being resolved."""
        if peer == self.peer_id:
            return
        if suspect:
            self._suspects[peer] = self.round
            self._silent[peer] = self.round
        for resolver in list(self._resolvers.values()):
            if resolver.fail(peer):
                self._advance_resolver(now, resolver, out)
        self._recheck_quorum(now, out)

    def _recheck_quorum(self, now: float, out: list[Effect]) -> None:
        """The live population shrank: an aggregation in progress may have its quorum now.

        The quorum counts live members only (``_quorum``); checked on a model's arrival
        alone, an aggregator whose missing trainers had left (or crashed) waited out its
        aggregation timer with enough models in hand: no further model would come."""
        agg = self._agg
        if agg is not None and agg.models and len(agg.models) >= self._quorum():
            self._finish_aggregation(now, out, timed_out=False)

    def _on_timer(self, now: float, name: str, out: list[Effect]) -> None:
        timer = self._timers.pop(name, None)
        if timer is None:
            return  # cancelled or replaced
        kind, payload = timer
        self._on_timer_kind[kind](now, payload, out)

    def _on_ping_timeout(self, now: float, payload: tuple[Any, ...], out: list[Effect]) -> None:
        """A wave of pings went unanswered: pass over (and suspect) who did not answer."""
        round, wave = payload
        resolver = self._resolvers.get(round)
        if resolver is None:
            return
        lost = resolver.expire(wave)
        self._ping_outcomes.extend(False for _ in lost)
        for peer in lost:
            self._suspects[peer] = self.round
            self._silent[peer] = self.round
        if lost:
            out.append(Record("modest.ping_timeouts", float(len(lost))))
            self._advance_resolver(now, resolver, out)

    def _on_join_timeout(self, now: float, payload: tuple[Any, ...], out: list[Effect]) -> None:
        """No view answered the join announcement yet: announce again (a few times)."""
        if not self._join_confirmed and self._join_attempts <= self.max_retries:
            self._announce_join(now, out)

    # ------------------------------------------------------------------ aggregation
    def _on_aggregation_timeout(
        self, now: float, payload: tuple[Any, ...], out: list[Effect]
    ) -> None:
        (round,) = payload
        agg = self._agg
        if agg is None or agg.round != round:
            return
        if len(agg.models) >= self.min_aggregation_count:
            out.append(Record("modest.aggregation_timeouts", 1.0))
            self._finish_aggregation(now, out, timed_out=True)
        elif agg.retries < self.max_retries:
            agg.retries += 1
            self._set_timer(Timer.AGGREGATE, now + self.aggregation_timeout, (round,), out)
        else:
            # give up cleanly; a trainer that sends this round again restarts the collection
            self._agg = None
            out.append(Record("modest.aggregations_abandoned", 1.0))

    def _finish_aggregation(self, now: float, out: list[Effect], *, timed_out: bool) -> None:
        agg = self._agg
        assert agg is not None
        self._agg = None
        self._cancel_timer(Timer.AGGREGATE, out)
        if not self._may_aggregate(agg):
            out.append(Record("modest.aggregations_refused", 1.0))
            return
        senders = list(agg.models)
        stack, weights, own = self._stack(agg)
        try:
            result = self.aggregate(stack, weights, own)
        except TooFewVectors:
            # a robust rule with a fixed f and too few models this round (trainers crashed
            # or kept silent): any mix of them could be the attackers'. Not aggregated, as
            # a refused aggregation; the round's restarts go on as usual.
            out.append(Record("too_few_to_aggregate", 1.0))
            return
        self.params = result
        self._agg_done = agg.round
        out.append(Record("modest.aggregated", float(len(senders))))
        self._complete(agg.round, out)
        self._learn_done(agg.round, out)
        self._start_delivery(now, TRAIN, agg.round, self.sample_size, result, out)

    def _may_aggregate(self, agg: _Aggregation) -> bool:
        """Whether this peer takes the aggregate of ``agg`` as its own model.

        Trainers send their models to the aggregators they found; a peer that does not
        find itself among the first ``OUTER_RANKS * (a + role_slack)`` live candidates of
        the round (and did not send itself a model) was chosen by nobody, and aggregates only
        the models of at least two distinct senders: one hostile trainer cannot make its
        model this peer's own.
        """
        if self.peer_id in agg.models or len(agg.models) >= 2:
            return True
        # generous: after a crash, an aggregator does not know all the dead ahead of it
        return self._within(self.peer_id, agg.round, OUTER_RANKS * self._ranks(AGGREGATE))

    def _quorum(self) -> int:
        """The quorum, scaled down when the live population is smaller than the sample."""
        live = sum(1 for p in self.view.active() if p not in self._suspects)
        if live >= self.sample_size:
            return self.quorum
        return max(1, math.ceil(self.success_fraction * max(live, 1) - 1e-9))

    def _stack(self, agg: _Aggregation) -> tuple[Tensor, Tensor | None, int]:
        """The aggregator's input: rows, weights and the row of the aggregator's own model.

        Robust rules need ``own`` to be a real row (centered clipping clips around it). An
        aggregator rarely trained in the previous round, so when it sent no model its
        current one is appended as a reference row of weight 0: weighted rules ignore it,
        and rules that ignore weights see one more (stale, honest) row.

        Weights, when given, are normalised to sum to 1: every aggregator of the library
        normalises them anyway, and a plain ``weights @ stack`` (the simulator's deferred
        mean) then computes the same weighted mean.
        """
        senders = list(agg.models)
        rows = [agg.models[s][0] for s in senders]
        raw = [agg.models[s][1] for s in senders]
        if self.peer_id in senders:
            stack = torch.stack(rows)
            if None in raw or sum(raw) <= 0:  # type: ignore[arg-type]
                return stack, None, senders.index(self.peer_id)
            weights = torch.tensor(raw, dtype=torch.float64)
            return stack, (weights / weights.sum()).to(stack.dtype), senders.index(self.peer_id)
        stack = torch.stack([*rows, self.params.to(rows[0].dtype)])
        trainer_weights = [1.0] * len(raw) if None in raw or sum(raw) <= 0 else raw  # type: ignore[arg-type]
        weights = torch.tensor([*trainer_weights, 0.0], dtype=torch.float64)
        return stack, (weights / weights.sum()).to(stack.dtype), len(rows)

    # ------------------------------------------------------------------ sampling and sending
    def _resolver(self, round: int) -> SampleResolver:
        resolver = self._resolvers.get(round)
        if resolver is None:
            candidates = derive_candidates(self.view, round)
            resolver = SampleResolver(round, candidates, self.peer_id, self._suspects.__contains__)
            self._resolvers[round] = resolver
        return resolver

    def _need(self, now: float, round: int, k: int, out: list[Effect]) -> None:
        """Make sure the first ``k`` responsive candidates of ``round`` get resolved."""
        resolver = self._resolver(round)
        resolver.want(k)
        self._advance_resolver(now, resolver, out)

    def _advance_resolver(self, now: float, resolver: SampleResolver, out: list[Effect]) -> None:
        """Ping the next wave if more candidates are needed, then act on what is known."""
        if self._resolvers.get(resolver.round) is not resolver:
            return  # pruned meanwhile
        wave = resolver.to_ping()
        if wave:
            self._ping(now, resolver, wave, out)
        self._pump(now, resolver, out)

    def _ping(
        self, now: float, resolver: SampleResolver, peers: list[PeerId], out: list[Effect]
    ) -> None:
        self._wave += 1
        resolver.pinged(peers, self._wave)
        for peer in peers:
            out.append(Send(peer, Message(PING, resolver.round)))
        self._set_timer(Timer.PING, now + self.ping_timeout, (resolver.round, self._wave), out)

    def _pump(self, now: float, resolver: SampleResolver, out: list[Effect]) -> None:
        """Send each delivery of this round to the responsive candidates it still lacks."""
        round = resolver.round
        if self._bootstrapping and round == 1:
            aggregators = resolver.first(self.num_aggregators)
            if aggregators is not None and self.peer_id in aggregators:
                # Before taking round 1 on itself, hear from one more candidate: a peer that
                # started late (a node started after the others) learns from that pong that
                # the system is past round 1 and joins instead of restarting it.
                witness = self.num_aggregators + 1
                if resolver.first(witness) is None:
                    resolver.want(witness)
                    wave = resolver.to_ping()
                    if wave:
                        self._ping(now, resolver, wave, out)
                    return
            if aggregators is not None:
                self._bootstrapping = False
                if self.peer_id in aggregators:
                    # an aggregator of round 1 "aggregates" the initial model alone
                    self._agg_done = max(self._agg_done, 1)
                    self._advance(1, out)
                    self._learn_done(1, out)
                    self._start_delivery(now, TRAIN, 1, self.sample_size, self.params, out)
                    return  # _start_delivery pumped this resolver again
        for key in [k for k in self._deliveries if k[1] == round]:
            delivery = self._deliveries.get(key)
            if delivery is None:
                continue  # pruned by a local delivery just made
            if delivery.kind == TRAIN and round == self._restart and not delivery.sent:
                if not self._may_restart(resolver, out):
                    continue
            chosen = resolver.first(delivery.target)
            if chosen is None:
                continue
            fresh = [p for p in chosen if p not in delivery.sent]
            if not fresh:
                continue
            if not delivery.sent:
                out.append(
                    Record("modest.sample_fallbacks", float(resolver.passed_over(delivery.target)))
                )
                watch = (delivery.kind, round)
                self._set_timer(Timer.WATCH, now + self.retry_interval, watch, out)
            delivery.sent.update(fresh)
            self._send_model(now, delivery, fresh, out)

    def _send_model(
        self, now: float, delivery: _Delivery, recipients: list[PeerId], out: list[Effect]
    ) -> None:
        self.view.touch(self.peer_id, delivery.round)
        if delivery.kind == TRAIN and delivery.round == self._restart:
            self._restart = 0  # it goes out: the round really was stuck
        if delivery.kind == AGGREGATE:
            self._advance(delivery.round, out)  # this peer now knows of round r+1
        members = self.membership
        meta: dict[str, Any] = {"view": members.view_wire()}
        if members.pending_joins:
            meta["joins"] = members.joins_wire()
        if delivery.kind == AGGREGATE and self.num_samples is not None:
            meta["w"] = self.num_samples
        message = Message(delivery.kind, delivery.round, delivery.params, meta)
        out.extend(Send(p, message) for p in recipients if p != self.peer_id)
        members.apply_joins()  # joins announced to us take effect after our next send
        if self.peer_id in recipients:
            self._on_message(now, self.peer_id, message, out)

    def _start_delivery(
        self, now: float, kind: str, round: int, target: int, params: Tensor, out: list[Effect]
    ) -> None:
        if round < self.round or (kind == AGGREGATE and round <= self._done):
            out.append(Record("modest.stale_dropped", 1.0))
            return
        self._deliveries[(kind, round)] = _Delivery(kind, round, target, params)
        self._need(now, round, target, out)

    def _on_watch(self, now: float, payload: tuple[Any, ...], out: list[Effect]) -> None:
        """Recheck that a delivery's recipients are alive; the dead get replaced."""
        kind, round = payload
        delivery = self._deliveries.get((kind, round))
        resolver = self._resolvers.get(round)
        if delivery is None or resolver is None:
            return
        if delivery.retries >= self.max_retries:
            del self._deliveries[(kind, round)]
            out.append(Record("modest.deliveries_unconfirmed", 1.0))
            return
        delivery.retries += 1
        recheck = resolver.recheck(sorted(delivery.sent))
        if recheck:
            self._ping(now, resolver, recheck, out)
        self._set_timer(Timer.WATCH, now + self.retry_interval, payload, out)

    def _may_restart(self, resolver: SampleResolver, out: list[Effect]) -> bool:
        """A restart goes out only from an aggregator of its round (the first ``a``
        responsive candidates): the others would refuse its model from anyone else. An
        idle peer that is not one drops its restart; the aggregators restart themselves."""
        aggregators = resolver.first(self.num_aggregators)
        if aggregators is None:
            return False  # not known yet
        if self.peer_id in aggregators:
            return True
        self._drop_delivery(TRAIN, resolver.round, out)
        self._restart = 0
        out.append(Record("modest.restarts_deferred", 1.0))
        return False

    def _drop_delivery(self, kind: str, round: int, out: list[Effect]) -> None:
        if self._deliveries.pop((kind, round), None) is not None:
            self._cancel_timer(Timer.WATCH, out, (kind, round))

    def _on_idle_check(self, now: float, payload: tuple[Any, ...], out: list[Effect]) -> None:
        """The watchdog: restart the next round if nothing moved since the last check."""
        self._set_timer(Timer.IDLE, now + self.idle_timeout, (), out)
        busy = (
            self._agg is not None
            or self._training is not None
            or self._deliveries
            or self._bootstrapping
            or (self.joining and not self._join_confirmed)
        )
        if self._active or busy:
            self._active = False
            return
        self._restart = self.round + 1
        out.append(Record("modest.restarts", 1.0))
        self._start_delivery(now, TRAIN, self._restart, self.sample_size, self.params, out)

    # ------------------------------------------------------------------ progress
    def _advance(self, round: int, out: list[Effect]) -> None:
        """A round tag ``round`` was seen or produced: drop the work it makes stale."""
        if round <= self.round:
            return
        self.round = round
        self._done = max(self._done, round - 1)
        self._active = True
        self._prune(out)

    def _learn_done(self, round: int, out: list[Effect]) -> None:
        if round > self._done:
            self._done = round
            self._active = True
            self._prune(out)

    def _learn_progress(self, sender: PeerId, meta: Mapping[str, Any], out: list[Effect]) -> None:
        """``at``/``done`` of a pong, status or view: this peer moves only as far as a
        quorum of members vouched (one identity's word moves nothing)."""
        at, done = _int(meta.get("at")), _int(meta.get("done"))
        self._claim(sender, max(at, done), out)
        self._advance(min(at, self._confirmed), out)
        # a vouched round r proves that r - 1 was aggregated, not r itself
        self._learn_done(min(done, at, self._confirmed - 1), out)

    def _hear(self, sender: PeerId, round_: int, out: list[Effect]) -> None:
        """A passive claim that ``round_`` exists (a ping's round): it counts toward a
        quorum, and moves this peer only as far as the quorum vouched."""
        self._claim(sender, round_, out)
        self._advance(min(round_, self._confirmed), out)

    # -- round claims -------------------------------------------------------------------
    def _claim(self, sender: PeerId, round_: int, out: list[Effect]) -> bool:
        """``sender`` says round ``round_`` exists; whether this peer may act on it now.

        Every member's highest claim above the vouched round counts (once per member)
        toward ``catch_up_quorum``; a round is acted on when it is at most ``round_lead``
        beyond what that quorum vouched for, so one identity cannot drag this peer ahead
        (the pending claim is counted), while an honest peer that was not sampled for many
        rounds catches up as soon as two members show it the current round.
        """
        if sender == self.peer_id:
            return True
        if round_ > self._confirmed and round_ > self._claims.get(sender, -1):
            if self._is_member(sender):
                self._claims[sender] = round_
                self._confirm(out)
        if round_ <= self._confirmed + self.round_lead:
            return True
        out.append(Record("modest.claims_pending", 1.0))
        return False

    def _confirm(self, out: list[Effect]) -> None:
        """Raise the vouched round to the highest one ``quorum`` distinct members claim.

        Claims at or below the vouched round are dropped, so at most ``quorum - 1`` stay.
        """
        quorum = self._catch_up_quorum()
        if len(self._claims) < quorum:
            return
        reached = heapq.nlargest(quorum, self._claims.values())[-1]
        if reached <= self._confirmed:
            return
        if reached > max(self._confirmed + self.round_lead, self.round):
            out.append(Record("modest.catch_ups", 1.0))
        self._confirmed = reached
        self._claims = {p: r for p, r in self._claims.items() if r > reached}
        self._replay_due = True

    def _catch_up_quorum(self) -> int:
        """``catch_up_quorum``, capped by the other live members (a pair vouches alone)."""
        live = sum(1 for p in self.view.active() if p not in self._suspects)
        return max(1, min(self.catch_up_quorum, live - 1))

    def _hold(self, sender: PeerId, msg: Message, out: list[Effect], *, probe: bool = True) -> None:
        """Keep a model whose round is not vouched for yet, or whose sender is being checked
        (one per sender and kind, ``MAX_HELD`` plus a sample's worth in all: an aggregator
        may meet every trainer's model of a round before the round is vouched for);
        ``_replay_held`` takes it up again.
        A round not vouched for is probed for."""
        key = (sender, msg.kind)
        if key not in self._held and len(self._held) >= MAX_HELD + self.sample_size:
            out.append(Record("modest.held_dropped", 1.0))
            return
        if self._held.get(key) is not msg:
            out.append(Record(f"modest.{msg.kind}s_held", 1.0))
        self._held[key] = msg
        if probe:
            self._probe(msg.round, sender, out)

    def _probe(self, round_: int, sender: PeerId, out: list[Effect]) -> None:
        """Ask the likely trainers of ``round_ - 1`` (they moved to ``round_`` when they
        sent their models) for their progress: their pongs vouch for a real round.

        The pings carry this peer's own round, never the claimed one: a probe must not
        spread a forged round as if this peer vouched for it.
        """
        if round_ in self._probed:
            return
        if len(self._probed) >= 4 * MAX_HELD:
            self._probed.clear()
        self._probed.add(round_)
        skip = {sender, self.peer_id}
        targets = [
            p
            for p in self._candidates(round_ - 1)
            if p not in skip and p not in self._suspects and p not in self._silent
        ][: self.sample_size]
        ping = Message(PING, self.round)
        out.extend(Send(p, ping) for p in targets)
        out.append(Record("modest.probes", 1.0))

    def _checked_role(self, now: float, sender: PeerId, msg: Message, out: list[Effect]) -> bool:
        """Whether this peer would have chosen ``sender`` for what ``msg`` says it did:
        for a ``train``, one of the first ``a + role_slack`` live candidates of its round
        (an aggregator); for an ``aggregate``, one of the first ``s + role_slack`` of the
        round before (a trainer).

        When live-looking candidates ahead of it are what stands in the way, they may be
        dead without this peer knowing (the sender's pings found out, ours did not go
        out): they are pinged once, the model is held, and decided on when they answered
        or timed out. Refusals are counted (``modest.trains_refused``, ...).
        """
        if sender == self.peer_id:
            return True
        round_ = msg.round if msg.kind == TRAIN else msg.round - 1
        ranks = self._ranks(AGGREGATE if msg.kind == TRAIN else TRAIN)
        ahead = self._live_ahead(sender, round_, OUTER_RANKS * ranks)
        if ahead is not None and len(ahead) < self._scaled(ranks):
            return True
        if ahead is not None and self._verifying:
            self._hold(sender, msg, out, probe=False)  # a check is under way: wait for it
            return False
        check = (msg.kind, round_)
        if ahead is None or check in self._verified:
            out.append(Record(f"modest.{msg.kind}s_refused", 1.0))
            return False
        if len(self._verified) >= 4 * MAX_HELD:
            self._verified.clear()
        self._verified.add(check)
        unchecked = [p for p in ahead if p != self.peer_id]
        ping = Message(PING, self.round)
        out.extend(Send(p, ping) for p in unchecked)
        self._verifying.update(unchecked)
        self._set_timer(Timer.VERIFY, now + self.ping_timeout, (), out)
        out.append(Record("modest.verifications", 1.0))
        self._hold(sender, msg, out, probe=False)
        return False

    def _on_verified(self, now: float, payload: tuple[Any, ...], out: list[Effect]) -> None:
        """The verification pings timed out: who did not answer is unresponsive."""
        for peer in self._verifying:
            self._suspects[peer] = self._silent[peer] = self.round
            self._ping_outcomes.append(False)
        self._verifying.clear()
        self._replay_due = True

    def _heard_from(self, peer: PeerId, out: list[Effect]) -> None:
        """``peer`` spoke: it is up, and a verification waiting on it may be over."""
        self._suspects.pop(peer, None)
        self._silent.pop(peer, None)
        if peer in self._verifying:
            self._verifying.discard(peer)
            self._ping_outcomes.append(True)
            if not self._verifying:
                self._cancel_timer(Timer.VERIFY, out)
                self._replay_due = True

    def _replay_held(self, now: float, out: list[Effect]) -> None:
        """Take up the held models whose round is now vouched for (and whose sender is
        found to be an aggregator, for a train); drop the stale ones."""
        self._replay_due = False
        horizon = self._confirmed + self.round_lead
        for key, msg in list(self._held.items()):
            sender, kind = key
            if kind == TRAIN:
                stale = msg.round <= self._trained_round or msg.round + 1 < self.round
            else:
                stale = msg.round < self.round or msg.round <= self._agg_done
            ready = msg.round <= horizon  # (held for a check of its sender: vouched already)
            if stale:
                del self._held[key]
            elif ready:
                del self._held[key]
                handler = self._on_train_msg if kind == TRAIN else self._on_aggregate_msg
                handler(now, sender, msg, out)

    def _prune(self, out: list[Effect]) -> None:
        """Abandon everything older than ``self.round``: keeps every buffer bounded."""
        current, done = self.round, self._done
        if self._agg is not None and self._agg.round < current:
            self._agg = None
            self._cancel_timer(Timer.AGGREGATE, out)
            out.append(Record("modest.aggregations_abandoned", 1.0))
        if self._training is not None and self._training[1] + 1 < current:
            self._training = None
        for kind, round in list(self._deliveries):
            if round < current or (kind == AGGREGATE and round <= done):
                del self._deliveries[(kind, round)]
                self._cancel_timer(Timer.WATCH, out, (kind, round))
        for round in [r for r in self._resolvers if r < current]:
            del self._resolvers[round]
        for name, (timer, payload) in list(self._timers.items()):
            if timer is Timer.PING and payload[0] not in self._resolvers:
                self._cancel(name, out)
        expired = [p for p, r in self._suspects.items() if r + self.suspect_rounds <= current]
        for peer in expired:
            del self._suspects[peer]

    def _complete(self, round: int, out: list[Effect]) -> None:
        if self.joining and self._completed == 0:
            out.append(Record("modest.joiners_took_part", 1.0))
        if round > self._completed:
            self._completed = round
            # the model it ended with: the same event may go on to the next round's
            out.append(RoundCompleted(round, self.params))

    # ------------------------------------------------------------------ views, joins
    def _merge_meta(self, now: float, sender: PeerId, msg: Message, out: list[Effect]) -> None:
        """Merge the view and the pending joins a model message carries."""
        if sender == self.peer_id:
            return
        members = self.membership
        self._merged(now, members.merge_view(sender, msg.meta.get("view")), out)
        members.note_activity(sender, msg.round)
        members.merge_joins(sender, msg.meta.get("joins"))

    def _merged(self, now: float, merged: Merged, out: list[Effect]) -> None:
        """After a received view was merged: drop stale suspicions, and rejoin when the
        sender thought this peer had left."""
        if merged is Merged.IGNORED:
            return
        self._forget_suspicions()
        if merged is Merged.DISOWNED:
            self._join_confirmed = False
            self._join_attempts = 0
            self._announce_join(now, out)

    def _forget_suspicions(self) -> None:
        """Drop suspicions of peers that someone saw take part after we gave up on them."""
        view = self.view
        for marks in (self._suspects, self._silent):
            for peer, mark in list(marks.items()):
                entry = view.get(peer)
                if entry is not None and entry.round > mark:
                    del marks[peer]

    def _announce_join(self, now: float, out: list[Effect]) -> None:
        self._join_attempts += 1
        entry = self.membership.own_wire()
        if len(self._announced_to) > self.announce_fanout * (self.max_retries + 2):
            self._announced_to.clear()  # answers that never came
        for peer in self._random_peers(self.announce_fanout):
            self._announced_to.add(peer)
            out.append(Send(peer, Message(JOIN, self.round, None, {"entry": entry})))
        self._set_timer(Timer.JOIN, now + self.retry_interval, (), out)

    def _random_peers(self, k: int) -> list[PeerId]:
        others = sorted(p for p in self.view.active() if p != self.peer_id)
        return self.rng.sample(others, min(k, len(others)))

    # ------------------------------------------------------------------ timers
    def _set_timer(
        self, kind: Timer, at: float, payload: tuple[Any, ...], out: list[Effect]
    ) -> None:
        """(Re)arm the timer of ``kind``; a keyed kind has one timer per payload."""
        name = kind.name_for(payload)
        self._timers[name] = (kind, payload)
        out.append(SetTimer(name, at))

    def _cancel_timer(self, kind: Timer, out: list[Effect], key: tuple[Any, ...] = ()) -> None:
        self._cancel(kind.name_for(key), out)

    def _cancel(self, name: str, out: list[Effect]) -> None:
        if self._timers.pop(name, None) is not None:
            out.append(CancelTimer(name))
