"""MoDeST: nobody waits out a timer for a peer that left.

Seen on in-process nodes (one aggregator, ``tests/test_drivers_equivalent.py``'s
``run_nodes``, peers named by sorted keys): the aggregator of a run's last round left
as soon as its own round was done; its leave reached three random peers, and the other
trainers of the last round pinged it, unanswered, until their liveness checks gave up on
it ~15 s later (29 of 40 runs took 15 s instead of 0.5 s). A leave now goes to the
likely samples of the rounds at hand too, and a peer that left answers a ping or a model
with its leave, so the pinger passes over it at once.
"""

from __future__ import annotations

import torch

from p2pfl.protocols.base import (
    Effect,
    Message,
    MessageReceived,
    Record,
    RoundCompleted,
    Send,
    TimerFired,
    TrainingDone,
)
from p2pfl.protocols.modest import ModestProtocol, derive_candidates
from tests.test_modest import aggregator, make, model, of_type, peers, sends


def trainer_delivering(ids: list[str], sample_size: int = 1) -> tuple[ModestProtocol, list[str]]:
    """A peer that trained round 2 and pings the first candidate of round 3 (its aggregator,
    ``num_aggregators = 1``); the candidates of round 3 in its view."""
    order = derive_candidates(make(ids[0], ids).view, 3)
    p = make(order[-1], ids, sample_size=sample_size, num_aggregators=1, role_slack=len(ids))
    p.handle(MessageReceived(1.0, order[0], Message("train", 2, torch.ones(4))))
    effects = p.handle(TrainingDone(1.2, p._next_ticket, torch.ones(4)))
    [ping] = sends(effects, "ping")
    assert ping.to == order[0] and ping.message.round == 3
    return p, order


def test_a_peer_that_left_answers_pings_and_models_with_its_leave() -> None:
    ids = peers(6)
    q = make(ids[1], ids)
    q.leave(1.0)
    for message in (
        Message("ping", 3),
        Message("aggregate", 3, torch.ones(4)),
        Message("train", 3, torch.ones(4)),
    ):
        [answer, counted] = q.handle(MessageReceived(1.5, ids[0], message))
        assert isinstance(answer, Send) and answer.to == ids[0]
        assert answer.message.kind == "leave"
        assert answer.message.meta["entry"][1] == 1  # the entry says: left
        assert counted == Record("modest.left_answered", 1.0)
    # nothing else is answered, and nothing else moves a peer that left
    assert q.handle(MessageReceived(1.6, ids[0], Message("pong", 3, None, {"at": 3}))) == []
    assert q.handle(TimerFired(9.0, "modest.idle")) == []


def test_the_pinger_passes_over_a_candidate_that_left_at_once() -> None:
    """The answer replaces the ping timeout: the next candidate is pinged right away."""
    ids = peers(8)
    p, order = trainer_delivering(ids)
    gone = make(order[0], ids)
    gone.leave(1.3)
    [answer, _] = gone.handle(MessageReceived(1.4, p.peer_id, Message("ping", 3)))
    assert isinstance(answer, Send)
    effects = p.handle(MessageReceived(1.5, gone.peer_id, answer.message))
    assert p.view[gone.peer_id].left
    assert [(s.to, s.message.round) for s in sends(effects, "ping")] == [(order[1], 3)]
    # its pong makes it the aggregator: the model goes out, no timer having fired
    pong = Message("pong", 3, None, {"at": 3, "done": 2})
    out = p.handle(MessageReceived(1.6, order[1], pong))
    assert [s.to for s in sends(out, "aggregate")] == [order[1]]


def test_a_leave_reaches_the_likely_samples_of_the_rounds_at_hand() -> None:
    """Those who ping a leaving peer as a candidate, or send it their model, hear of the
    leave without asking: the first ``sample_size`` candidates of the round before and of
    its own round, besides ``announce_fanout`` random peers."""
    ids = peers(30)
    p, _ = trainer_delivering(ids, sample_size=6)
    at = p.round  # 2: its model of round 3 is not out yet
    told = [s.to for s in sends(p.leave(2.0), "leave")]
    assert len(told) == len(set(told)) and p.peer_id not in told
    for round_ in (at - 1, at):
        likely = [c for c in derive_candidates(p.view, round_) if c != p.peer_id]
        assert set(likely[: p.sample_size]) <= set(told), round_
    assert len(told) <= p.announce_fanout + 2 * p.sample_size


def test_an_aggregator_whose_missing_trainers_left_goes_on_at_once() -> None:
    """The quorum counts live members: when the last leave it waited on makes the models
    in hand a quorum, the aggregation ends there, not at the aggregation timer."""
    ids = peers(10)
    p = aggregator(ids, success_fraction=1.0)  # quorum: all 4 of the sample
    for i in (1, 2, 3):
        assert not of_type(
            p.handle(MessageReceived(1.0, ids[i], model(5, float(i)))), RoundCompleted
        )
    effects: list[Effect] = []
    for gone in ids[3:]:  # its trainer ids[3] among them: three live members are left
        leave = Message("leave", 5, None, {"entry": [5, 1, 1]})
        effects += p.handle(MessageReceived(1.5, gone, leave))
    assert RoundCompleted(5) in effects  # 3 of the 3 live: no timer needed
    assert Record("modest.aggregated", 3.0) in effects
    assert torch.allclose(p.params, torch.full((4,), 2.0))
