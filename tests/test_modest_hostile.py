"""MoDeST against one hostile peer (issue 12): forged rounds, foreign models, view floods.

Each attack was one message on real nodes. Here the protocol objects are driven the way
both drivers drive them: ``screen`` (the message contract, with MoDeST's roles) first,
``handle`` only for what it lets through. Then a small simulation with one hostile member
that keeps sending all three, next to the same run undisturbed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pfl.protocols.base import (
    Effect,
    Message,
    MessageReceived,
    Record,
    Send,
    TimerFired,
    Train,
)
from p2pfl.protocols.contract import Refusal
from p2pfl.protocols.modest import ModestProtocol, derive_candidates
from p2pfl.protocols.modest.membership import MAX_NEW_MEMBERS, MEMBER_BUDGET
from tests.test_modest import make, peers, vouched
from tests.test_signed_relay import signed

IDS = [*peers(10), "mallory"]  # mallory is a member; "stranger" is not
ROUND = 5


def deliver(
    p: ModestProtocol, sender: str, message: Message, now: float = 1.0
) -> tuple[Refusal | None, list[Effect]]:
    """What a driver does with a received message: screen it, then handle what passes."""
    refusal = p.screen(sender, message)
    if refusal is not None:
        return refusal, []
    return None, p.handle(MessageReceived(now, sender, message))


def counted(effects: list[Effect], name: str) -> float:
    return sum(e.value for e in effects if isinstance(e, Record) and e.name == name)


def honest(**kwargs: Any) -> ModestProtocol:
    """peer-00 at round 5, vouched for, with a model of ones."""
    p = vouched(make(IDS[0], IDS, **kwargs), ROUND)
    p.params = torch.ones(4)
    return p


def progress(kind: str, at: int) -> Message:
    """A message that claims round ``at``, by each way a round reaches a MoDeST peer."""
    if kind == "ping":
        return Message("ping", at + 1)
    meta: dict[str, Any] = {"at": at, "done": at}
    if kind == "view":
        meta["view"] = {}
    return Message(kind, ROUND, None, meta)


# ------------------------------------------------------------------ attack 1: forged progress


@pytest.mark.parametrize("kind", ["status", "pong", "view", "ping"])
def test_a_far_ahead_round_from_one_member_moves_nobody(kind: str) -> None:
    p = honest()
    far = ROUND + 999  # inside max_round_lead: the contract lets it through
    assert deliver(p, "mallory", progress(kind, ROUND + 10**6))[0] is Refusal.FUTURE_ROUND
    for _ in range(3):  # saying it again is still one identity's word
        refusal, effects = deliver(p, "mallory", progress(kind, far))
        assert refusal is None and counted(effects, "modest.claims_pending") == 1.0
    assert p.round == ROUND and p.done_round < ROUND
    # an honest member shows round 6: the highest round two members vouch for is 6
    deliver(p, IDS[1], progress("status", ROUND + 1))
    assert p.round == ROUND + 1 and p.done_round == ROUND


def test_progress_from_a_stranger_is_refused_by_its_role() -> None:
    p = honest()
    for kind in ("status", "view"):
        assert deliver(p, "stranger", progress(kind, ROUND + 999))[0] is Refusal.NOT_ALLOWED
    assert p.round == ROUND


# ------------------------------------------------------------------ attack 2: foreign models


def _rank_of(p: ModestProtocol, peer: str, round_: int) -> int:
    return derive_candidates(p.view, round_).index(peer)


def _round_where(p: ModestProtocol, peer: str, rounds: range) -> int:
    """A round of ``rounds`` whose first candidate is ``peer`` and whose sample has ``p``."""
    for r in rounds:
        if _rank_of(p, peer, r) == 0 and _rank_of(p, p.peer_id, r) < p.sample_size:
            return r
    raise AssertionError("no such round")


def test_a_model_from_a_non_aggregator_is_never_adopted() -> None:
    p = honest()
    poison = torch.full((4,), 50.0)
    # a stranger, far ahead (the zeros of the attack): refused by the contract
    stranger = Message("train", ROUND + 500, torch.zeros(4))
    assert deliver(p, "stranger", stranger)[0] is Refusal.NOT_ALLOWED
    # a member that is not among the aggregators of the next round: the candidates ahead
    # of it are asked whether they are up; they are, so it was nobody's choice
    order = derive_candidates(p.view, ROUND + 1)
    outsider = next(q for q in reversed(order) if q != p.peer_id)
    refusal, effects = deliver(p, outsider, Message("train", ROUND + 1, poison))
    assert refusal is None and counted(effects, "modest.verifications") == 1.0
    checks = [e for e in effects if isinstance(e, Send) and e.message.kind == "ping"]
    assert {e.to for e in checks} == set(order[: order.index(outsider)]) - {p.peer_id}
    refused = 0.0
    for check in checks:
        pong = Message("pong", ROUND, None, {"at": ROUND, "done": ROUND - 1})
        _, effects = deliver(p, check.to, pong, now=1.1)
        assert not [e for e in effects if isinstance(e, Train)]
        refused += counted(effects, "modest.trains_refused")
    assert refused == 1.0
    assert torch.equal(p.params, torch.ones(4)) and p.round == ROUND


def test_an_aggregator_whose_candidates_ahead_are_gone_is_taken_after_a_check() -> None:
    """After a crash the aggregator sits deep in the order, behind dead peers this peer
    never pinged: it pings them, they time out, and the model is trained."""
    p = honest()
    order = derive_candidates(p.view, ROUND + 1)
    aggregator = next(q for q in order[4:] if q != p.peer_id)
    model = torch.full((4,), 2.0)
    _, effects = deliver(p, aggregator, Message("train", ROUND + 1, model))
    assert not [e for e in effects if isinstance(e, Train)]
    effects = p.handle(TimerFired(1.0 + p.ping_timeout, "modest.verify"))  # nobody answered
    [train] = [e for e in effects if isinstance(e, Train)]
    assert torch.equal(train.params, model)
    assert set(order[: order.index(aggregator)]) - {p.peer_id} <= p.suspects


def test_a_peer_aggregates_one_model_only_if_it_is_an_aggregator() -> None:
    r = ROUND + 1
    order = derive_candidates(make(IDS[0], IDS).view, r)
    p = vouched(make(order[-1], IDS, num_aggregators=1), ROUND)  # last in the order of r
    p.params = torch.ones(4)
    trainer = next(q for q in derive_candidates(p.view, r - 1) if q != p.peer_id)
    refusal, _ = deliver(p, trainer, Message("aggregate", r, torch.full((4,), 50.0)))
    assert refusal is None and p.aggregating_round == r
    effects = p.handle(TimerFired(1.0 + p.aggregation_timeout, "modest.aggregate"))
    assert counted(effects, "modest.aggregations_refused") == 1.0
    assert torch.equal(p.params, torch.ones(4))


def test_a_far_ahead_model_from_a_plausible_aggregator_is_held_not_adopted() -> None:
    p = honest()
    far = _round_where(p, "mallory", range(ROUND + 3, ROUND + 1000))
    refusal, effects = deliver(p, "mallory", Message("train", far, torch.zeros(4)))
    assert refusal is None  # mallory may aggregate round `far`...
    assert not [e for e in effects if isinstance(e, Train)]  # ...but nobody vouched for it
    assert torch.equal(p.params, torch.ones(4)) and p.round == ROUND
    assert counted(effects, "modest.trains_held") == 1.0
    assert counted(effects, "modest.claims_pending") == 1.0
    # it asks others, with its own round: a probe never spreads the forged one
    probes = [e for e in effects if isinstance(e, Send) and e.message.kind == "ping"]
    assert probes and all(e.message.round == ROUND for e in probes)
    assert "mallory" not in {e.to for e in probes}
    # the honest answers show round 5: the model stays held, the peer stays put
    for probe in probes:
        deliver(p, probe.to, Message("pong", ROUND, None, {"at": ROUND, "done": ROUND - 1}))
    assert torch.equal(p.params, torch.ones(4)) and p.round == ROUND


def test_a_flood_of_far_ahead_trained_models_holds_one_slot_and_moves_nobody() -> None:
    """An aggregator now holds a trained model whose round is not vouched for yet (it
    dropped it, and waited out its timer for honest early models). One member's flood of
    such models, round after round, keeps one slot (its latest), moves the peer nowhere
    and starts no aggregation; a stranger's is refused by its role before the protocol
    sees it; an honest trainer's model of a near round is still collected."""
    p = honest(sample_size=4, num_aggregators=1, role_slack=len(IDS))
    for far in range(ROUND + 10, ROUND + 200):
        refusal, effects = deliver(p, "mallory", Message("aggregate", far, torch.zeros(4)))
        assert refusal is None and not counted(effects, "modest.held_dropped")
    assert list(p._held) == [("mallory", "aggregate")]
    assert p._held["mallory", "aggregate"].round == ROUND + 199  # its latest only
    assert p.round == ROUND and p.aggregating_round is None
    assert deliver(p, "stranger", Message("aggregate", ROUND + 1, torch.zeros(4)))[0] is Refusal.NOT_ALLOWED
    refusal, _ = deliver(p, IDS[1], Message("aggregate", ROUND + 1, torch.full((4,), 2.0)))
    assert refusal is None and p.aggregating_round == ROUND + 1
    assert list(p._held) == [("mallory", "aggregate")]  # far beyond any vouched round


def test_a_rarely_sampled_peer_catches_up_once_a_second_member_vouches() -> None:
    p = honest()
    aggregator = IDS[3]
    real = _round_where(p, aggregator, range(ROUND + 3, ROUND + 1000))
    model = torch.full((4,), 2.0)
    refusal, effects = deliver(p, aggregator, Message("train", real, model))
    assert refusal is None and not [e for e in effects if isinstance(e, Train)]
    probe = next(e for e in effects if isinstance(e, Send) and e.message.kind == "ping")
    _, effects = deliver(p, probe.to, Message("pong", ROUND, None, {"at": real, "done": real}))
    [train] = [e for e in effects if isinstance(e, Train)]
    assert torch.equal(train.params, model) and p.round == real
    assert counted(effects, "modest.catch_ups") == 1.0


# ------------------------------------------------------------------ attack 3: view floods


def flood(n: int, tag: str = "fake") -> Message:
    view = {f"{tag}-{i}": [0, 0, 0] for i in range(n)}
    return Message("view", ROUND, None, {"view": view, "at": ROUND, "done": ROUND})


def test_a_flood_of_unsigned_names_grows_the_view_by_a_few_per_sender() -> None:
    p = honest()
    size = len(p.view)
    assert deliver(p, "stranger", flood(20_000))[0] is Refusal.NOT_ALLOWED
    refusal, effects = deliver(p, "mallory", flood(20_000))
    assert refusal is None and len(p.view) == size + MAX_NEW_MEMBERS
    assert counted(effects, "modest.entries_refused") == 20_000 - MAX_NEW_MEMBERS
    for i in range(5):  # more messages: the sender's budget runs out
        deliver(p, "mallory", flood(20_000, tag=f"more{i}"))
    assert len(p.view) == size + MEMBER_BUDGET
    # another sender has a budget of its own, but a message carries only a few new names
    deliver(p, IDS[1], flood(100, tag="relayed"))
    assert len(p.view) == size + MEMBER_BUDGET + MAX_NEW_MEMBERS


def test_signed_views_take_no_unproven_names_at_all() -> None:
    p = signed(IDS[0], IDS)
    size = len(p.view)
    refusal, effects = deliver(p, "mallory", flood(20_000))
    assert refusal is None and len(p.view) == size
    assert counted(effects, "modest.entries_refused") == 20_000
    # the sender's own entry is proven by its connection, even unsigned
    own = Message("view", ROUND, None, {"view": {"mallory": [0, 0, 0]}, "at": 0, "done": 0})
    q = signed(IDS[0], IDS[:10])
    q._announced_to.add("mallory")  # it answers our join
    assert deliver(q, "mallory", own)[0] is None and "mallory" in q.view


def test_a_peer_signs_its_own_bottom_entry() -> None:
    p = signed(IDS[0], IDS)
    wire = p.membership.view_wire()
    assert len(wire[IDS[0]]) == 4  # [0, 0, 0, record]: checkable by everyone
    assert wire[IDS[1]] == [0, 0, 0]  # what it cannot prove, it relays bare


# ------------------------------------------------------------------ one hostile peer in a run


class Hostile(ModestProtocol):
    """A member that takes part like the others, and every ``period`` of virtual time sends
    one attack to every other peer: forged progress, foreign models, or a view flood."""

    attack: str = ""
    period = 0.05
    next_at = 0.0
    sent = 0
    targets: list[str] = []

    def handle(self, event: Any) -> list[Effect]:
        out = super().handle(event)
        now = getattr(event, "now", None)
        if now is not None and now >= self.next_at:
            self.next_at = now + self.period
            self.sent += 1
            out = out + [Send(p, m) for p in self.targets for m in self.attack_messages()]
        return out

    def attack_messages(self) -> list[Message]:
        r, dim = self.round, self.params.numel()
        if self.attack == "status":
            return [Message("status", r, None, {"at": r + 999, "done": r + 999})]
        if self.attack == "train":
            # the zeros far ahead, and a poisoned next round from a peer nobody chose as
            # its aggregator (an aggregator of the round is trusted with it: MoDeST)
            messages = [Message("train", r + 500, torch.zeros(dim))]
            if not self._within(self.peer_id, r + 1, self._ranks("aggregate")):
                messages.append(Message("train", r + 1, torch.full((dim,), 5.0)))
            return messages
        fake = {f"fake-{self.sent}-{i}": [0, 0, 0] for i in range(500)}
        return [Message("view", r, None, {"view": fake, "at": r, "done": self._done})]


ROUNDS = 20


@pytest.fixture(scope="module")
def digits():
    from p2pfl.learning import load_dataset

    return load_dataset("digits", seed=1)


def _run(digits: Any, attack: str | None, sign: bool) -> dict[str, Any]:
    """The crash80 example shrunk to 20 peers (no crash), with peer 19 hostile or not."""
    from sim.runner import build_simulation, run_simulation
    from tests.test_modest_sim import example

    overrides = [
        f"rounds={ROUNDS}",
        f"sim.eval_every={ROUNDS}",
        f"sim.sign_relayed={str(sign).lower()}",
    ]
    simulation = build_simulation(example("crash80", *overrides, disruptions=[]), dataset=digits)
    engine = simulation.engine
    if attack is not None:
        hostile = engine.protocols[-1]
        hostile.__class__ = Hostile
        assert isinstance(hostile, Hostile)
        hostile.attack = attack
        hostile.targets = [p.peer_id for p in engine.protocols[:-1]]
    rows = run_simulation(simulation, show_progress=False)
    honest = [p for p in engine.protocols[:-1] if isinstance(p, ModestProtocol)]
    assert len(honest) == len(engine.protocols) - 1  # all MoDeST peers
    return {
        "round": rows[-1]["round"],
        "acc": rows[-1]["acc_mean"],
        "time": rows[-1]["virtual_time"],
        "top": max(p.round for p in honest),
        "view": max(len(p.view) for p in honest),
        "records": dict(engine.records),
        "attacks": getattr(engine.protocols[-1], "sent", 0),
    }


@pytest.mark.parametrize(
    ("attack", "sign"),
    [("status", False), ("train", False), ("view", True), ("view", False)],
    ids=["status", "train", "view-signed", "view-unsigned"],
)
def test_honest_peers_finish_their_rounds_next_to_a_hostile_member(
    digits: Any, attack: str, sign: bool
) -> None:
    calm = _run(digits, None, sign)
    run = _run(digits, attack, sign)
    records = run["records"]
    assert run["attacks"] >= 5
    assert run["round"] == calm["round"] == ROUNDS  # every round, none skipped
    assert run["top"] <= calm["top"] + 1  # nobody dragged ahead
    assert abs(run["acc"] - calm["acc"]) <= 0.03, (run["acc"], calm["acc"])
    if attack == "status":
        assert records["modest.claims_pending"] > calm["records"]["modest.claims_pending"]
        assert run["time"] <= 1.1 * calm["time"]
    elif attack == "train":
        assert records["modest.trains_refused"] > 0 and records["modest.trains_held"] > 0
        assert run["time"] <= 1.1 * calm["time"]
    elif sign:  # no unproven name gets in
        assert run["view"] == calm["view"] and records["modest.entries_refused"] > 0
    else:  # unsigned: a few per sender, relayed by honest peers at most a few each
        assert calm["view"] < run["view"] <= calm["view"] + 2 * MEMBER_BUDGET
        assert records["modest.entries_refused"] > 0
