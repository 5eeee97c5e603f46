"""SybilWall and Bristle as sans-I/O protocols: fed events by hand, then in small simulations."""

from __future__ import annotations

import pytest
import torch

from p2pfl.attacks import ByzantineProtocol
from p2pfl.protocols.base import Message, MessageReceived, Send, Start, Train, TrainingDone
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
    assert any(getattr(e, "name", "") == "sybilwall.zero_weight" and e.value == 2 for e in effects)


def test_sybilwall_scores_against_gossiped_twins_of_a_lone_sybil_neighbour() -> None:
    """One Sybil neighbour looks honest alone; its twin's history, gossiped, gives it away."""
    wall = SybilWall("me", torch.zeros(3), ["a", "b", "s1"], seed=2)
    _train_once(wall, torch.tensor([1.0, 0.0, 0.0]))
    twin = torch.tensor([0.0, 3.0, 3.0])  # s2's history as b saw it: the same direction as s1
    wall.handle(MessageReceived(0.15, "b", Message(HISTORY, 0, twin, {"subject": "s2", "hops": 1})))
    assert set(wall.gossiped) == {"s2"} and wall.gossiped["s2"][1] == 2
    wall.handle(_model("a", torch.tensor([2.0, 0.0, 0.0])))
    wall.handle(_model("b", torch.tensor([0.0, 0.0, -1.0])))
    wall.handle(_model("s1", torch.tensor([0.0, 1.0, 1.0])))
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


def test_sybilwall_ignores_gossip_about_its_own_neighbours_and_evicts_far_histories() -> None:
    wall = SybilWall("me", torch.zeros(2), ["a", "b"], max_known=2, seed=4)
    history = torch.ones(2)
    for subject, hops in [("a", 1), ("me", 1), ("x", 3), ("y", 1), ("z", 1)]:
        wall.handle(
            MessageReceived(
                0.0, "b", Message(HISTORY, 0, history, {"subject": subject, "hops": hops})
            )
        )
    assert set(wall.gossiped) == {"y", "z"}  # x (4 hops) went first when z came
    effects = wall.handle(
        MessageReceived(0.0, "stranger", Message(HISTORY, 0, history, {"subject": "q", "hops": 1}))
    )
    assert "q" not in wall.gossiped and effects[0].name == "sybilwall.bad_history"


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
    sybils = {simulation.peer_ids[i] for i in simulation.adversary.plan.sybils}
    sybil_weights, honest_weights = [], []
    for protocol in simulation.engine.protocols:
        if isinstance(protocol, ByzantineProtocol):
            continue
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
    assert sent[0].message.params.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # class rows, flat
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
    assert any(getattr(e, "name", "") == "bristle.kept" and e.value == 1 for e in effects)


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
    output = simulation.engine.protocols[0].output
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
