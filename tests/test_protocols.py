"""Unit tests of the sans-I/O protocols, driven by hand: events in, effects checked."""

from __future__ import annotations

import pytest
import torch

from p2pfl.protocols.base import (
    CancelTimer,
    Message,
    MessageReceived,
    PeerDown,
    Record,
    RoundCompleted,
    Send,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols.dpsgd import DPSGD
from p2pfl.protocols.epidemic import EpidemicLearning
from p2pfl.protocols.gossip import GossipLearning, age_weighted_merge


def of_type(effects, kind):
    return [e for e in effects if isinstance(e, kind)]


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def train_and_answer(protocol, now: float, result: torch.Tensor):
    """Start training (already requested) and answer it with ``result``."""
    return protocol.handle(TrainingDone(now, protocol._next_ticket, result, 0.5))


class TestDPSGD:
    def make(self, **kwargs):
        weights = {"b": 0.25, "c": 0.25}
        return DPSGD("a", vec(0.0, 0.0), ["b", "c"], weights=weights, round_timeout=1.0, **kwargs)

    def test_round_mixes_with_metropolis_weights(self):
        p = self.make()
        effects = p.handle(Start(0.0))
        assert of_type(effects, Train)[0].steps == 1
        effects = train_and_answer(p, 0.1, vec(4.0, 0.0))
        sends = of_type(effects, Send)
        assert sorted(s.to for s in sends) == ["b", "c"]
        assert all(s.message.round == 0 for s in sends)
        assert of_type(effects, SetTimer)[0].at == pytest.approx(1.1)
        p.handle(MessageReceived(0.2, "b", Message("model", 0, vec(0.0, 4.0))))
        effects = p.handle(MessageReceived(0.3, "c", Message("model", 0, vec(0.0, 8.0))))
        # own weight 1 - 0.5 = 0.5: 0.5*(4,0) + 0.25*(0,4) + 0.25*(0,8) = (2, 3)
        assert torch.allclose(p.params, vec(2.0, 3.0))
        assert RoundCompleted(0) in effects
        assert of_type(effects, CancelTimer)
        assert p.round == 1
        assert of_type(effects, Train)  # next round starts at once

    def test_timeout_gives_missing_weight_to_self(self):
        p = self.make()
        p.handle(Start(0.0))
        train_and_answer(p, 0.1, vec(4.0, 0.0))
        p.handle(MessageReceived(0.2, "b", Message("model", 0, vec(0.0, 4.0))))
        assert p.round == 0  # still waiting for c
        effects = p.handle(TimerFired(1.1, "round"))
        # c missing: own weight 0.75
        assert torch.allclose(p.params, vec(3.0, 1.0))
        assert Record("round_timeouts", 1.0) in effects
        assert p.round == 1

    def test_early_message_is_buffered_and_stale_dropped(self):
        p = self.make()
        p.handle(Start(0.0))
        # c is already in round 0 before we finished training
        p.handle(MessageReceived(0.05, "c", Message("model", 0, vec(0.0, 8.0))))
        p.handle(MessageReceived(0.06, "b", Message("model", 0, vec(0.0, 4.0))))
        effects = train_and_answer(p, 0.1, vec(4.0, 0.0))
        assert p.round == 1 and RoundCompleted(0) in effects
        effects = p.handle(MessageReceived(0.2, "b", Message("model", 0, vec(9.0, 9.0))))
        assert Record("dropped.stale_round", 1.0) in effects
        effects = p.handle(MessageReceived(0.2, "zz", Message("model", 7, vec(9.0, 9.0))))
        effects = p.handle(MessageReceived(0.2, "zz", Message("model", 1, vec(9.0, 9.0))))
        assert Record("dropped.not_neighbour", 1.0) in effects

    def test_far_future_round_makes_a_lagging_peer_catch_up(self):
        p = self.make()
        p.handle(Start(0.0))
        # one neighbour's word is not enough (the default quorum is 2 distinct ones)
        effects = p.handle(MessageReceived(0.1, "b", Message("model", 7, vec(9.0, 9.0))))
        assert p.round == 0 and Record("catch_up.pending", 1.0) in effects
        effects = p.handle(MessageReceived(0.2, "c", Message("model", 7, vec(9.0, 9.0))))
        assert p.round == 7 and Record("round_jumps", 1.0) in effects
        assert of_type(effects, Train)  # trains for round 7 with its own model
        assert torch.equal(of_type(effects, Train)[0].params, vec(0.0, 0.0))
        # the answer to the abandoned round-0 training is ignored
        assert p.handle(TrainingDone(0.3, 1, vec(5.0, 5.0))) == []
        effects = train_and_answer(p, 0.4, vec(4.0, 0.0))
        assert all(s.message.round == 7 for s in of_type(effects, Send))
        q = self.make(catch_up=False)
        q.handle(Start(0.0))
        effects = q.handle(MessageReceived(0.2, "b", Message("model", 7, vec(9.0, 9.0))))
        assert Record("dropped.future_round", 1.0) in effects and q.round == 0

    def test_crashed_neighbour_no_longer_awaited(self):
        p = self.make()
        p.handle(Start(0.0))
        train_and_answer(p, 0.1, vec(4.0, 0.0))
        p.handle(MessageReceived(0.2, "b", Message("model", 0, vec(0.0, 4.0))))
        effects = p.handle(PeerDown(0.3, "c"))
        assert RoundCompleted(0) in effects
        sends = of_type(train_and_answer(p, 0.4, vec(1.0, 1.0)), Send)
        assert [s.to for s in sends] == ["b"]

    def test_received_tensor_not_modified(self):
        p = self.make()
        p.handle(Start(0.0))
        theirs = vec(0.0, 4.0)
        p.handle(MessageReceived(0.05, "b", Message("model", 0, theirs)))
        p.handle(MessageReceived(0.05, "c", Message("model", 0, vec(0.0, 8.0))))
        train_and_answer(p, 0.1, vec(4.0, 0.0))
        assert torch.equal(theirs, vec(0.0, 4.0))

    def test_robust_aggregator_plugs_in(self):
        def coordinate_median(stack, weights, own):
            return stack.median(dim=0).values

        p = self.make(aggregate=coordinate_median)
        p.handle(Start(0.0))
        train_and_answer(p, 0.1, vec(1.0, 1.0))
        p.handle(MessageReceived(0.2, "b", Message("model", 0, vec(2.0, 2.0))))
        p.handle(MessageReceived(0.2, "c", Message("model", 0, vec(1000.0, -1000.0))))
        assert torch.allclose(p.params, vec(2.0, 1.0))

    def test_too_few_models_for_a_robust_rule_keep_the_own_model(self):
        """Krum with f = 1 needs 5 models: with 4 neighbours, a round that times out with
        one of them missing leaves 4, too few to outvote an attacker. The peer keeps its
        own trained model for that round (any mix of 4 could be the attacker's), says so,
        and goes on; a full round mixes again."""
        from p2pfl.aggregation import get_aggregator

        names = ["b", "c", "d", "e"]
        p = DPSGD("a", vec(0.0, 0.0), names, weights={q: 0.2 for q in names},
                  round_timeout=1.0, aggregate=get_aggregator("krum", f=1))  # fmt: skip
        p.handle(Start(0.0))
        train_and_answer(p, 0.1, vec(1.0, 1.0))
        for q, value in zip(names[:3], (vec(1.1, 1.0), vec(0.9, 1.0), vec(50.0, -50.0)), strict=True):
            p.handle(MessageReceived(0.2, q, Message("model", 0, value)))
        effects = p.handle(TimerFired(1.1, "round"))  # e never sent
        assert p.round == 1 and torch.equal(p.params, vec(1.0, 1.0))
        assert Record("too_few_to_aggregate", 1.0) in effects and RoundCompleted(0) in effects
        train_and_answer(p, 1.2, vec(2.0, 2.0))
        for q, value in zip(names, (vec(2.1, 2.0), vec(1.9, 2.0), vec(50.0, -50.0), vec(2.0, 2.2)), strict=True):
            effects = p.handle(MessageReceived(1.3, q, Message("model", 1, value)))
        assert p.round == 2 and Record("too_few_to_aggregate", 1.0) not in effects
        assert torch.allclose(p.params, vec(2.0, 2.0))  # Krum's pick: not the outlier

    def test_weights_for_strangers_rejected(self):
        with pytest.raises(ValueError, match="not neighbours"):
            DPSGD("a", vec(0.0), ["b"], weights={"z": 0.5})

    def test_checkpoint_round_trip(self):
        p = self.make()
        p.handle(Start(0.0))
        train_and_answer(p, 0.1, vec(4.0, 0.0))
        p.handle(TimerFired(1.1, "round"))
        state = p.state_dict()
        q = self.make()
        q.load_state_dict(state)
        assert q.round == 1 and torch.equal(q.params, p.params)
        assert of_type(q.handle(Start(5.0)), Train)
        with pytest.raises(ValueError, match="protocol"):
            GossipLearning("a", vec(0.0, 0.0), ["b"]).load_state_dict(state)


class TestEpidemic:
    def test_pushes_to_fanout_random_peers_and_averages_on_timer(self):
        peers = [f"p{i}" for i in range(10)]
        p = EpidemicLearning("me", vec(0.0), peers, fanout=3, round_timeout=0.5, seed=3)
        p.handle(Start(0.0))
        effects = train_and_answer(p, 0.1, vec(3.0))
        targets = [s.to for s in of_type(effects, Send)]
        assert len(targets) == 3 and len(set(targets)) == 3 and set(targets) <= set(peers)
        p.handle(MessageReceived(0.2, "p1", Message("model", 0, vec(6.0))))
        p.handle(MessageReceived(0.3, "p2", Message("model", 0, vec(9.0))))
        assert p.round == 0  # EL waits for the timer: it cannot know who will send
        effects = p.handle(TimerFired(0.6, "round"))
        assert torch.allclose(p.params, vec(6.0))
        assert RoundCompleted(0) in effects

    def test_fresh_draw_each_round(self):
        peers = [f"p{i}" for i in range(20)]
        p = EpidemicLearning("me", vec(0.0), peers, fanout=2, seed=1)
        draws = set()
        p.handle(Start(0.0))
        for r in range(6):
            effects = train_and_answer(p, r + 0.1, vec(0.0))
            draws.add(tuple(sorted(s.to for s in of_type(effects, Send))))
            p.handle(TimerFired(r + 0.9, "round"))
        assert len(draws) > 1

    def test_failed_peer_is_not_drawn_again(self):
        p = EpidemicLearning("me", vec(0.0), ["a", "b", "c"], fanout=2, seed=0)
        p.handle(PeerDown(0.0, "a"))
        p.handle(Start(0.0))
        effects = train_and_answer(p, 0.1, vec(0.0))
        assert sorted(s.to for s in of_type(effects, Send)) == ["b", "c"]


class TestGossip:
    def test_age_weighted_merge(self):
        assert torch.allclose(age_weighted_merge(vec(0.0), 3, vec(4.0), 1), vec(1.0))
        assert torch.allclose(age_weighted_merge(vec(0.0), 0, vec(4.0), 0), vec(2.0))

    def test_push_merge_train_cycle(self):
        p = GossipLearning("a", vec(0.0), ["b"], period=1.0, local_steps=2, seed=0)
        effects = p.handle(Start(0.0))
        first = of_type(effects, SetTimer)[0]
        assert 0.0 <= first.at <= 1.0
        effects = p.handle(TimerFired(first.at, "gossip"))
        send = of_type(effects, Send)[0]
        assert send.to == "b" and send.message.meta == {"age": 0.0}
        assert RoundCompleted(0) in effects
        effects = p.handle(MessageReceived(1.0, "b", Message("model", 0, vec(4.0), {"age": 6.0})))
        train = of_type(effects, Train)[0]
        assert torch.allclose(train.params, vec(4.0))  # own age 0: the other model wins
        # a second model arriving during training waits (newest wins)
        p.handle(MessageReceived(1.1, "b", Message("model", 0, vec(8.0), {"age": 1.0})))
        p.handle(MessageReceived(1.2, "b", Message("model", 0, vec(10.0), {"age": 8.0})))
        effects = train_and_answer(p, 1.5, vec(5.0))
        assert p.age == 8.0  # max(0, 6) + 2 steps
        follow_up = of_type(effects, Train)[0]
        # merge (5, age 8) with (10, age 8) -> 7.5
        assert torch.allclose(follow_up.params, vec(7.5))

    def test_bad_age_is_dropped(self):
        p = GossipLearning("a", vec(0.0), ["b"])
        effects = p.handle(MessageReceived(1.0, "b", Message("model", 0, vec(4.0), {"age": "x"})))
        assert Record("dropped.bad_age", 1.0) in effects
        assert not of_type(effects, Train)
        # an incredible age would let one message overwrite the model
        effects = p.handle(MessageReceived(1.0, "b", Message("model", 0, vec(4.0), {"age": 1e12})))
        assert Record("dropped.bad_age", 1.0) in effects
        effects = p.handle(MessageReceived(1.0, "zz", Message("model", 0, vec(4.0), {"age": 1.0})))
        assert Record("dropped.not_neighbour", 1.0) in effects
