"""Relayed data stays verifiable from its origin (issue 8): signed MoDeST view entries and
signed SybilWall histories, against a hostile relayer that forges, fabricates and replays.

The protocols are driven by hand, and whole MoDeST runs by ``tests.test_modest.Loop``;
peers get their keys from a ``Keyring`` (the simulator's way), so names stay readable.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch

from p2pfl.identity import Identity
from p2pfl.protocols.base import Message, MessageReceived, Record, Send, Start, Train, TrainingDone
from p2pfl.protocols.modest import ModestProtocol, ViewEntry
from p2pfl.protocols.modest.signed import SignedMembership, entry_record
from p2pfl.protocols.records import IdentitySigner, Keyring, RecordSigner
from p2pfl.protocols.sybilwall import HISTORY, SybilWall, history_digest, history_record
from tests.test_modest import TARGET, Loop, make, peers, sends

NAMES = [*peers(20), "late", "mallory"]
KEYS = Keyring.derive(NAMES, seed=11)


class Counting(RecordSigner):
    """A signer that counts its verifications (to show what is *not* verified)."""

    def __init__(self, inner: RecordSigner) -> None:
        self.inner = inner
        self.verified = 0

    def sign(self, record: dict[str, Any]) -> bytes:
        return self.inner.sign(record)

    def verify(self, data: Any) -> tuple[str, dict[str, Any]] | None:
        self.verified += 1
        return self.inner.verify(data)


def verifications(signer: RecordSigner | None) -> int:
    """How many records ``signer`` verified: a :class:`Counting`, as the helpers here build."""
    assert isinstance(signer, Counting)
    return signer.verified


def signed(peer: str, population: list[str], **kwargs: Any) -> ModestProtocol:
    return make(peer, population, signer=Counting(KEYS.signer(peer)), **kwargs)


def bad_entries(effects: list) -> float:
    return sum(e.value for e in effects if isinstance(e, Record) and e.name == "modest.bad_entry")


def entry_wire(peer: str, entry: ViewEntry) -> list:
    """``peer``'s own signed entry, as it relays."""
    return [*entry.to_wire(), KEYS.signer(peer).sign(entry_record(entry))]


def view_message(view: dict[str, list], round_: int = 1) -> Message:
    return Message("view", round_, None, {"view": view, "at": 0, "done": 0})


# ----------------------------------------------------------------------------- records


def test_identity_signer_round_trip_and_refusals() -> None:
    alice, bob = Identity.generate(b"\x01" * 32), Identity.generate(b"\x02" * 32)
    signer = IdentitySigner(alice)
    data = signer.sign({"k": "x", "r": 3})
    assert IdentitySigner(bob).verify(data) == (alice.peer_id, {"k": "x", "r": 3})
    tampered = data[:-70] + bytes([data[-70] ^ 1]) + data[-69:]
    for junk in (tampered, data[:-1], b"", None, "text", data + b"\x00", b"\x00" * 5000):
        assert signer.verify(junk) is None
    # a keyring translates names and keys both ways; keys outside it are unknown
    assert KEYS.signer("peer-00").verify(KEYS.signer("peer-01").sign({"a": 1})) == ("peer-01", {"a": 1})
    assert KEYS.signer("peer-00").verify(data) is None
    assert Keyring.derive(["a"], seed=1).identities["a"].peer_id == Keyring.derive(["a"], 1).identities["a"].peer_id


# ----------------------------------------------------------------------------- MoDeST


def test_forged_entries_about_an_honest_peer_are_dropped_and_counted() -> None:
    """Mallory relays a view that marks peer-02 as left and bumps peer-03's round."""
    ids = peers(6)
    me = signed(ids[0], ids)
    forged_left = ViewEntry(0, True, 1)
    forged_round = ViewEntry(9, False, 0)
    view: dict[str, list[Any]] = {
        # signed by mallory, not by the peer the entry is about
        ids[2]: [*forged_left.to_wire(), KEYS.signer("mallory").sign(entry_record(forged_left))],
        # not signed at all
        ids[3]: forged_round.to_wire(),
        # peer-04's genuine record of round 2, with the claim bumped to round 9
        ids[4]: [9, 0, 0, entry_wire(ids[4], ViewEntry(2, False, 0))[3]],
        # garbage
        ids[5]: [1, 2],
    }
    effects = me.handle(MessageReceived(1.0, "mallory", view_message(view)))
    assert bad_entries(effects) == 4
    assert all(me.view[p] == ViewEntry() for p in ids[1:])  # nothing changed
    assert "mallory" not in me.view  # and the relayer was not even listed
    # the same claims unsigned are what an unsigned peer takes at face value
    plain = make(ids[0], ids)
    plain.handle(MessageReceived(1.0, "mallory", view_message({ids[2]: [0, 1, 1]})))
    assert plain.view[ids[2]].left


def test_forged_entries_in_model_messages_and_joins_are_dropped() -> None:
    ids = peers(6)
    me = signed(ids[0], ids)
    meta = {
        "view": {ids[2]: [5, 1, 1], "mallory": entry_wire("mallory", ViewEntry(7, False, 0))},
        "joins": {ids[3]: [4, 0, 1]},  # an unsigned re-join on peer-03's behalf
    }
    effects = me.handle(MessageReceived(1.0, "mallory", Message("train", 7, torch.ones(4), meta)))
    assert bad_entries(effects) == 2
    assert me.view[ids[2]] == ViewEntry() and not me.membership.pending_joins
    # mallory's own entry, signed by mallory, is fine: that is how a sender's activity shows
    assert me.view["mallory"] == ViewEntry(7, False, 0)


def test_replayed_older_record_changes_nothing_and_costs_no_verification() -> None:
    ids = peers(4)
    me = signed(ids[0], ids)
    old, new = ViewEntry(2, False, 0), ViewEntry(5, False, 0)
    me.handle(MessageReceived(1.0, ids[1], view_message({ids[2]: entry_wire(ids[2], new)})))
    assert me.view[ids[2]] == new
    counter = me.signer
    assert isinstance(counter, Counting)
    before = counter.verified
    replay = {ids[2]: entry_wire(ids[2], old)}  # genuine, but older than what we hold
    effects = me.handle(MessageReceived(1.1, "mallory", view_message(replay)))
    assert me.view[ids[2]] == new and bad_entries(effects) == 0
    assert counter.verified == before  # not newer: never verified
    # passing the old record off as newer does not work either: the claim must match it
    disguised = {ids[2]: [6, 0, 0, replay[ids[2]][3]]}
    effects = me.handle(MessageReceived(1.2, "mallory", view_message(disguised)))
    assert me.view[ids[2]] == new and bad_entries(effects) == 1
    # and a replayed leave cannot undo a newer re-join
    left, back = ViewEntry(3, True, 1), ViewEntry(4, False, 2)
    me.handle(MessageReceived(1.3, ids[1], view_message({ids[3]: entry_wire(ids[3], back)})))
    me.handle(MessageReceived(1.4, "mallory", view_message({ids[3]: entry_wire(ids[3], left)})))
    assert me.view[ids[3]] == back


def test_genuine_entries_travel_two_hops_and_are_verified_once() -> None:
    """a signs its entry; b hears it from a; c hears it from b (2 hops); d from c (3)."""
    ids = peers(5)
    a, b, c, d = (signed(p, ids) for p in ids[:4])
    a.view.touch(a.peer_id, 4)
    a.leave(2.0)  # a's newest entry: left at round 4, counter 1
    assert a.view[a.peer_id] == ViewEntry(4, True, 1)
    hop1 = view_message(a.membership.view_wire())
    b.handle(MessageReceived(2.1, a.peer_id, hop1))
    c.handle(MessageReceived(2.2, b.peer_id, view_message(b.membership.view_wire())))
    d.handle(MessageReceived(2.3, c.peer_id, view_message(c.membership.view_wire())))
    for p in (b, c, d):
        assert p.view[a.peer_id] == ViewEntry(4, True, 1)
    # relayed verbatim: the record c got is the one a signed
    assert c.membership.view_wire()[a.peer_id][3] == hop1.meta["view"][a.peer_id][3]
    # the same view again costs no verification: only entries that change the view are checked
    verified = verifications(d.signer)
    d.handle(MessageReceived(2.4, c.peer_id, view_message(c.membership.view_wire())))
    assert verifications(d.signer) == verified


def test_signed_state_dict_keeps_the_records() -> None:
    ids = peers(4)
    a, b = signed(ids[0], ids), signed(ids[1], ids)
    a.view.touch(a.peer_id, 3)
    b.handle(MessageReceived(1.0, a.peer_id, view_message(a.membership.view_wire())))
    b.handle(MessageReceived(1.1, "x", Message("join", 3, None, {"entry": entry_wire("late", ViewEntry(0, False, 2))})))
    state = b.state_dict()
    again = signed(ids[1], ids[:2])
    again.load_state_dict(state)
    assert again.membership.state_dict() == b.membership.state_dict()
    assert isinstance(again.membership, SignedMembership)
    assert isinstance(b.membership, SignedMembership)
    assert again.membership.proofs == b.membership.proofs
    c = signed(ids[2], ids)
    c.handle(MessageReceived(1.2, b.peer_id, view_message(again.membership.view_wire())))
    assert c.view[ids[0]] == ViewEntry(3, False, 0)  # the restored peer relays a's record


def test_a_peer_seen_as_left_by_its_own_old_record_reasserts_itself_but_not_for_a_forgery() -> None:
    ids = peers(4)
    me = signed(ids[0], ids)
    forged = {ids[0]: [1, 1, 1, KEYS.signer("mallory").sign(entry_record(ViewEntry(1, True, 1)))]}
    effects = me.handle(MessageReceived(1.0, "mallory", view_message(forged)))
    assert bad_entries(effects) == 1 and me.view[ids[0]] == ViewEntry() and not sends(effects, "join")
    own_old = {ids[0]: entry_wire(ids[0], ViewEntry(1, True, 1))}  # say, from a lost checkpoint
    effects = me.handle(MessageReceived(1.1, ids[1], view_message(own_old)))
    assert me.view[ids[0]] == ViewEntry(1, False, 2)
    joins = sends(effects, "join")
    assert joins and all(j.message.meta["entry"][:3] == [1, 0, 2] for j in joins)
    assert KEYS.signer(ids[1]).verify(joins[0].message.meta["entry"][3]) == (
        ids[0], entry_record(ViewEntry(1, False, 2))
    )


def _signed_network(n: int, **kwargs: Any) -> tuple[Loop, list[str]]:
    ids = peers(n)
    loop = Loop({p: signed(p, ids, **kwargs) for p in ids})
    for p in ids:
        loop.start(p)
    return loop, ids


def test_signed_run_makes_the_same_decisions_as_an_unsigned_one() -> None:
    """Signing changes what travels, not what honest peers decide: same rounds, same model."""
    runs = []
    for sign in (False, True):
        ids = peers(12)
        build = signed if sign else make
        loop = Loop({p: build(p, ids, sample_size=3) for p in ids})
        for p in ids:
            loop.start(p)

        def done(loop: Loop = loop) -> bool:
            return loop.top_round() >= 12

        loop.run(until=30.0, stop=done)
        runs.append(loop)
    plain, sig = runs
    assert sig.top_round() >= 12 and sig.records.get("modest.bad_entry", 0) == 0
    assert dict(sig.completed) == dict(plain.completed)
    assert torch.equal(sig.latest_model(), plain.latest_model())
    assert torch.allclose(sig.latest_model(), TARGET, atol=1e-2)
    for p in sig.protocols:
        assert dict(sig.protocols[p].view) == dict(plain.protocols[p].view)


def test_signed_late_joiner_is_sampled_and_its_join_spreads() -> None:
    loop, ids = _signed_network(12, sample_size=3, num_aggregators=1)
    loop.run(until=3.0)
    assert loop.top_round() >= 3
    joiner = signed("late", ids, sample_size=3, num_aggregators=1, joining=True)
    loop.protocols["late"] = joiner
    loop.start("late", at=loop.now)
    loop.run(until=loop.now + 60.0, stop=lambda: bool(loop.completed["late"]))
    assert loop.completed["late"], "the joiner never trained"
    joined_at = loop.top_round()
    loop.run(until=loop.now + 60.0, stop=lambda: loop.top_round() >= joined_at + 15)
    assert sum("late" in loop.protocols[p].view for p in ids) >= 10
    assert loop.records.get("modest.bad_entry", 0) == 0


def test_a_hostile_relayer_in_a_signed_run_cannot_evict_honest_peers() -> None:
    """Mallory, a member, rewrites every view it relays: everyone else left. Unsigned,
    that empties the others' samples; signed, every forgery is dropped and counted."""
    outcomes = {}
    for sign in (False, True):
        ids = [*peers(8), "mallory"]
        build = signed if sign else make
        protocols = {p: build(p, ids, sample_size=3, num_aggregators=1) for p in ids}
        loop = Loop(protocols)
        original = loop.apply

        def tamper(peer: str, effects: list, original=original, sign=sign) -> None:
            if peer == "mallory":
                effects = [_forge(e, sign) for e in effects]
            original(peer, effects)

        loop.apply = tamper  # type: ignore[method-assign]
        for p in ids:
            loop.start(p)

        def done(loop: Loop = loop) -> bool:
            return loop.top_round() >= 15

        loop.run(until=40.0, stop=done)
        honest = [loop.protocols[p] for p in ids if p != "mallory"]
        marked_left = sum(e.left for p in honest for q, e in p.view.items() if q != "mallory")
        outcomes[sign] = (loop.top_round(), marked_left, loop.records.get("modest.bad_entry", 0))
    assert outcomes[False][1] > 0  # unsigned: honest peers believe the forgeries
    rounds, marked_left, bad = outcomes[True]
    assert marked_left == 0 and bad > 0 and rounds >= 15


def _forge(effect: Any, sign: bool) -> Any:
    """Mallory's rewrite: every entry about somebody else becomes "left" (counter 9)."""
    if not isinstance(effect, Send) or "view" not in effect.message.meta:
        return effect
    message = effect.message
    view = dict(message.meta["view"])
    for peer, raw in view.items():
        if peer != "mallory":
            view[peer] = [raw[0], 1, 9, *raw[3:]] if sign else [raw[0], 1, 9]
    meta = {**message.meta, "view": view}
    return Send(effect.to, Message(message.kind, message.round, message.params, meta))


# ----------------------------------------------------------------------------- SybilWall


def wall(peer: str, neighbours: list[str], **kwargs: Any) -> SybilWall:
    return SybilWall(peer, torch.zeros(3), neighbours, signer=Counting(KEYS.signer(peer)), seed=3, **kwargs)


def train_round(protocol: SybilWall, trained: torch.Tensor, now: float = 0.0) -> list:
    """Start (or go on with) a round and answer its Train effect with ``trained``."""
    effects = protocol.handle(Start(now)) if protocol.phase == "idle" else []
    ticket = protocol._next_ticket
    assert protocol.phase == "training" and (not effects or isinstance(effects[0], Train))
    return protocol.handle(TrainingDone(now + 0.1, ticket, trained))


def history_message(
    subject: str, history: torch.Tensor, round_: int, hops: int, proof: Any, tag: int = 0
) -> Message:
    """A relayed declaration of ``subject``'s round ``round_``, gossiped in round ``tag``."""
    meta = {"subject": subject, "hops": hops, "hr": round_, "proof": proof}
    return Message(HISTORY, tag, history, meta)


def end_round(protocol: SybilWall, now: float = 0.5) -> None:
    """Every neighbour's model of the current round arrives: the round ends, its gossip
    is applied."""
    round_ = protocol.round
    for peer in protocol.neighbours:
        protocol.handle(MessageReceived(now, peer, Message("model", round_, torch.zeros(3))))
    assert protocol.round == round_ + 1


def finish_rounds(protocol: SybilWall, through: int) -> None:
    """Train and end rounds until round ``through`` has ended."""
    while protocol.round <= through:
        train_round(protocol, protocol.params.clone())
        end_round(protocol)


def genuine(subject: str, history: torch.Tensor, round_: int) -> bytes:
    return KEYS.signer(subject).sign(history_record(history, round_))


def records_named(effects: list, name: str) -> float:
    return sum(e.value for e in effects if isinstance(e, Record) and e.name == name)


def test_sybilwall_signs_its_own_history_and_gossips_it() -> None:
    me = wall("peer-00", ["peer-01"])
    effects = train_round(me, torch.tensor([1.0, 2.0, 3.0]))
    [gossip] = [e for e in effects if isinstance(e, Send) and e.message.kind == HISTORY]
    meta = gossip.message.meta
    assert meta["subject"] == "peer-00" and meta["hops"] == 0 and meta["hr"] == 0
    assert gossip.message.params is not None
    assert torch.equal(gossip.message.params, torch.tensor([1.0, 2.0, 3.0]))
    opened = KEYS.signer("peer-01").verify(meta["proof"])
    assert opened is not None
    origin, record = opened
    assert origin == "peer-00" and record["d"] == history_digest(gossip.message.params)


def test_fabricated_histories_of_an_honest_peer_are_dropped_and_counted() -> None:
    """mallory (a neighbour) relays histories of honest peer-05, who is 2 hops away.

    (Each attempt goes to a fresh peer: a neighbour has one history per round.)"""
    real = torch.tensor([1.0, 0.0, 0.0])
    fake = torch.tensor([0.0, 5.0, 5.0])  # e.g. a twin of one of mallory's Sybils
    attempts = [
        history_message("peer-05", fake, 2, 1, None),  # unsigned
        history_message("peer-05", fake, 2, 1, KEYS.signer("mallory").sign(history_record(fake, 2))),
        history_message("peer-05", fake, 2, 1, genuine("peer-05", real, 2)),  # real record, other tensor
        history_message("peer-05", fake, 3, 1, genuine("peer-05", fake, 2)),  # round claim bumped
        history_message("peer-05", fake, 2, 1, b"\x00" * 200),
    ]
    genuine_one = history_message("peer-05", real, 2, 1, genuine("peer-05", real, 2))
    for message in attempts:
        me = wall("peer-00", ["peer-01", "mallory"])
        train_round(me, torch.ones(3))
        effects = me.handle(MessageReceived(0.2, "mallory", message))
        assert records_named(effects, "sybilwall.bad_history") == 1
        # mallory's one history this round was that: the next is not even looked at
        verified = verifications(me.signer)
        effects = me.handle(MessageReceived(0.25, "mallory", genuine_one))
        assert records_named(effects, "sybilwall.extra_history") == 1
        assert verifications(me.signer) == verified
        end_round(me)
        assert "peer-05" not in me.gossiped
    # the genuine history, relayed by the same mallory, is accepted: origin is what counts
    me = wall("peer-00", ["peer-01", "mallory"])
    train_round(me, torch.ones(3))
    effects = me.handle(MessageReceived(0.3, "mallory", genuine_one))
    assert not effects and "peer-05" not in me.gossiped  # kept until its round ends
    end_round(me)
    assert torch.equal(me.gossiped["peer-05"][0], real) and me.gossiped["peer-05"][1] == 2


def test_replayed_older_history_is_refused_without_verification() -> None:
    me = wall("peer-00", ["peer-01", "mallory"])
    train_round(me, torch.ones(3))
    old, new = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])
    me.handle(MessageReceived(0.2, "peer-01", history_message("peer-05", new, 4, 1, genuine("peer-05", new, 4))))
    end_round(me)
    verified = verifications(me.signer)
    replay = history_message("peer-05", old, 3, 1, genuine("peer-05", old, 3), tag=1)
    effects = me.handle(MessageReceived(0.6, "mallory", replay))
    assert records_named(effects, "sybilwall.stale_history") == 1
    assert verifications(me.signer) == verified
    assert torch.equal(me.gossiped["peer-05"][0], new)


def test_in_one_round_the_newest_declaration_wins_whatever_came_first() -> None:
    """Two neighbours relay declarations of one subject in the same round: the newer one is
    kept, in either order of arrival (both are verified on arrival, neither is stale yet)."""
    old, new = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])
    relayed = [
        ("mallory", history_message("peer-05", old, 3, 1, genuine("peer-05", old, 3))),
        ("peer-01", history_message("peer-05", new, 4, 1, genuine("peer-05", new, 4))),
    ]
    for order in (relayed, relayed[::-1]):
        me = wall("peer-00", ["peer-01", "mallory"])
        train_round(me, torch.ones(3))
        for sender, message in order:
            me.handle(MessageReceived(0.2, sender, message))
        end_round(me)
        assert me.proofs["peer-05"][0] == 4 and torch.equal(me.gossiped["peer-05"][0], new)


def test_signed_histories_travel_two_hops() -> None:
    """A line s - a - b - c: c scores s's own history, relayed twice, and can check it."""
    s, a, b, c = wall("peer-10", ["peer-11"]), wall("peer-11", ["peer-10", "peer-12"]), wall(
        "peer-12", ["peer-11", "peer-13"]
    ), wall("peer-13", ["peer-12"])
    effects = train_round(s, torch.tensor([0.5, -1.0, 2.0]))
    [own] = [e.message for e in effects if isinstance(e, Send) and e.message.kind == HISTORY]
    a.handle(MessageReceived(0.2, "peer-10", own))
    finish_rounds(a, 0)
    assert "peer-10" in a.declared  # a's neighbour's self-declared history, kept for relaying
    hop = a._history_message("peer-10")
    b.handle(MessageReceived(0.3, "peer-11", hop))
    finish_rounds(b, hop.round)
    assert b.gossiped["peer-10"][1] == 2
    hop = b._history_message("peer-10")
    c.handle(MessageReceived(0.4, "peer-12", hop))
    finish_rounds(c, hop.round)
    history, hops = c.gossiped["peer-10"]
    assert hops == 3 and torch.equal(history, torch.tensor([0.5, -1.0, 2.0]))
    assert c._history_message("peer-10").meta["proof"] == own.meta["proof"]  # verbatim


def _round(protocol: SybilWall, trained: torch.Tensor, neighbour_model: torch.Tensor, now: float) -> None:
    """One full round of a peer with one neighbour ``peer-01``."""
    train_round(protocol, trained, now)
    protocol.handle(MessageReceived(now + 0.2, "peer-01", Message("model", protocol.round, neighbour_model)))


def test_sybilwall_declares_the_sum_of_its_sent_models_and_keeps_its_starts() -> None:
    me = wall("peer-00", ["peer-01"], history_window=2)
    starts, sent = [], []
    for r in range(4):
        starts.append(me.params.clone())
        trained = me.params + torch.tensor([1.0, float(r), 0.0])
        sent.append(trained)
        _round(me, trained, torch.tensor([0.0, 0.0, float(r)]), now=float(r))
        assert me.round == r + 1
    # sum(..., start): a tensor, also to mypy (0 + the first tensor is that tensor)
    assert me.sent_sum is not None and me.start_sum is not None
    assert torch.allclose(me.sent_sum, sum(sent, torch.zeros(3))) and me.sent_upto == 3
    starts.append(me.params.clone())  # round 4 has started
    assert torch.allclose(me.start_sum, sum(starts, torch.zeros(3))) and me.start_upto == 4
    # C(r) is known for the window (rounds 3, 4) and the round before it
    known = me._starts_until()
    assert sorted(known) == [2, 3, 4]
    assert torch.allclose(known[2], sum(starts[:3], torch.zeros(3)))
    # a jump over rounds 5..6 counts them as started, and sent, from the model it had
    before_sent, before_start, model = me.sent_sum.clone(), me.start_sum.clone(), me.params.clone()
    me.handle(MessageReceived(5.0, "peer-01", Message("model", 7, torch.zeros(3))))
    assert me.round == 7 and me.start_upto == 7 and me.sent_upto == 6
    assert torch.allclose(me.sent_sum, before_sent + 3 * model)  # rounds 4 (abandoned), 5, 6
    assert torch.allclose(me.start_sum, before_start + 3 * model)  # rounds 5, 6, 7


def test_far_rows_are_what_the_peer_would_have_observed() -> None:
    """A far subject's declared sum D, minus our own starts up to its round, is the history
    we would have kept had it been our neighbour: sum of (its model - our start)."""
    me = wall("peer-00", ["peer-01"], history_window=3)
    starts = []
    for r in range(3):
        starts.append(me.params.clone())
        _round(me, me.params + 1.0, torch.full((3,), float(r)), now=float(r))
    q_models = [torch.tensor([2.0, 0.0, 1.0]), torch.tensor([3.0, 1.0, 1.0])]  # rounds 0, 1
    declared = q_models[0] + q_models[1]
    relayed = history_message("peer-09", declared, 1, 1, genuine("peer-09", declared, 1), tag=3)
    me.handle(MessageReceived(3.1, "peer-01", relayed))
    _round(me, me.params + 1.0, torch.zeros(3), now=3.0)  # round 3 ends: the gossip is in
    [row] = me._far_rows()
    expected = (q_models[0] - starts[0]) + (q_models[1] - starts[1])
    assert torch.allclose(row, expected)
    # once round 1 has left the window, the declaration can no longer be aligned: not scored
    for r in range(4, 6):
        _round(me, me.params + 1.0, torch.zeros(3), now=float(r))
    assert me._far_rows() == [] and "peer-09" in me.gossiped  # still relayable


def test_sybilwall_signed_checkpoint_keeps_records() -> None:
    me = wall("peer-00", ["peer-01", "peer-02"])
    train_round(me, torch.ones(3))
    h = torch.tensor([3.0, 0.0, 1.0])
    me.handle(MessageReceived(0.2, "peer-01", history_message("peer-05", h, 2, 1, genuine("peer-05", h, 2))))
    me.handle(MessageReceived(0.2, "peer-02", history_message("peer-01", h, 1, 0, genuine("peer-01", h, 1))))
    end_round(me)
    again = wall("peer-00", ["peer-01", "peer-02"])
    again.load_state_dict(me.state_dict())
    assert again.sent_sum is not None and me.sent_sum is not None
    assert again.start_sum is not None and me.start_sum is not None
    assert torch.equal(again.sent_sum, me.sent_sum) and again.own_proof == me.own_proof
    assert torch.equal(again.start_sum, me.start_sum) and again.start_upto == me.start_upto
    assert again.proofs == me.proofs and set(again.declared) == {"peer-01"}
    for subject in ("peer-05", "peer-01", "peer-00"):
        message = again._history_message(subject)
        other = wall("peer-03", ["peer-00"])
        other.handle(MessageReceived(0.5, "peer-00", message))
        finish_rounds(other, message.round)
        assert subject in other.gossiped or subject in other.declared


@pytest.mark.parametrize("sign", [False, True], ids=["unsigned", "signed"])
def test_sybilwall_hostile_relayer_frames_an_honest_neighbour_only_when_unsigned(sign: bool) -> None:
    """Mallory gossips fabricated twins of honest neighbour a's history under the names of
    honest far peers: unsigned, a looks like a Sybil and loses its weight; signed, the
    fabrications are dropped and a keeps its weight. (One twin suffices; a second one in
    the same round is dropped unread: a neighbour has one history per round.)"""
    kwargs: dict[str, Any] = {"signer": Counting(KEYS.signer("peer-00"))} if sign else {}
    me = SybilWall("peer-00", torch.zeros(3), ["peer-01", "peer-02", "mallory"], seed=3, **kwargs)
    train_round(me, torch.tensor([1.0, 0.0, 0.0]))
    a_update = torch.tensor([0.0, 2.0, 1.0])
    bad = extra = 0.0
    for far in ("peer-07", "peer-08"):
        meta: dict[str, Any] = {"subject": far, "hops": 1}
        if sign:
            meta |= {"hr": 0, "proof": KEYS.signer("mallory").sign(history_record(a_update * 3, 0))}
        effects = me.handle(MessageReceived(0.15, "mallory", Message(HISTORY, 0, a_update * 3, meta)))
        bad += records_named(effects, "sybilwall.bad_history")
        extra += records_named(effects, "sybilwall.extra_history")
    assert extra == 1
    me.handle(MessageReceived(0.2, "peer-01", Message("model", 0, a_update)))
    me.handle(MessageReceived(0.2, "peer-02", Message("model", 0, torch.tensor([0.0, 0.0, -1.0]))))
    me.handle(MessageReceived(0.2, "mallory", Message("model", 0, torch.tensor([-1.0, 0.0, 0.0]))))
    assert me.round == 1
    if sign:
        assert bad == 1 and not me.gossiped and me.trust["peer-01"] > 0.5
    else:
        assert me.trust["peer-01"] == 0.0


def test_history_digest_is_over_exact_float32_bytes() -> None:
    t = torch.tensor([1.0, -0.0, 3.5])
    assert history_digest(t) == hashlib.sha256(t.numpy().tobytes()).digest()
    assert history_digest(t) != history_digest(torch.tensor([1.0, 0.0, 3.5]))  # -0.0 differs


# ----------------------------------------------------------------------------- simulator


def test_sim_switch_runs_modest_signed_with_the_same_outcome() -> None:
    """``sim.sign_relayed``: per-peer keys from a keyring; MoDeST decides exactly as unsigned."""
    from sim.runner import build_simulation, run_simulation
    from sim.scenario import scenario_from_dict
    from tests.test_robust_protocols import _sim

    finals = []
    for sign in (False, True):
        raw = _sim({"name": "modest", "sample_size": 4, "local_steps": 3}, rounds=6)
        raw["sim"]["sign_relayed"] = sign
        simulation = build_simulation(scenario_from_dict(raw))
        run_simulation(simulation, show_progress=False)
        protocols = [p for p in simulation.engine.protocols if isinstance(p, ModestProtocol)]
        assert len(protocols) == len(simulation.engine.protocols)
        assert all((p.signer is not None) == sign for p in protocols)
        finals.append(torch.stack([torch.as_tensor(p.params) for p in protocols]))
        if sign:
            assert all(
                isinstance(p.membership, SignedMembership) and len(p.membership.proofs) > 1
                for p in protocols
            )
    assert torch.equal(finals[0], finals[1])


# The simulator's signed SybilWall against Sybils: tests/test_robust_protocols.py
# (test_sybilwall_in_a_small_simulation_zeroes_the_sybil_identities[sign_relayed]).


def test_a_flood_of_forged_entries_costs_a_bounded_number_of_verifications() -> None:
    from p2pfl.protocols.modest.membership import MAX_NEW_MEMBERS
    from p2pfl.protocols.modest.signed import MAX_BAD_ENTRIES

    ids = [f"m{i:03d}" for i in range(60)]
    keys = Keyring.derive([*ids, "mallory"], seed=5)
    me = make(ids[0], ids, signer=Counting(keys.signer(ids[0])))
    junk = keys.signer("mallory").sign(entry_record(ViewEntry(3, False, 0)))
    # forged entries about known members: verified until MAX_BAD_ENTRIES, then refused
    view = {p: [3, 0, 0, junk] for p in ids[1:50]}
    # made-up names: only MAX_NEW_MEMBERS of them are even looked at
    view |= {f"fake-{i}": [3, 0, 0, junk] for i in range(500)}
    effects = me.handle(MessageReceived(1.0, "mallory", view_message(view)))
    refused = sum(
        e.value for e in effects if isinstance(e, Record) and e.name == "modest.entries_refused"
    )
    assert verifications(me.signer) == MAX_BAD_ENTRIES
    assert bad_entries(effects) == 49 + MAX_NEW_MEMBERS
    assert refused == 500 - MAX_NEW_MEMBERS
    assert not any(p.startswith("fake-") for p in me.view)
    assert all(me.view[p] == ViewEntry() for p in ids[1:50])
    # the budget is per message: the next one is checked again
    entry = ViewEntry(4, False, 0)
    ok = {ids[2]: [*entry.to_wire(), keys.signer(ids[2]).sign(entry_record(entry))]}
    me.handle(MessageReceived(1.1, ids[3], view_message(ok)))
    assert me.view[ids[2]] == entry
