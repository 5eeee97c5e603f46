"""MoDeST: sample derivation, view merging, quorum, staleness, and whole runs.

Units drive one protocol object by hand. Whole runs use ``Loop``, a tiny discrete-event
driver in this file: a heap of (time, event), every ``Send`` delivered after a fixed
latency, ``Train`` answered by a fake trainer that pulls the model towards a target, and
timers that fire unless cancelled or replaced. Crashed peers silently drop everything,
which is the hard case: no ``SendFailed`` tells anybody.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.protocols.base import (
    CancelTimer,
    Effect,
    Event,
    Message,
    MessageReceived,
    PeerDown,
    Record,
    RoundCompleted,
    Send,
    SendFailed,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols.modest import (
    Liveness,
    ModestProtocol,
    PopulationView,
    SampleResolver,
    ViewEntry,
    derive_candidates,
)

TARGET = torch.tensor([1.0, -2.0, 3.0, 0.5])


def of_type(effects: list[Effect], kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def sends(effects: list[Effect], kind: str) -> list[Send]:
    return [e for e in effects if isinstance(e, Send) and e.message.kind == kind]


def peers(n: int) -> list[str]:
    return [f"peer-{i:02d}" for i in range(n)]


def make(peer: str, population: list[str], **kwargs) -> ModestProtocol:
    options: dict[str, Any] = dict(
        population=population,
        sample_size=4,
        num_aggregators=2,
        success_fraction=1.0,
        ping_timeout=0.5,
        aggregation_timeout=2.0,
        min_aggregation_count=1,
        seed=7,
    )
    options.update(kwargs)
    return ModestProtocol(peer, torch.zeros(4), [], **options)


def pull_towards_target(params: torch.Tensor, steps: int) -> torch.Tensor:
    """Fake training: each step halves the distance to TARGET."""
    return TARGET + (params - TARGET) * 0.5**steps


class Loop:
    """A minimal virtual-time driver for a set of protocol objects."""

    def __init__(
        self,
        protocols: dict[str, ModestProtocol],
        *,
        latency: float = 0.01,
        train_time: float = 0.1,
        trainer: Callable[[torch.Tensor, int], torch.Tensor] = pull_towards_target,
        loud_failures: bool = False,
    ) -> None:
        self.protocols = protocols
        self.latency = latency
        self.train_time = train_time
        self.trainer = trainer
        self.loud_failures = loud_failures  # answer sends to crashed peers with SendFailed
        self.now = 0.0
        self.crashed: set[str] = set()
        self.heap: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.timers: dict[tuple[str, str], int] = {}
        self.completed: dict[str, list[int]] = defaultdict(list)
        self.records: dict[str, float] = defaultdict(float)
        self.kinds: dict[str, int] = defaultdict(int)

    def push(self, at: float, peer: str, item: object) -> None:
        heapq.heappush(self.heap, (at, next(self.seq), peer, item))

    def start(self, peer: str, at: float = 0.0) -> None:
        self.push(at, peer, Start(at))

    def apply(self, peer: str, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Send(to, message):
                    self.kinds[message.kind] += 1
                    at = self.now + self.latency
                    if to in self.crashed and self.loud_failures:
                        self.push(at, peer, SendFailed(at, to, message))
                    else:
                        self.push(at, to, MessageReceived(at, peer, message))
                case Train(ticket, params, steps):
                    at = self.now + self.train_time
                    self.push(at, peer, TrainingDone(at, ticket, self.trainer(params, steps)))
                case SetTimer(name, at):
                    token = next(self.seq)
                    self.timers[(peer, name)] = token
                    self.push(at, peer, ("timer", name, token))
                case CancelTimer(name):
                    self.timers.pop((peer, name), None)
                case Record(name, value):
                    self.records[name] += value
                case RoundCompleted(round):
                    self.completed[peer].append(round)

    def step(self) -> None:
        at, _, peer, item = heapq.heappop(self.heap)
        self.now = at
        if peer in self.crashed or peer not in self.protocols:
            return
        if isinstance(item, tuple):
            _, name, token = item
            if self.timers.get((peer, name)) != token:
                return
            del self.timers[(peer, name)]
            event: Event = TimerFired(at, name)
        else:
            event = item  # type: ignore[assignment]
        self.apply(peer, self.protocols[peer].handle(event))

    def run(self, until: float, stop: Callable[[], bool] = lambda: False) -> None:
        while self.heap and self.heap[0][0] <= until and not stop():
            self.step()
        self.now = max(self.now, min(until, self.heap[0][0] if self.heap else until))

    def top_round(self, alive_only: bool = True) -> int:
        return max(
            (
                max(rounds)
                for p, rounds in self.completed.items()
                if rounds and not (alive_only and p in self.crashed)
            ),
            default=0,
        )

    def latest_model(self) -> torch.Tensor:
        """The model of the alive peer that completed the highest round."""
        best = max(
            (p for p in self.protocols if p not in self.crashed and self.completed[p]),
            key=lambda p: max(self.completed[p]),
        )
        return self.protocols[best].params


def network(n: int, loud_failures: bool = False, **kwargs) -> tuple[Loop, list[str]]:
    ids = peers(n)
    loop = Loop({p: make(p, ids, **kwargs) for p in ids}, loud_failures=loud_failures)
    for p in ids:
        loop.start(p)
    return loop, ids


# --------------------------------------------------------------------------- the view


entries = st.builds(
    ViewEntry,
    round=st.integers(0, 5),
    left=st.booleans(),
    counter=st.integers(0, 3),
)


@given(entries, entries, entries)
def test_entry_merge_is_a_semilattice(a: ViewEntry, b: ViewEntry, c: ViewEntry) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a


def test_merge_takes_max_round_and_status_of_higher_counter() -> None:
    view = PopulationView({"a": ViewEntry(5, False, 0), "b": ViewEntry(1, True, 1)})
    changed = view.merge(
        {
            "a": ViewEntry(3, True, 1),  # older round, newer status: left
            "b": ViewEntry(4, False, 0),  # newer round, older status: stays left
            "c": ViewEntry(2, False, 0),  # unknown: added
        }
    )
    assert sorted(changed) == ["a", "b", "c"]
    assert view["a"] == ViewEntry(5, True, 1)
    assert view["b"] == ViewEntry(4, True, 1)
    assert view["c"] == ViewEntry(2, False, 0)
    assert view.merge({"c": ViewEntry(1, False, 0)}) == []  # nothing new


def test_view_wire_round_trip_skips_malformed_entries() -> None:
    view = PopulationView({"a": ViewEntry(3, True, 2), "b": ViewEntry()})
    wire: dict[str, Any] = view.to_wire()  # plain wire data: malformed entries go in below
    assert PopulationView.from_wire(wire) == view
    wire.update({"x": [1, 2, 3], "y": "junk", "z": [1, 0, -1], "": [0, 0, 0]})
    assert dict(PopulationView.from_wire(wire)) == dict(view)
    assert len(PopulationView.from_wire(["not", "a", "dict"])) == 0


# --------------------------------------------------------------------------- sample derivation


def test_candidates_are_deterministic_and_skip_left_peers() -> None:
    ids = peers(30)
    view = PopulationView.of(ids)
    shuffled = PopulationView.of(list(reversed(ids)))
    assert derive_candidates(view, 4) == derive_candidates(shuffled, 4)
    assert sorted(derive_candidates(view, 4)) == ids
    assert derive_candidates(view, 4) != derive_candidates(view, 5)  # re-drawn each round
    view.merge_entry(ids[3], ViewEntry(0, True, 1))
    assert ids[3] not in derive_candidates(view, 4)
    # pinned values: the order must not depend on the process (no salted hash())
    assert derive_candidates(PopulationView.of(["a", "b", "c", "d"]), 1) == ["d", "a", "b", "c"]
    assert derive_candidates(PopulationView.of(["a", "b", "c", "d"]), 2) == ["c", "d", "a", "b"]


def test_every_peer_with_the_same_view_derives_the_same_sample() -> None:
    ids = peers(12)
    for round in (1, 2, 3):
        samples = set()
        for me in ids:
            resolver = SampleResolver(round, derive_candidates(PopulationView.of(ids), round), me)
            resolver.want(5)
            wave = resolver.to_ping()
            resolver.pinged(wave, 1)
            for peer in wave:
                resolver.answer(peer)
            assert resolver.to_ping() == []
            first = resolver.first(5)
            assert first is not None
            samples.add(tuple(first))
        assert len(samples) == 1
        assert list(samples.pop()) == derive_candidates(PopulationView.of(ids), round)[:5]


def test_unresponsive_candidate_is_skipped_for_the_next_in_order() -> None:
    ids = peers(10)
    order = derive_candidates(PopulationView.of(ids), 3)
    me = order[-1]
    resolver = SampleResolver(3, order, me)
    resolver.want(3)
    wave = resolver.to_ping()
    assert wave == order[:3]
    resolver.pinged(wave, 1)
    resolver.answer(order[0])
    resolver.answer(order[2])
    assert resolver.first(3) is None  # order[1] has not answered yet
    assert resolver.first(1) == [order[0]]
    assert resolver.expire(1) == [order[1]]
    assert resolver.status(order[1]) is Liveness.DEAD
    nxt = resolver.to_ping()
    assert nxt[0] == order[3]
    resolver.pinged(nxt, 2)
    resolver.answer(order[3])
    assert resolver.first(3) == [order[0], order[2], order[3]]
    assert resolver.passed_over(3) == 1
    assert resolver.answer(order[1]) is False  # too late: stays passed over


def test_resolver_pings_more_after_failures_and_stops_at_the_end() -> None:
    ids = peers(20)
    order = derive_candidates(PopulationView.of(ids), 1)
    resolver = SampleResolver(1, order, "outsider")
    resolver.want(4)
    first = resolver.to_ping()
    assert len(first) == 4
    resolver.pinged(first, 1)
    resolver.answer(first[0])
    resolver.expire(1)
    second = resolver.to_ping()
    assert len(second) > 3  # 1 in 4 answered: over-provision the next wave
    resolver.pinged(second, 2)
    resolver.expire(2)
    while wave := resolver.to_ping():
        resolver.pinged(wave, 3)
        resolver.expire(3)
    assert resolver.first(4) == [first[0]]  # candidates ran out: a smaller sample


def test_protocol_skips_a_silent_candidate_after_ping_timeout() -> None:
    ids = peers(8)
    order = derive_candidates(PopulationView.of(ids), 1)
    me = order[-1]
    p = make(me, ids, num_aggregators=1, sample_size=1)
    effects = p.handle(Start(0.0))
    assert [s.to for s in sends(effects, "ping")] == [order[0]]
    [timer] = [t for t in of_type(effects, SetTimer) if t.name.startswith("modest.ping")]
    assert timer.at == pytest.approx(0.5)
    effects = p.handle(TimerFired(0.5, timer.name))
    assert [s.to for s in sends(effects, "ping")] == [order[1]]
    assert order[0] in p.suspects
    assert Record("modest.ping_timeouts", 1.0) in effects
    p.handle(MessageReceived(0.6, order[1], Message("pong", 1, None, {"at": 0, "done": 0})))
    assert p.round == 0  # order[1] is the aggregator of round 1, not us


def test_send_failed_and_peer_down_pass_over_a_candidate() -> None:
    ids = peers(8)
    order = derive_candidates(PopulationView.of(ids), 1)
    p = make(order[-1], ids, num_aggregators=2, sample_size=2)
    effects = p.handle(Start(0.0))
    assert [s.to for s in sends(effects, "ping")] == order[:2]
    effects = p.handle(SendFailed(0.01, order[0], Message("ping", 1)))
    assert [s.to for s in sends(effects, "ping")] == [order[2]]
    effects = p.handle(PeerDown(0.02, order[2]))
    # nobody answered yet: the next wave over-provisions, still in hash order
    assert [s.to for s in sends(effects, "ping")] == order[3:5]
    assert {order[0], order[2]} <= p.suspects
    assert p.view[order[0]].left is False  # inactive, not left


# --------------------------------------------------------------------------- one peer by hand


def vouched(p: ModestProtocol, round: int) -> ModestProtocol:
    """``p`` at ``round``, which a quorum of members vouched for (as in a running system;
    a fresh peer acts on at most ``round_lead`` rounds beyond what was vouched for)."""
    p.round = p._confirmed = round
    return p


def model(round: int, value: float, **meta) -> Message:
    return Message("aggregate", round, torch.full((4,), value), dict(meta))


def aggregator(ids: list[str], **kwargs) -> ModestProtocol:
    # any peer may aggregate here (roles: tests/test_modest_hostile.py)
    options = dict(sample_size=4, num_aggregators=1, success_fraction=0.75, role_slack=len(ids))
    options.update(kwargs)
    return vouched(make(ids[0], ids, **options), 4)


def test_aggregator_proceeds_at_quorum() -> None:
    ids = peers(10)
    p = aggregator(ids)  # quorum = ceil(0.75 * 4) = 3
    assert p.quorum == 3
    effects = p.handle(MessageReceived(1.0, ids[1], model(5, 1.0)))
    assert any(isinstance(e, SetTimer) and e.at == pytest.approx(3.0) for e in effects)
    effects += p.handle(MessageReceived(1.1, ids[2], model(5, 2.0)))
    effects += p.handle(MessageReceived(1.1, ids[2], model(5, 2.0)))  # same sender: counted once
    assert not of_type(effects, RoundCompleted) and p.aggregating_round == 5
    effects = p.handle(MessageReceived(1.2, ids[3], model(5, 6.0)))
    assert RoundCompleted(5) in effects
    assert torch.allclose(p.params, torch.full((4,), 3.0))
    assert CancelTimer("modest.aggregate") in effects
    assert Record("modest.aggregated", 3.0) in effects
    assert sends(effects, "ping")  # now finds the sample of round 5 to send the model to


def test_models_of_a_round_not_vouched_for_yet_are_held_not_dropped() -> None:
    """An aggregator whose vouched round lags (with one aggregator, a round's first
    vouchers may be its trainers' models) holds the early models and takes them up once
    two members vouched for the round: none is lost, the round completes on its models,
    not on its timer. (It dropped them: a node waited out aggregation_timeout.)"""
    ids = peers(10)
    p = aggregator(ids)  # vouched round 4, round_lead 2: round 7 is one word too far
    effects = p.handle(MessageReceived(1.0, ids[1], model(7, 1.0)))
    assert Record("modest.aggregates_held", 1.0) in effects and p.aggregating_round is None
    effects = p.handle(MessageReceived(1.1, ids[2], model(7, 2.0)))  # a second member: vouched
    assert p.aggregating_round == 7 and not of_type(effects, RoundCompleted)
    effects = p.handle(MessageReceived(1.2, ids[3], model(7, 6.0)))
    assert RoundCompleted(7) in effects  # quorum 3: the held model counted
    assert torch.allclose(p.params, torch.full((4,), 3.0))
    assert Record("modest.aggregated", 3.0) in effects


def test_quorum_shrinks_with_a_population_smaller_than_the_sample() -> None:
    ids = peers(10)
    p = aggregator(ids, success_fraction=1.0)  # quorum: all 4 of the sample
    for gone in ids[3:]:  # seven peers left: three are live, p included
        p.handle(MessageReceived(0.5, gone, Message("leave", 4, None, {"entry": [4, 1, 1]})))
    p.handle(MessageReceived(1.0, ids[1], model(5, 1.0)))
    effects = p.handle(MessageReceived(1.1, ids[2], model(5, 3.0)))
    assert not of_type(effects, RoundCompleted)
    effects = p.handle(MessageReceived(1.2, ids[0], model(5, 5.0)))  # its own
    assert RoundCompleted(5) in effects  # 3 of the 3 there are; a 4th would never come
    assert torch.allclose(p.params, torch.full((4,), 3.0))


def test_aggregator_waits_for_timeout_then_needs_min_count() -> None:
    ids = peers(10)
    p = aggregator(ids, min_aggregation_count=2, max_retries=1)
    p.handle(MessageReceived(1.0, ids[1], model(5, 1.0)))
    effects = p.handle(TimerFired(3.0, "modest.aggregate"))
    assert not of_type(effects, RoundCompleted)  # 1 < min count: waits again
    assert of_type(effects, SetTimer)[0].at == pytest.approx(5.0)
    p.handle(MessageReceived(4.0, ids[2], model(5, 3.0)))
    assert p.aggregating_round == 5  # below quorum, before the timer: still waiting
    effects = p.handle(TimerFired(5.0, "modest.aggregate"))
    assert RoundCompleted(5) in effects
    assert Record("modest.aggregation_timeouts", 1.0) in effects
    assert torch.allclose(p.params, torch.full((4,), 2.0))


def test_aggregator_abandons_after_retries_and_can_start_again() -> None:
    ids = peers(10)
    p = aggregator(ids, min_aggregation_count=2, max_retries=1)
    p.handle(MessageReceived(1.0, ids[1], model(5, 1.0)))
    p.handle(TimerFired(3.0, "modest.aggregate"))
    effects = p.handle(TimerFired(5.0, "modest.aggregate"))
    assert Record("modest.aggregations_abandoned", 1.0) in effects
    assert p.aggregating_round is None
    p.handle(MessageReceived(6.0, ids[2], model(5, 1.0)))  # a trainer re-sent its model
    assert p.aggregating_round == 5


def test_weights_and_custom_aggregate_are_used() -> None:
    ids = peers(10)
    seen: dict[str, Any] = {}

    def first_row(stack, weights, own_index):
        seen.update(n=stack.shape[0], weights=weights, own=own_index)
        return stack[0]

    p = aggregator(ids, success_fraction=0.5, aggregate=first_row)
    p.handle(MessageReceived(1.0, ids[1], model(5, 1.0, w=10)))
    p.handle(MessageReceived(1.0, ids[2], model(5, 3.0, w=30)))
    # the aggregator sent no model: its own (zeros) is a weight-0 reference row; the
    # weights come normalised, so a bare ``weights @ stack`` is the weighted mean
    assert seen["n"] == 3 and seen["own"] == 2
    assert seen["weights"].tolist() == [0.25, 0.75, 0.0]
    assert torch.allclose(p.params, torch.ones(4))

    q = aggregator(ids, success_fraction=0.5)
    q.handle(MessageReceived(1.0, ids[1], model(5, 1.0, w=10)))
    q.handle(MessageReceived(1.0, ids[2], model(5, 5.0, w=30)))
    assert torch.allclose(q.params, torch.full((4,), 4.0))  # (10*1 + 30*5) / 40

    # unnormalised-weight semantics of the simulator's deferred mean give the same
    bare = aggregator(ids, success_fraction=0.5, aggregate=lambda s, w, o: w @ s)
    bare.handle(MessageReceived(1.0, ids[1], model(5, 1.0)))
    bare.handle(MessageReceived(1.0, ids[2], model(5, 5.0)))
    assert torch.allclose(bare.params, torch.full((4,), 3.0))

    # the aggregator's own trained model is a row of its own: own_index points to it
    r = aggregator(ids, success_fraction=0.5, aggregate=first_row)
    r.handle(MessageReceived(1.0, ids[1], model(5, 1.0)))
    r.handle(MessageReceived(1.0, ids[0], model(5, 3.0)))
    assert seen["n"] == 2 and seen["own"] == 1 and seen["weights"] is None


def test_robust_aggregators_of_the_library_plug_in() -> None:
    aggregation = pytest.importorskip("p2pfl.aggregation")
    ids = peers(10)
    p = aggregator(ids, aggregate=aggregation.get_aggregator("centered_clipping"))
    for i, value in enumerate([1.0, 1.0, 100.0], start=1):
        p.handle(MessageReceived(1.0, ids[i], model(5, value)))
    assert p.aggregating_round is None and torch.isfinite(p.params).all()


def test_stale_models_are_dropped_and_answered_with_status() -> None:
    ids = peers(10)
    p = aggregator(ids)
    p.handle(MessageReceived(1.0, ids[1], model(5, 1.0)))
    # round 6 exists: round 5 is over, its collection is abandoned
    effects = p.handle(MessageReceived(1.1, ids[2], model(6, 2.0)))
    assert p.aggregating_round == 6 and p.round == 6
    assert Record("modest.aggregations_abandoned", 1.0) in effects
    effects = p.handle(MessageReceived(1.2, ids[3], model(5, 1.0)))
    [status] = sends(effects, "status")
    assert status.to == ids[3] and status.message.meta == {"at": 6, "done": 5}
    assert p.aggregating_round == 6


def test_newer_round_cancels_training() -> None:
    ids = peers(10)
    p = make(ids[0], ids, role_slack=len(ids))  # any peer may aggregate here
    p._confirmed = 3  # round 3 is vouched for: rounds up to 5 are taken from one aggregator
    effects = p.handle(MessageReceived(1.0, ids[1], Message("train", 3, torch.ones(4))))
    [old] = of_type(effects, Train)
    effects = p.handle(MessageReceived(1.1, ids[2], Message("train", 3, torch.ones(4))))
    assert not of_type(effects, Train)  # same round from another aggregator: ignored
    effects = p.handle(MessageReceived(1.2, ids[2], Message("train", 5, torch.full((4,), 2.0))))
    [new] = of_type(effects, Train)
    assert torch.equal(p.params, torch.full((4,), 2.0))  # kept for evaluation
    assert p.handle(TrainingDone(1.3, old.ticket, torch.zeros(4))) == []  # abandoned
    effects = p.handle(TrainingDone(1.4, new.ticket, torch.full((4,), 9.0)))
    assert RoundCompleted(5) in effects
    assert sends(effects, "ping") and all(s.message.round == 6 for s in sends(effects, "ping"))
    assert p.handle(MessageReceived(1.5, ids[3], Message("train", 4, torch.ones(4)))) == [
        Record("modest.stale_dropped", 1.0)
    ]


def test_pong_from_a_later_round_abandons_the_delivery() -> None:
    ids = peers(10)
    p = vouched(make(ids[0], ids, sample_size=3, num_aggregators=1, role_slack=len(ids)), 1)
    p.handle(MessageReceived(1.0, ids[1], Message("train", 3, torch.ones(4))))
    effects = p.handle(TrainingDone(1.1, p._next_ticket, torch.ones(4)))
    [ping] = sends(effects, "ping")
    # the run is already at round 6: a member says so (one word moves nothing) ...
    other = next(q for q in ids[2:] if q != ping.to)
    status = Message("status", 6, None, {"at": 6, "done": 5})
    assert Record("modest.claims_pending", 1.0) in p.handle(MessageReceived(1.15, other, status))
    assert p.round == 3
    pong = Message("pong", 4, None, {"at": 6, "done": 5})  # ... and the pong vouches for it
    effects = p.handle(MessageReceived(1.2, ping.to, pong))
    assert not sends(effects, "aggregate")
    assert p.round == 6 and p.done_round == 5


def test_peers_answer_pings_with_their_progress() -> None:
    ids = peers(4)
    p = vouched(make(ids[0], ids), 2)
    p.handle(MessageReceived(0.0, ids[2], model(3, 1.0)))  # a round-3 model: round 2 is done
    [pong] = p.handle(MessageReceived(0.0, ids[1], Message("ping", 4)))
    assert pong == Send(ids[1], Message("pong", 4, None, {"at": 3, "done": 2}))


def test_state_dict_round_trip() -> None:
    ids = peers(6)
    p = vouched(make(ids[0], ids, role_slack=len(ids)), 1)
    p.handle(MessageReceived(1.0, ids[1], Message("train", 3, torch.ones(4))))
    p.handle(SendFailed(1.0, ids[2], Message("ping", 3)))
    p.handle(MessageReceived(1.1, "newcomer", Message("join", 3, None, {"entry": [0, 0, 0]})))
    p.view.merge_entry(ids[5], ViewEntry(2, True, 1))
    state = p.state_dict()
    assert state["protocol"] == "modest"
    q = make(ids[0], ids[:2])
    q.load_state_dict(state)
    assert q.round == p.round == 3
    assert dict(q.view) == dict(p.view)
    assert q.suspects == p.suspects == {ids[2]}
    assert q.state_dict()["pending_joins"] == {"newcomer": [0, 0, 0]}
    assert torch.equal(q.params, p.params)
    assert q.state_dict().keys() == state.keys()
    with pytest.raises(ValueError):
        make(ids[0], ids).load_state_dict({**state, "protocol": "dpsgd"})


def test_constructor_validates_parameters() -> None:
    with pytest.raises(ValueError):
        make("a", ["a"], num_aggregators=5, sample_size=4)
    with pytest.raises(ValueError):
        make("a", ["a"], success_fraction=0.0)
    with pytest.raises(ValueError):
        make("a", ["a"], ping_timeout=0.0)


# --------------------------------------------------------------------------- whole runs


def test_twenty_peers_converge_to_the_target() -> None:
    loop, ids = network(20)
    loop.run(until=30.0, stop=lambda: loop.top_round() >= 20)
    assert loop.top_round() >= 20
    assert torch.allclose(loop.latest_model(), TARGET, atol=1e-3)
    # FL-like cost: per round ~ 2*a*s models, not one per peer
    assert loop.kinds["aggregate"] <= 2 * 4 * 21
    # every peer keeps some model it saw; sampled peers moved off the initial zeros
    moved = [p for p in ids if not torch.equal(loop.protocols[p].params, torch.zeros(4))]
    assert len(moved) >= 15


@pytest.mark.parametrize("loud_failures", [False, True], ids=["silent", "send-failed"])
def test_rounds_go_on_after_eighty_percent_crash(loud_failures: bool) -> None:
    loop, ids = network(20, loud_failures, aggregation_timeout=1.0, suspect_rounds=50)
    loop.run(until=60.0, stop=lambda: loop.top_round() >= 5)
    crash_round = loop.top_round()
    before = (loop.latest_model() - TARGET).norm().item()
    loop.crashed = set(ids[4:])  # 16 of 20 stop answering at once, silently
    survivors = ids[:4]
    loop.run(until=loop.now + 120.0, stop=lambda: loop.top_round() >= crash_round + 10)
    assert loop.top_round() >= crash_round + 10
    after = (loop.latest_model() - TARGET).norm().item()
    assert after < before
    # survivors learnt who is gone and no longer wait on them
    assert any(set(ids[4:]) & loop.protocols[p].suspects for p in survivors)
    for p in survivors:  # nothing piles up: old rounds are pruned
        protocol = loop.protocols[p]
        assert len(protocol._resolvers) <= 3 and len(protocol._deliveries) <= 3
        assert len(protocol._timers) <= 8


def test_single_aggregator_crashing_mid_collection_is_replaced() -> None:
    loop, ids = network(12, num_aggregators=1, sample_size=4, aggregation_timeout=1.0)
    loop.run(until=60.0, stop=lambda: loop.top_round() >= 3)

    def collecting() -> list[str]:
        return [p for p in ids if (agg := loop.protocols[p]._agg) is not None and agg.models]

    loop.run(until=60.0, stop=lambda: bool(collecting()))
    [victim] = collecting()
    stuck_round = loop.protocols[victim].aggregating_round
    assert stuck_round is not None
    loop.crashed = {victim}
    loop.run(until=loop.now + 30.0, stop=lambda: loop.top_round() >= stuck_round + 3)
    assert loop.top_round() >= stuck_round + 3


def test_runs_are_deterministic() -> None:
    results = []
    for _ in range(2):
        loop, ids = network(10, sample_size=3)
        loop.run(until=2.0)
        results.append((loop.now, dict(loop.kinds), dict(loop.completed)))
    assert results[0] == results[1]


def test_late_joiner_is_sampled_after_announcing_itself() -> None:
    loop, ids = network(12, sample_size=3, num_aggregators=1)
    loop.run(until=3.0)
    assert loop.top_round() >= 3
    joiner = make("late", ids, sample_size=3, num_aggregators=1, joining=True)
    loop.protocols["late"] = joiner
    loop.start("late", at=loop.now)
    loop.run(until=loop.now + 60.0, stop=lambda: bool(loop.completed["late"]))
    assert loop.completed["late"], "the joiner never trained"
    assert joiner.round > 3  # it learnt the current round
    assert any("late" in loop.protocols[p].view for p in ids)
    # and the join keeps spreading with the views carried by every model transfer
    joined_at = loop.top_round()
    loop.run(until=loop.now + 60.0, stop=lambda: loop.top_round() >= joined_at + 15)
    assert sum("late" in loop.protocols[p].view for p in ids) >= 10


def test_leave_applies_at_once() -> None:
    ids = peers(6)
    p = make(ids[0], ids)
    q = make(ids[1], ids)
    effects = q.leave(1.0)
    assert q.has_left and q.view[ids[1]].left
    announcements = sends(effects, "leave")
    assert len(announcements) == 3 and ids[1] not in {s.to for s in announcements}
    p.handle(MessageReceived(1.1, ids[1], announcements[0].message))
    assert p.view[ids[1]].left
    assert ids[1] not in derive_candidates(p.view, 9)
    # it takes part in nothing; a ping is answered with the leave (tests/test_s5_modest_leave.py)
    [answer] = sends(q.handle(MessageReceived(1.2, ids[0], Message("ping", 2))), "leave")
    assert answer.to == ids[0] and not sends(q.handle(Start(1.3)), "ping")


def test_join_is_applied_after_the_next_send_and_travels_with_it() -> None:
    ids = peers(6)
    p = make(ids[0], ids, sample_size=1, num_aggregators=1, role_slack=len(ids))
    join = Message("join", 0, None, {"entry": [0, 0, 0]})
    [reply] = p.handle(MessageReceived(1.0, "newcomer", join))
    assert isinstance(reply, Send)
    assert reply.to == "newcomer" and reply.message.kind == "view"
    assert "newcomer" not in p.view  # held back: the current round's sample stays put
    p.handle(MessageReceived(1.1, ids[1], Message("train", 2, torch.ones(4))))
    effects = p.handle(TrainingDone(1.2, p._next_ticket, torch.ones(4)))
    assert "newcomer" not in p.view
    for ping in sends(effects, "ping"):  # answer the pings: the model goes out
        effects += p.handle(
            MessageReceived(1.3, ping.to, Message("pong", 3, None, {"at": 2, "done": 2}))
        )
    [sent] = sends(effects, "aggregate")
    assert sent.message.meta["joins"] == {"newcomer": [0, 0, 0]}
    assert "newcomer" not in sent.message.meta["view"]
    assert "newcomer" in p.view  # applied right after the send


def test_a_peer_seen_as_left_reasserts_itself() -> None:
    ids = peers(6)
    p = make(ids[0], ids)
    stale = {ids[0]: [1, 1, 1]}  # someone thinks we left
    effects = p.handle(MessageReceived(1.0, ids[1], Message("view", 1, None, {"view": stale})))
    assert p.view[ids[0]] == ViewEntry(1, False, 2)
    announcements = sends(effects, "join")
    assert announcements and all(a.message.meta["entry"] == [1, 0, 2] for a in announcements)


# --------------------------------------------------------------------------- the idle watchdog


def idle_peer(ids: list[str], at: int) -> tuple[ModestProtocol, list[Effect]]:
    """A peer that joined a system at round ``at`` and was not sampled since."""
    p = make(ids[0], ids, joining=True, idle_timeout=10.0)
    announced = sends(p.handle(Start(0.0)), "join")
    view = {"view": PopulationView.of(ids).to_wire(), "at": at, "done": at}
    for join in announced[:2]:  # two answers vouch for the round
        p.handle(MessageReceived(0.1, join.to, Message("view", at, None, view)))
    assert p.round == at
    assert p.handle(TimerFired(10.0, "modest.idle")) == [SetTimer("modest.idle", 20.0)]
    effects = p.handle(TimerFired(20.0, "modest.idle"))  # nothing moved for a whole period
    assert Record("modest.restarts", 1.0) in effects
    return p, effects


def answer_pings(p: ModestProtocol, effects: list[Effect], at: int) -> list[Effect]:
    out: list[Effect] = []
    for ping in sends(effects, "ping"):
        meta = {"at": at, "done": at}
        out += p.handle(
            MessageReceived(20.1, ping.to, Message("pong", ping.message.round, None, meta))
        )
    return out


def test_idle_peer_restarts_a_stalled_round_with_its_model() -> None:
    ids = peers(8)
    p, effects = idle_peer(ids, at=3)
    assert {s.message.round for s in sends(effects, "ping")} == {4}
    out = answer_pings(p, effects, at=3)  # everybody is still at round 3: stuck
    trains = sends(out, "train")
    assert all(s.message.round == 4 and s.message.params is p.params for s in trains)
    sample = derive_candidates(p.view, 4)[:4]  # sample_size 4, everybody answered
    assert {s.to for s in trains} == set(sample) - {p.peer_id}


def test_idle_restart_is_abandoned_when_the_system_is_ahead() -> None:
    ids = peers(8)
    p, effects = idle_peer(ids, at=3)
    out = answer_pings(p, effects, at=9)  # the system went on without us: not stuck
    assert not sends(out, "train") and Record("modest.restarts_abandoned", 1.0) in out
    assert p.round == 9 and p.settled


def test_a_fresh_peer_that_finds_the_system_past_round_one_joins() -> None:
    ids = peers(6)
    p = make("fresh", ["fresh", *ids], num_aggregators=1)
    effects = p.handle(Start(0.0))
    [ping] = sends(effects, "ping")
    meta = {"at": 7, "done": 6}
    out = p.handle(MessageReceived(0.1, ping.to, Message("pong", 1, None, meta)))
    assert p.joining and sends(out, "join")
    assert p.round == 0  # one member's word: the round comes with the answers to the join


def test_peers_that_finish_and_leave_do_not_strand_the_others() -> None:
    """Like real nodes: a peer leaves as soon as it completed round R - 1, even if it was
    the aggregator whose model was still to be sent; the last peers restart the lost round."""
    rounds = 12
    ids = peers(5)
    protocols = {
        p: make(p, ids, sample_size=3, num_aggregators=1, success_fraction=0.6, idle_timeout=3.0)
        for p in ids
    }

    class LeavingLoop(Loop):
        def apply(self, peer: str, effects: list[Effect]) -> None:
            super().apply(peer, effects)
            finished = any(isinstance(e, RoundCompleted) and e.round + 1 >= rounds for e in effects)
            if finished and peer not in self.crashed:
                super().apply(peer, self.protocols[peer].leave(self.now))
                self.crashed.add(peer)  # the process exits

    loop = LeavingLoop(protocols, loud_failures=True)
    for p in ids:
        loop.start(p)
    loop.run(until=300.0, stop=lambda: loop.crashed == set(ids))
    assert loop.crashed == set(ids), {p: loop.completed[p][-1:] for p in ids}
    assert loop.records["modest.restarts"] >= 1


class TestLateStarterFirstInRoundOne:
    """A node started after the others may rank first for round 1: it must not restart
    round 1 from its own initial model before it has heard that the system moved on."""

    def setup(self) -> tuple[ModestProtocol, list[str]]:
        ids = peers(6)
        first = derive_candidates(PopulationView.of(ids), 1)[0]
        return make(first, ids, num_aggregators=1), ids

    def test_it_asks_one_more_candidate_before_aggregating_round_one(self) -> None:
        p, ids = self.setup()
        effects = p.handle(Start(0.0))
        pings = sends(effects, "ping")
        assert pings and all(s.to != p.peer_id for s in pings)
        assert not sends(effects, "train") and p.aggregated_round == 0
        # the witness says round 1 is where the system is: it takes round 1 on itself
        p.handle(MessageReceived(0.1, pings[0].to, Message("pong", 1, None, {"at": 0})))
        assert p.aggregated_round == 1 and not p.joining

    def test_a_pong_from_a_system_past_round_one_makes_it_join(self) -> None:
        p, ids = self.setup()
        pings = sends(p.handle(Start(0.0)), "ping")
        effects = p.handle(MessageReceived(0.1, pings[0].to, Message("pong", 1, None, {"at": 9})))
        assert p.aggregated_round == 0 and p.joining
        assert sends(effects, "join")


def test_a_round_completed_with_the_next_in_one_event_carries_its_own_model() -> None:
    """The aggregator of round 5 trains round 4 too: when its own trained model is the
    last one its aggregation waited for, one event completes round 4 and round 5, and by
    then ``params`` is round 5's aggregate. ``RoundCompleted(4)`` carries round 4's model,
    so that a driver evaluates (and the drivers' equivalence test compares) that one; it
    took ``params`` and failed the node-vs-simulator test in about a third of the runs."""
    ids = peers(10)
    first = aggregator(ids)._candidates(5)[0]  # round 5's aggregator: itself, here
    ids = [first] + [peer for peer in ids if peer != first]
    p = aggregator(ids)  # vouched round 4; quorum of round 5's aggregation: 3
    effects = p.handle(MessageReceived(1.0, ids[1], Message("train", 4, torch.ones(4))))
    [train] = of_type(effects, Train)
    p.handle(MessageReceived(1.1, ids[2], model(5, 1.0)))
    p.handle(MessageReceived(1.2, ids[3], model(5, 2.0)))
    effects = p.handle(TrainingDone(1.3, train.ticket, torch.full((4,), 6.0)))
    completed = {effect.round: effect for effect in of_type(effects, RoundCompleted)}
    assert sorted(completed) == [4, 5], effects
    assert torch.equal(completed[4].model(p), torch.full((4,), 6.0))  # its trained model
    assert torch.allclose(p.params, torch.full((4,), 3.0))  # the aggregate, (1 + 2 + 6) / 3
    assert torch.equal(completed[5].model(p), p.params)
