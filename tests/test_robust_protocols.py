"""SybilWall and Bristle as sans-I/O protocols: fed events by hand, then in small simulations."""

from __future__ import annotations

import pytest
import torch

from p2pfl.attacks import ByzantineProtocol
from p2pfl.protocols.base import (
    Message,
    MessageReceived,
    Record,
    Send,
    Start,
    Train,
    TrainingDone,
)
from p2pfl.protocols.bristle import Bristle, OutputLayer
from p2pfl.protocols.sybilwall import HISTORY, SybilWall
from sim.runner import build_simulation, run_simulation
from sim.scenario import scenario_from_dict


def _train_once(protocol, trained: torch.Tensor) -> list:
    """Start the protocol and answer its first Train effect with ``trained``."""
    (train,) = [e for e in protocol.handle(Start(0.0)) if isinstance(e, Train)]
    return protocol.handle(TrainingDone(0.1, train.ticket, trained))


def _model(sender: str, params: torch.Tensor, round_: int = 0) -> MessageReceived:
    return MessageReceived(0.2, sender, Message("model", round_, params))


# ---------------------------------------------------------------------------- SybilWall


def test_sybilwall_gives_identical_histories_zero_weight_and_keeps_the_rest() -> None:
    start = torch.zeros(4)
    wall = SybilWall("me", start, ["a", "s1", "s2"], max_known=0, seed=1)
    _train_once(wall, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    wall.handle(_model("s1", torch.tensor([0.0, 1.0, 1.0, 0.0])))
    wall.handle(_model("s2", torch.tensor([0.0, 1.0, 1.0, 0.0])))
    effects = wall.handle(_model("a", torch.tensor([0.0, 0.0, 0.0, 2.0])))
    assert wall.round == 1  # every neighbour answered: the round closed
    assert wall.trust == {"a": 1.0, "s1": 0.0, "s2": 0.0}
    # own weight 1, a weight 1, the twins 0: the mean of own and a
    assert torch.allclose(wall.params, torch.tensor([0.5, 0.0, 0.0, 1.0]))
    assert any(
        isinstance(e, Record) and e.name == "sybilwall.zero_weight" and e.value == 2 for e in effects
    )


def test_sybilwall_scores_against_gossiped_twins_of_a_lone_sybil_neighbour() -> None:
    """One Sybil neighbour looks honest alone; its twin's history, gossiped, gives it away."""
    wall = SybilWall("me", torch.zeros(3), ["a", "b", "s1"], seed=2)
    _train_once(wall, torch.tensor([1.0, 0.0, 0.0]))
    twin = torch.tensor([0.0, 3.0, 3.0])  # s2's history as b saw it: the same direction as s1
    wall.handle(MessageReceived(0.15, "b", Message(HISTORY, 0, twin, {"subject": "s2", "hops": 1})))
    assert not wall.gossiped and set(wall.pending[0]) == {"b"}  # kept until round 0 ends
    wall.handle(_model("a", torch.tensor([2.0, 0.0, 0.0])))
    wall.handle(_model("b", torch.tensor([0.0, 0.0, -1.0])))
    wall.handle(_model("s1", torch.tensor([0.0, 1.0, 1.0])))
    assert set(wall.gossiped) == {"s2"} and wall.gossiped["s2"][1] == 2
    assert wall.trust["s1"] == 0.0 and wall.trust["a"] > 0.5 and wall.trust["b"] > 0.5


def test_sybilwall_gossips_one_history_per_neighbour_favouring_near_ones() -> None:
    wall = SybilWall("me", torch.zeros(2), ["a", "b"], gossip_decay=0.25, seed=3)
    wall.histories = {"a": torch.ones(2), "b": torch.full((2,), 2.0)}
    wall.gossiped = {"far": (torch.full((2,), 3.0), 3)}
    picks = {"a": 0, "b": 0, "far": 0}
    for _ in range(400):
        for effect in wall._gossip():
            assert isinstance(effect, Send) and effect.message.kind == HISTORY
            subject = effect.message.meta["subject"]
            assert subject != effect.to  # nobody gets its own history
            picks[subject] += 1
    # to a: b (weight 0.25) or far (0.25**3); to b: a or far
    assert picks["far"] / sum(picks.values()) < 0.1
    assert picks["a"] > 300 and picks["b"] > 300


def _gossip_from(sender: str, subject: str, round_: int = 0, hops: int = 1) -> MessageReceived:
    meta = {"subject": subject, "hops": hops}
    return MessageReceived(0.15, sender, Message(HISTORY, round_, torch.ones(2), meta))


def test_sybilwall_ignores_gossip_about_its_own_neighbours_and_evicts_far_histories() -> None:
    neighbours = ["a", "b1", "b2", "b3", "b4", "b5"]
    wall = SybilWall("me", torch.zeros(2), neighbours, max_known=2, seed=4)
    _train_once(wall, torch.zeros(2))
    for sender, subject, hops in [("b1", "a", 1), ("b2", "me", 1), ("b3", "x", 3)]:
        wall.handle(_gossip_from(sender, subject, hops=hops))
    for sender, subject in [("b4", "y"), ("b5", "z")]:
        wall.handle(_gossip_from(sender, subject))
    effects = wall.handle(_gossip_from("stranger", "q"))
    first = effects[0]
    assert isinstance(first, Record) and first.name == "sybilwall.bad_history"
    assert "stranger" not in wall.pending[0]
    for peer in neighbours:
        wall.handle(_model(peer, torch.zeros(2)))
    assert wall.round == 1
    # applied in the senders' order: x (4 hops) went first when z came
    assert set(wall.gossiped) == {"y", "z"}


def _names(effects: list, name: str) -> float:
    return sum(e.value for e in effects if getattr(e, "name", "") == name)


def test_sybilwall_keeps_at_most_one_history_per_neighbour_and_round() -> None:
    """A hostile neighbour cannot make the buffer grow: one slot per round, current rounds."""
    wall = SybilWall("me", torch.zeros(2), ["a", "b"], seed=4)  # max_lead 2: rounds 0..2
    _train_once(wall, torch.zeros(2))
    effects = []
    for round_ in range(6):
        for i in range(5):
            effects += wall.handle(_gossip_from("b", f"far{i}", round_=round_))
    assert _names(effects, "dropped.future_round") == 3 * 5  # rounds 3, 4, 5
    assert _names(effects, "sybilwall.extra_history") == 3 * 4
    assert {r: set(heard) for r, heard in wall.pending.items()} == {0: {"b"}, 1: {"b"}, 2: {"b"}}
    held = wall.pending[0]["b"]
    assert held is not None and held[0] == "far0"  # the first one came: the others are dropped
    wall.handle(_model("a", torch.zeros(2)))
    wall.handle(_model("b", torch.zeros(2)))
    assert wall.round == 1 and set(wall.gossiped) == {"far0"} and set(wall.pending) == {1, 2}
    late = wall.handle(_gossip_from("a", "far9", round_=0))
    assert _names(late, "sybilwall.late_history") == 1 and 0 not in wall.pending


def _round_zero(order: list[MessageReceived]) -> SybilWall:
    wall = SybilWall("me", torch.zeros(3), ["a", "b", "c"], seed=5)
    _train_once(wall, torch.tensor([1.0, 0.0, 0.0]))
    for event in order:
        wall.handle(event)
    assert wall.round == 1
    return wall


def test_sybilwall_round_does_not_depend_on_arrival_order() -> None:
    """The same messages of a round, in any order, give the same model, trust and gossip."""
    twins = [
        MessageReceived(0.15, "a", Message(HISTORY, 0, torch.tensor([0.0, 2.0, 2.0]), {"subject": "s", "hops": 1})),
        MessageReceived(0.15, "b", Message(HISTORY, 0, torch.tensor([0.0, 1.0, 1.0]), {"subject": "s", "hops": 2})),
        MessageReceived(0.15, "c", Message(HISTORY, 0, torch.tensor([5.0, 0.0, 1.0]), {"subject": "t", "hops": 1})),
    ]
    models = [
        _model("a", torch.tensor([2.0, 0.0, 0.0])),
        _model("b", torch.tensor([0.0, 0.0, -1.0])),
        _model("c", torch.tensor([0.0, 1.0, 1.0])),
    ]
    # histories first; interleaved; in reverse order (the round ends with the last one)
    orders = [twins + models, [twins[2], models[0], twins[0], models[1], twins[1], models[2]]]
    orders.append(list(reversed(twins)) + models)
    walls = [_round_zero(order) for order in orders]
    for wall in walls[1:]:
        assert torch.equal(wall.params, walls[0].params) and wall.trust == walls[0].trust
        assert list(wall.gossiped) == list(walls[0].gossiped)
        for subject, (history, hops) in wall.gossiped.items():
            assert torch.equal(history, walls[0].gossiped[subject][0])
            assert hops == walls[0].gossiped[subject][1]
    # b's copy of s comes after a's (senders in order): the one kept, at b's distance
    assert walls[0].gossiped["s"][1] == 3


def test_sybilwall_gossips_what_it_knew_when_the_last_round_ended() -> None:
    """A history heard during round 0 is not relayed in round 0, and is in round 1."""
    wall = SybilWall("me", torch.zeros(2), ["a", "b"], seed=6)
    (train,) = [e for e in wall.handle(Start(0.0)) if isinstance(e, Train)]
    wall.handle(_gossip_from("a", "far"))  # before its own training ended
    effects = wall.handle(TrainingDone(0.1, train.ticket, torch.zeros(2)))
    assert not [e for e in effects if isinstance(e, Send) and e.message.kind == HISTORY]
    models = [e.message for e in effects if isinstance(e, Send) and e.message.kind == "model"]
    assert models and all("hist" not in m.meta for m in models)
    wall.handle(_model("a", torch.ones(2)))
    effects = wall.handle(_model("b", torch.ones(2)))
    assert wall.round == 1
    (train,) = [e for e in effects if isinstance(e, Train)]
    effects = wall.handle(TrainingDone(1.1, train.ticket, torch.ones(2)))
    gossip = {e.to: e.message for e in effects if isinstance(e, Send) and e.message.kind == HISTORY}
    assert set(gossip) == {"a", "b"} and all(m.round == 1 for m in gossip.values())
    flagged = {e.to: e.message for e in effects if isinstance(e, Send) and e.message.kind == "model"}
    assert set(flagged) == {"a", "b"} and all(m.meta.get("hist") == 1 for m in flagged.values())


def test_sybilwall_waits_for_a_history_announced_with_a_model() -> None:
    """Transports may reorder a history and the model after it: the round waits for both."""
    wall = SybilWall("me", torch.zeros(2), ["a", "b"], seed=7)
    _train_once(wall, torch.zeros(2))
    wall.handle(_model("a", torch.ones(2)))
    flagged = MessageReceived(0.2, "b", Message("model", 0, torch.ones(2), {"hist": 1}))
    wall.handle(flagged)
    assert wall.round == 0 and wall.announced == {0: {"b"}}
    wall.handle(_gossip_from("b", "far"))
    assert wall.round == 1 and "far" in wall.gossiped


def _sim(protocol: dict, attack: dict | None = None, rounds: int = 6, seed: int = 5) -> dict:
    raw = {
        "name": "robust",
        "seed": seed,
        "rounds": rounds,
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": 0.3},
        "topology": {"kind": "regular", "n": 10, "params": {"k": 4}},
        "protocol": protocol,
        "network": {"step_time": 0.002},
        "sim": {"eval_every": rounds, "threads": 1},
    }
    if attack:
        raw["attack"] = attack
    return raw


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "sign_relayed"])
def test_sybilwall_in_a_small_simulation_zeroes_the_sybil_identities(signed: bool) -> None:
    """Twins next to a peer are identical; a lone Sybil neighbour's twins arrive by gossip.

    (Gossiped histories are snapshots: a peer far from every twin can still trust a lone
    Sybil neighbour for a while -- in 1 of 8 seeds tried here, after 12 rounds.) With
    ``sim.sign_relayed`` the gossiped histories are the subjects' signed declared sums
    (see ``p2pfl.protocols.sybilwall``), and the Sybils must still get no weight.
    """
    attack = {"name": "sybil_label_flip", "identities": 3, "attach": 3}
    raw = _sim({"name": "sybilwall", "local_steps": 5}, attack, rounds=12, seed=0)
    raw["sim"]["sign_relayed"] = signed
    simulation = build_simulation(scenario_from_dict(raw))
    run_simulation(simulation, show_progress=False)
    assert simulation.adversary is not None
    sybils = {simulation.peer_ids[i] for i in simulation.adversary.plan.sybils}
    sybil_weights: list[float] = []
    honest_weights: list[float] = []
    for protocol in simulation.engine.protocols:
        if isinstance(protocol, ByzantineProtocol):
            continue
        assert isinstance(protocol, SybilWall)
        if signed:
            assert protocol.own_proof is not None and protocol.proofs
        for peer, weight in protocol.trust.items():
            (sybil_weights if peer in sybils else honest_weights).append(weight)
    assert len(sybil_weights) == 9 and max(sybil_weights) < 0.05  # 3 identities x 3 victims
    assert sum(honest_weights) / len(honest_weights) > 0.6


# ---------------------------------------------------------------------------- Bristle


def _bristle(**kwargs) -> Bristle:
    # a "model" of 3 feature parameters, then the output layer Linear(2 -> 2): W (2x2), b (2)
    output = OutputLayer(weight_offset=3, bias_offset=7, classes=2, features=2)
    full = torch.tensor([9.0, 9.0, 9.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    probe_x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    probe_y = torch.tensor([0, 0, 1, 1])
    defaults = {"keep_closest": 1, "n_random": 0, "tolerance": 0.0, "seed": 0}
    return Bristle(
        "me",
        full,
        ["a", "b", "c"],
        output=output,
        probe_features=probe_x,
        probe_labels=probe_y,
        **(defaults | kwargs),
    )


def test_output_layer_rows_and_replace_round_trip() -> None:
    proto = _bristle()
    rows = proto.output.rows(proto.params)
    assert rows.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    swapped = proto.output.replace(proto.params, rows.flip(0))
    assert swapped.tolist() == [9.0, 9.0, 9.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_bristle_recalls_and_class_weights() -> None:
    proto = _bristle()
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    always_one = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # predicts class 1 everywhere
    recalls = proto.recalls(torch.stack([identity, always_one]))
    assert recalls.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    weights = proto.class_weights(identity, always_one[None])
    assert weights.tolist() == [[0.0, 1.0]]  # worse than us on class 0: not trusted there


def test_bristle_round_integrates_the_closest_layer_and_keeps_features() -> None:
    proto = _bristle()
    trained = torch.tensor([5.0, 5.0, 5.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # features moved: undone
    effects = _train_once(proto, trained)
    sent = [e for e in effects if isinstance(e, Send)]
    assert {e.to for e in sent} == {"a", "b", "c"}
    first = sent[0].message.params
    assert first is not None and first.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # class rows, flat
    near = torch.tensor([1.0, 0.0, 0.2, 0.0, 1.0, 0.2])
    far = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 5.0])
    proto.handle(_model("a", far))
    proto.handle(_model("b", near))
    effects = proto.handle(_model("c", far.clone()))
    assert proto.round == 1
    assert proto.params[:3].tolist() == [9.0, 9.0, 9.0]  # the frozen extractor
    # only b (the nearest) is integrated, with weight 1 on both classes: the mean of rows
    expected = torch.tensor([[1.0, 0.0, 0.1], [0.0, 1.0, 0.1]])
    assert torch.allclose(proto.output.rows(proto.params), expected)
    assert any(isinstance(e, Record) and e.name == "bristle.kept" and e.value == 1 for e in effects)


def test_bristle_in_a_small_simulation_learns_with_frozen_features_and_small_messages() -> None:
    protocol = {
        "name": "bristle",
        "local_steps": 3,
        "pretrain_samples": 300,
        "pretrain_steps": 60,
        "probe_samples": 20,
    }
    simulation = build_simulation(scenario_from_dict(_sim(protocol, rounds=8)))
    start = simulation.engine.protocols[0].params.clone()
    rows = run_simulation(simulation, show_progress=False)
    assert rows[-1]["acc_mean"] > 0.5 > rows[0]["acc_mean"]
    first = simulation.engine.protocols[0]
    assert isinstance(first, Bristle)
    output = first.output
    for protocol_obj in simulation.engine.protocols:
        final = protocol_obj.params
        assert torch.equal(output.replace(final, output.rows(start)), start)  # features unchanged
    per_message = rows[-1]["bytes_total"] / rows[-1]["messages_total"]
    assert per_message < 4 * output.numel + 400  # the output layer only, not the whole model


def test_sybilwall_checkpoint_keeps_its_histories() -> None:
    wall = SybilWall("me", torch.zeros(2), ["a", "b"], seed=6)
    wall.histories = {"a": torch.ones(2)}
    wall.gossiped = {"far": (torch.full((2,), 3.0), 2)}
    again = SybilWall("me", torch.zeros(2), ["a", "b"], seed=6)
    again.load_state_dict(wall.state_dict())
    assert torch.equal(again.histories["a"], torch.ones(2))
    assert again.gossiped["far"][1] == 2 and torch.equal(
        again.gossiped["far"][0], wall.gossiped["far"][0]
    )
