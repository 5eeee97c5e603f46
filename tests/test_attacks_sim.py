"""Byzantine peers in protocols and in the simulator: the wrapper, the [attack] table, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2pfl.attacks import ByzantineProtocol, Collusion, get_attack
from p2pfl.attacks.behaviour import DELAY_TIMER
from p2pfl.attacks.data_poisoning import LabelFlip
from p2pfl.protocols.base import (
    Message,
    MessageReceived,
    Protocol,
    Send,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from sim.adversary import AttackConfig
from sim.runner import build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict

# ---------------------------------------------------------------------------- the wrapper


class Echo(Protocol):
    """A minimal protocol: trains from its model, sends the result to "v", keeps what it hears."""

    name = "echo"

    def __init__(self, params: torch.Tensor) -> None:
        super().__init__("bad", params, ["v"])
        self.heard: list[torch.Tensor | None] = []

    def handle(self, event):
        if isinstance(event, Start):
            return [self._train(self.params)]
        if isinstance(event, TrainingDone):
            return [
                Send("v", Message("model", self.round, event.params)),
                Send("w", Message("ping", 0)),
            ]
        if isinstance(event, MessageReceived):
            self.heard.append(event.message.params)
        return []


def _sent(effects) -> dict[str, torch.Tensor | None]:
    return {e.to: e.message.params for e in effects if isinstance(e, Send)}


def test_wrapper_replaces_sent_models_relative_to_the_round_start() -> None:
    wrapper = ByzantineProtocol(Echo(torch.tensor([1.0, 1.0])), get_attack("sign_flip", scale=2.0))
    (train,) = wrapper.handle(Start(0.0))
    assert isinstance(train, Train)
    sent = _sent(wrapper.handle(TrainingDone(1.0, train.ticket, torch.tensor([2.0, 0.0]))))
    # reference - 2 * (own - reference) = [1, 1] - 2 * [1, -1]; control messages untouched
    assert sent["v"] is not None and sent["v"].tolist() == [-1.0, 3.0] and sent["w"] is None
    assert wrapper.peer_id == "bad" and wrapper.crafted == 1


def test_rushing_wrapper_holds_its_models_until_its_timer_and_uses_what_it_heard() -> None:
    attack = get_attack("ipm", eps=1.0)
    wrapper = ByzantineProtocol(Echo(torch.zeros(2)), attack, delay=0.5)
    (train,) = wrapper.handle(Start(0.0))
    assert isinstance(train, Train)
    effects = wrapper.handle(TrainingDone(1.0, train.ticket, torch.tensor([9.0, 9.0])))
    assert _sent(effects) == {"w": None}  # the model waits; the ping does not
    assert SetTimer(DELAY_TIMER, 1.5) in effects
    wrapper.handle(MessageReceived(1.2, "h1", Message("model", 0, torch.tensor([2.0, 0.0]))))
    wrapper.handle(MessageReceived(1.3, "h2", Message("model", 0, torch.tensor([0.0, 2.0]))))
    sent = _sent(wrapper.handle(TimerFired(1.5, DELAY_TIMER)))
    assert sent["v"] is not None and sent["v"].tolist() == [-1.0, -1.0]  # -1 x the mean of the honest models heard


def test_isolated_wrapper_hears_only_itself() -> None:
    inner = Echo(torch.zeros(2))
    wrapper = ByzantineProtocol(inner, get_attack("label_flip", num_classes=2), isolate=True)
    (train,) = wrapper.handle(Start(0.0))
    assert isinstance(train, Train)
    wrapper.handle(TrainingDone(1.0, train.ticket, torch.tensor([3.0, 4.0])))
    wrapper.handle(MessageReceived(1.1, "h", Message("model", 0, torch.tensor([100.0, 100.0]))))
    heard = inner.heard[-1]
    assert heard is not None and heard.tolist() == [3.0, 4.0]


def test_colluding_identities_send_one_vector_per_round() -> None:
    collusion = Collusion()
    attack = get_attack("sybil_label_flip", num_classes=2)
    wrappers = [
        ByzantineProtocol(Echo(torch.zeros(2)), attack, collusion=collusion) for _ in range(3)
    ]
    sent: list[torch.Tensor] = []
    for i, wrapper in enumerate(wrappers):
        (train,) = wrapper.handle(Start(0.0))
        assert isinstance(train, Train)
        effects = wrapper.handle(TrainingDone(1.0, train.ticket, torch.full((2,), float(i + 1))))
        model = _sent(effects)["v"]
        assert model is not None
        sent.append(model)
    assert all(torch.equal(s, torch.ones(2)) for s in sent)  # the first identity's model


# ---------------------------------------------------------------------------- in the simulator


def _scenario(attack: dict | None, **extra) -> dict:
    raw = {
        "name": "attack",
        "seed": 2,
        "rounds": 4,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": 0.2},
        "topology": {"kind": "ring", "n": 8},
        "protocol": {"name": "dpsgd", "local_steps": 3},
        "network": {"step_time": 0.002},
        "sim": {"eval_every": 2, "threads": 1},
    }
    if attack is not None:
        raw["attack"] = attack
    raw.update(extra)
    return raw


def _recorded(simulation) -> list[tuple[int, object, list]]:
    log: list[tuple[int, object, list]] = []
    simulation.engine.on_handled(lambda peer, event, effects: log.append((peer, event, effects)))
    return log


def test_malicious_peers_send_crafted_vectors_and_honest_peers_their_own() -> None:
    attack = {"name": "sign_flip", "count": 2, "delay": 0.0}
    simulation = build_simulation(scenario_from_dict(_scenario(attack)))
    assert simulation.adversary is not None
    bad = {int(i) for i in simulation.adversary.malicious}
    assert len(bad) == 2
    log = _recorded(simulation)
    run_simulation(simulation, show_progress=False)
    checked = {"bad": 0, "honest": 0}
    for peer, event, effects in log:
        if not isinstance(event, TrainingDone):
            continue
        models = [
            e.message.params for e in effects if isinstance(e, Send) and e.message.kind == "model"
        ]
        own = torch.as_tensor(event.params).clone()
        for sent in models:
            assert sent is not None
            if peer in bad:
                assert torch.allclose(sent, 2 * start_before(log, peer, event) - own, atol=1e-6)
                checked["bad"] += 1
            else:
                assert torch.equal(sent, own)
                checked["honest"] += 1
    assert checked["bad"] >= 2 * 2 * 4 and checked["honest"] >= 6 * 2 * 4


def start_before(log, peer: int, done: TrainingDone) -> torch.Tensor:
    """The params of the Train effect that ``done`` answers."""
    for who, _, effects in log:
        for effect in effects:
            if who == peer and isinstance(effect, Train) and effect.ticket == done.ticket:
                return torch.as_tensor(effect.params).clone()
    raise AssertionError("no matching Train effect")


def test_data_poisoning_applies_to_malicious_peers_only_and_metrics_cover_honest_peers() -> None:
    attack = {"name": "label_flip", "fraction": 0.25}
    simulation = build_simulation(scenario_from_dict(_scenario(attack)))
    adversary = simulation.adversary
    assert adversary is not None
    bad = sorted(int(i) for i in adversary.malicious)
    assert len(bad) == 2 and sorted(simulation.engine.executor.transforms) == bad
    assert all(type(p).__name__ == "DPSGD" for p in simulation.engine.protocols)  # no wrapper
    x, y = torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, 9])
    assert simulation.engine.executor.transforms[bad[0]](x, y)[1].tolist() == [9, 8, 0]
    rows = run_simulation(simulation, show_progress=False)
    last = rows[-1]
    assert last["peers_evaluated"] == 6 and last["malicious_peers"] == 2
    assert last["acc_scope"] == "honest"
    assert 0.0 <= last["attack_success_rate"] <= last["attack_success_max"] <= 1.0
    assert not set(bad) & set(simulation.evaluator.last_peers)


def test_sybil_identities_are_extra_peers_sending_identical_models() -> None:
    attack = {
        "name": "sybil_label_flip",
        "identities": 3,
        "attach": 2,
        "params": {"source": 1, "target": 7},
    }
    simulation = build_simulation(scenario_from_dict(_scenario(attack)))
    engine, graph = simulation.engine, simulation.graph
    assert engine.n == 11 and simulation.peer_ids[-3:] == ["p8", "p9", "p10"]
    for s in (8, 9, 10):
        assert sorted(graph.neighbors(s)) == sorted(set(graph.neighbors(s)) - {8, 9, 10})
        assert graph.degree(s) == 2
        assert isinstance(engine.protocols[s], ByzantineProtocol)
        sampler = engine.executor.samplers[s]
        assert sampler is not None
        assert (simulation.dataset.y_train[torch.from_numpy(sampler.indices)] == 1).all()
    assert all(engine.executor.samplers[i] is not None for i in range(8))
    log = _recorded(simulation)
    rows = run_simulation(simulation, show_progress=False)
    by_round: dict[int, list[torch.Tensor]] = {}
    for peer, _, effects in log:
        for effect in effects:
            if peer >= 8 and isinstance(effect, Send) and effect.message.kind == "model":
                assert effect.message.params is not None
                by_round.setdefault(effect.message.round, []).append(effect.message.params)
    assert len(by_round) >= 4
    for models in by_round.values():
        assert len(models) == 3 * 2 and all(torch.equal(m, models[0]) for m in models)
    assert rows[-1]["peers_evaluated"] == 8 and "attack_success_rate" in rows[-1]


def test_free_riders_hold_no_data_and_byzantine_choice_is_seeded() -> None:
    attack = {"name": "free_rider", "count": 3, "seed": 7}
    first = build_simulation(scenario_from_dict(_scenario(attack)))
    again = build_simulation(scenario_from_dict(_scenario(attack)))
    assert first.adversary is not None and again.adversary is not None
    assert np.array_equal(first.adversary.malicious, again.adversary.malicious)
    for i in first.adversary.malicious:
        assert first.engine.executor.samplers[int(i)] is None
    other = build_simulation(scenario_from_dict(_scenario({**attack, "seed": 8})))
    assert other.adversary is not None
    assert not np.array_equal(first.adversary.malicious, other.adversary.malicious)


@pytest.mark.parametrize(
    "attack, message",
    [
        ({"name": "nope", "count": 1}, r"^attack: .*unknown attack 'nope'; accepted: .*alie"),
        ({"name": "label_flip"}, r"^attack: .*needs fraction or count"),
        ({"name": "alie", "fraction": 0.2, "count": 2}, r"^attack: .*fraction or count, not both"),
        (
            {"name": "ipm", "fraction": 0.2, "params": {"epsilon": 1}},
            r"^attack: .*does not accept epsilon",
        ),
        ({"name": "sybil_label_flip", "count": 2}, r"^attack: .*give identities"),
        ({"name": "alie", "fraction": 1.5}, r"^attack\.fraction: .*less than 1"),
        ({"name": "alie", "fraction": 0.2, "typo": 1}, r"^attack\.typo: "),
    ],
)
def test_attack_table_errors_are_one_line_naming_the_key(attack: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as error:
        scenario_from_dict(_scenario(attack))
    assert "\n" not in str(error.value)


def test_attack_config_fills_num_classes_from_the_dataset() -> None:
    config = AttackConfig(name="label_flip", fraction=0.1)
    flip = config.build(4).apply
    assert isinstance(flip, LabelFlip) and flip.num_classes == 4
