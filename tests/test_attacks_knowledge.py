"""What ALIE and IPM know: by default only the models the attacker received (issue 16).

Hand-checked cases on a minimal protocol, then the simulator: a received-only attacker's
vectors are the formula on exactly the models it received from honest neighbours; an
omniscient one's are not (it sees peers it is not linked to).
"""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.attacks import ByzantineProtocol, alie, get_attack, ipm
from p2pfl.attacks.behaviour import MODEL_KINDS
from p2pfl.protocols.base import (
    Message,
    MessageReceived,
    Protocol,
    Send,
    Start,
    Train,
    TrainingDone,
)
from sim.runner import build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict

START = torch.tensor([1.0, 1.0])
#: what the attacker received in round 0: two honest neighbours and one ally (a colluder)
H1, H2, ALLY = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([100.0, -100.0])
#: a third honest peer the attacker is not linked to: only an omniscient attacker sees it
H3 = torch.tensor([5.0, -2.0])


class Echo(Protocol):
    """Trains from its model, then sends the result (round 0) to "v"."""

    name = "echo"

    def __init__(self) -> None:
        super().__init__("bad", START.clone(), ["h1", "h2", "ally"])

    def handle(self, event):
        if isinstance(event, Start):
            return [self._train(self.params)]
        if isinstance(event, TrainingDone):
            return [Send("v", Message("model", self.round, event.params))]
        return []


def _crafted(attack, **options) -> torch.Tensor:
    """The vector the attacker sends after receiving H2, ALLY, H1 (in that order) in round 0."""
    wrapper = ByzantineProtocol(Echo(), attack, allies={"ally"}, **options)
    (train,) = wrapper.handle(Start(0.0))
    assert isinstance(train, Train)
    for t, (sender, model) in enumerate((("h2", H2), ("ally", ALLY), ("h1", H1))):
        wrapper.handle(MessageReceived(0.1 + t, sender, Message("model", 0, model)))
    (send,) = wrapper.handle(TrainingDone(5.0, train.ticket, torch.tensor([9.0, 9.0])))
    assert isinstance(send, Send) and send.message.params is not None
    return send.message.params


def _omniscient_view(round_: int) -> torch.Tensor:
    return torch.stack([H1, H2, H3])


def test_received_alie_is_the_formula_on_exactly_the_received_honest_models() -> None:
    # mean of H1, H2 = [2, 4]; population std = [1, 2]; z = 1: [3, 6] (the ally is left out)
    sent = _crafted(get_attack("alie", z=1.0))
    assert sent.tolist() == [3.0, 6.0]
    assert torch.equal(sent, alie(torch.stack([H1, H2]), 1, 0, z=1.0))


def test_received_ipm_is_the_formula_on_exactly_the_received_honest_models() -> None:
    # reference = START = [1, 1]; mean update [1, 3]; [1, 1] - 0.5 * [1, 3] = [0.5, -0.5]
    sent = _crafted(get_attack("ipm", eps=0.5))
    assert sent.tolist() == [0.5, -0.5]
    assert torch.equal(sent, ipm(torch.stack([H1, H2]), 0.5, START))


def test_omniscient_differs_when_the_attacker_has_not_seen_every_honest_model() -> None:
    alie_all = _crafted(
        get_attack("alie", z=1.0, knowledge="omniscient"), knowledge=_omniscient_view
    )
    # mean [3, 2]; population std [sqrt(8/3), sqrt(32/3)]
    expected = [3.0 + math.sqrt(8 / 3), 2.0 + math.sqrt(32 / 3)]
    assert alie_all.tolist() == pytest.approx(expected, abs=1e-6)
    assert not torch.allclose(alie_all, torch.tensor([3.0, 6.0]))
    ipm_all = _crafted(
        get_attack("ipm", eps=0.5, knowledge="omniscient"), knowledge=_omniscient_view
    )
    assert ipm_all.tolist() == [0.0, 0.5]  # [1, 1] - 0.5 * ([3, 2] - [1, 1])


def test_a_received_attacker_ignores_an_omniscient_view_it_is_handed() -> None:
    """The default is what the peer received, whatever a driver passes as ``knowledge``."""
    sent = _crafted(get_attack("alie", z=1.0), knowledge=_omniscient_view)
    assert sent.tolist() == [3.0, 6.0]


def test_knowledge_falls_back_to_the_round_before_and_then_to_the_own_model() -> None:
    wrapper = ByzantineProtocol(Echo(), get_attack("alie", z=1.0))
    assert wrapper.received(0) is None  # nothing yet: ALIE then sends its own model
    (train,) = wrapper.handle(Start(0.0))
    assert isinstance(train, Train)
    (send,) = wrapper.handle(TrainingDone(1.0, train.ticket, torch.tensor([7.0, 8.0])))
    assert isinstance(send, Send) and send.message.params is not None
    assert send.message.params.tolist() == [7.0, 8.0]
    wrapper.handle(MessageReceived(1.5, "h2", Message("model", 3, H2)))
    wrapper.handle(MessageReceived(1.6, "h1", Message("model", 3, H1)))
    received = wrapper.received(4)
    assert received is not None and torch.equal(received, torch.stack([H1, H2]))  # by sender id
    wrapper.handle(MessageReceived(1.7, "h1", Message("model", 4, H3)))
    received = wrapper.received(4)
    assert received is not None and torch.equal(received, H3[None])  # the round's own, once it has any


def test_knowledge_is_a_parameter_of_alie_and_ipm_only_and_checked() -> None:
    assert get_attack("alie").knowledge == "received" and not get_attack("alie").omniscient
    assert get_attack("ipm", knowledge="omniscient").omniscient
    assert get_attack("sign_flip").knowledge is None
    with pytest.raises(
        ValueError, match=r"^alie: knowledge must be one of 'received', 'omniscient'"
    ):
        get_attack("alie", knowledge="everything")
    with pytest.raises(ValueError, match="does not accept knowledge"):
        get_attack("sign_flip", knowledge="received")


def test_an_omniscient_attacker_needs_a_driver_that_sees_every_model() -> None:
    """A node (no ``knowledge`` view) cannot be omniscient: the wrapper refuses at once."""
    with pytest.raises(ValueError, match="omniscient.*needs a driver that sees every honest model"):
        ByzantineProtocol(Echo(), get_attack("ipm", knowledge="omniscient"))


# ---------------------------------------------------------------------------- in the simulator


def _alie_run(knowledge: str):
    raw = {
        "name": "knowledge",
        "seed": 3,
        "rounds": 3,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "logreg", "lr": 0.2},
        "topology": {"kind": "ring", "n": 8},
        "protocol": {"name": "dpsgd", "local_steps": 2},
        "network": {"step_time": 0.002},
        "sim": {"eval_every": 3, "threads": 1},
        # attack seed 2: peers 0 and 4, each with two honest ring neighbours
        "attack": {
            "name": "alie",
            "count": 2,
            "seed": 2,
            "params": {"z": 1.0, "knowledge": knowledge},
        },
    }
    simulation = build_simulation(scenario_from_dict(raw))
    log: list = []
    simulation.engine.on_handled(lambda peer, event, effects: log.append((peer, event, effects)))
    run_simulation(simulation, show_progress=False)
    return simulation, log


def _check_received_formula(simulation, log) -> tuple[int, int]:
    """Replay each attacker's inbox: (crafted vectors equal to the formula on exactly the
    honest models it had received, crafted vectors in all)."""
    bad = {int(i) for i in simulation.adversary.malicious}
    ids = simulation.peer_ids
    allies = {ids[i] for i in bad}
    heard: dict[int, dict[int, dict[str, torch.Tensor]]] = {p: {} for p in bad}
    equal = total = 0
    for peer, event, effects in log:
        if peer not in bad:
            continue
        if isinstance(event, MessageReceived) and event.message.kind in MODEL_KINDS:
            if event.sender not in allies and event.message.params is not None:
                heard[peer].setdefault(event.message.round, {})[event.sender] = event.message.params
        for effect in effects:
            if isinstance(effect, Send) and effect.message.kind in MODEL_KINDS:
                r = effect.message.round
                models = heard[peer].get(r) or heard[peer].get(r - 1)
                if not models:
                    continue  # nothing received yet: its own model
                expected = alie(torch.stack([models[s] for s in sorted(models)]), 1, 0, z=1.0)
                total += 1
                assert effect.message.params is not None
                equal += int(torch.allclose(effect.message.params, expected, atol=1e-6))
    return equal, total


def test_simulated_alie_uses_only_what_each_attacker_received_by_default() -> None:
    simulation, log = _alie_run("received")
    bad = [int(i) for i in simulation.adversary.malicious]
    assert bad == [0, 4]
    for i in bad:
        wrapper = simulation.engine.protocols[i]
        assert isinstance(wrapper, ByzantineProtocol)
        assert wrapper.knowledge == wrapper.received  # the wrapper's own inbox, as on a node
        assert wrapper.allies == {simulation.peer_ids[j] for j in bad} - {wrapper.peer_id}
    equal, total = _check_received_formula(simulation, log)
    assert total >= 2 * 2 * 2 and equal == total


def test_simulated_omniscient_alie_sees_more_than_the_attacker_received() -> None:
    simulation, log = _alie_run("omniscient")
    equal, total = _check_received_formula(simulation, log)
    assert total >= 2 * 2 * 2 and equal < total  # on a ring it knows 6 honest peers, not 2


def test_omniscient_knowledge_in_a_scenario_is_checked() -> None:
    raw = {"name": "x", "attack": {"name": "alie", "count": 1, "params": {"knowledge": "all"}}}
    with pytest.raises(ScenarioError, match=r"^attack: .*knowledge must be one of"):
        scenario_from_dict(raw)


def test_a_node_refuses_an_omniscient_attack_in_one_line() -> None:
    import pydantic

    from p2pfl.config import NodeAttackConfig

    with pytest.raises(pydantic.ValidationError, match="only the simulator sees"):
        NodeAttackConfig(name="alie", params={"knowledge": "omniscient"})
    assert NodeAttackConfig(name="alie", params={"knowledge": "received"}).name == "alie"
