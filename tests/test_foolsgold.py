"""FoolsGold as a defence of its own: hand-checked weights, and Sybils held off in a run."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from p2pfl.protocols.base import Message, MessageReceived, Send, Start
from p2pfl.protocols.fedavg import GLOBAL, SAMPLES, UPDATE
from p2pfl.protocols.foolsgold import FoolsGold
from sim.runner import build_simulation, run_simulation
from sim.scenario import scenario_from_dict

pytestmark = pytest.mark.timeout(120)

CLIENTS = ["a", "b", "c", "s1", "s2"]


def one_round(server: FoolsGold, round_: int, updates: dict[str, list[float]]) -> None:
    """Feed every sampled client's model: the global model plus its update."""
    start = server.params.clone()
    for client, delta in updates.items():
        model = start + torch.tensor(delta)
        message = Message(UPDATE, round_, model, {SAMPLES: 1})
        assert server.screen(client, message) is None
        server.handle(MessageReceived(1.0, client, message))


def test_sybils_sharing_one_update_get_weight_zero_by_hand() -> None:
    """Updates a = e1, b = e2, c = e3 (honest, distinct) and s1 = s2 = e1 + e2 (Sybils).

    Cosines: cs(a, s) = cs(b, s) = 1/sqrt(2), cs(s1, s2) = 1, all others 0; so
    v = (0.707, 0.707, 0, 1, 1). Pardoning: v_s > v_a, so cs(a, s) *= 0.707 / 1 = 0.5;
    the Sybils are not pardoned (no one is more similar than they are). Then
    alpha = 1 - max = (0.5, 0.5, 1, 0, 0), already max 1; the logit turns 0.5 into
    ln(1) + 0.5 = 0.5, 1 (taken as 0.99) into ln(99) + 0.5 > 1 -> 1, and 0 into 0.
    The step is (0.5 e1 + 0.5 e2 + 1 e3) / 2 = (0.25, 0.25, 0.5); plain FedAvg's would be
    the mean (0.6, 0.6, 0.2), pulled toward the Sybils.
    """
    server = FoolsGold(
        "srv",
        torch.zeros(3),
        CLIENTS,
        server="srv",
        clients_per_round=5,
        weighting="uniform",
    )
    sent = [e for e in server.handle(Start(0.0)) if isinstance(e, Send)]
    assert sorted(s.to for s in sent) == CLIENTS and all(s.message.kind == GLOBAL for s in sent)
    e1, e2, e3, sybil = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]
    one_round(server, 0, {"a": e1, "b": e2, "c": e3, "s1": sybil, "s2": sybil})
    assert server.round == 1
    assert server.scores == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0, "s1": 0.0, "s2": 0.0})
    assert server.params.tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert math.log(99) + 0.5 > 1  # why c saturates at 1

    # histories accumulate: the same updates again double every history, and cosine
    # similarity does not see the scale, so the weights are the same
    one_round(server, 1, {"a": e1, "b": e2, "c": e3, "s1": sybil, "s2": sybil})
    assert server.history["s1"].tolist() == [2.0, 2.0, 0.0]
    assert server.scores == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0, "s1": 0.0, "s2": 0.0})
    assert server.params.tolist() == pytest.approx([0.5, 0.5, 1.0])


def test_a_sybil_alone_in_a_round_is_still_compared_with_its_twin() -> None:
    """The scores cover every client's history, not only this round's senders."""
    server = FoolsGold("srv", torch.zeros(2), ["a", "s1", "s2"], server="srv", clients_per_round=3)
    server.handle(Start(0.0))
    one_round(server, 0, {"a": [1.0, 0.0], "s1": [0.0, 1.0], "s2": [0.0, 1.0]})
    server.sampled[1] = frozenset({"a", "s1"})  # the draw of round 1, set by hand
    one_round(server, 1, {"a": [1.0, 0.0], "s1": [0.0, 1.0]})
    assert server.scores == pytest.approx({"a": 1.0, "s1": 0.0})
    assert server.params.tolist() == pytest.approx([2.0, 0.0])


def test_every_update_alike_keeps_the_global_model() -> None:
    server = FoolsGold("srv", torch.zeros(2), ["s1", "s2"], server="srv", clients_per_round=2)
    server.handle(Start(0.0))
    one_round(server, 0, {"s1": [3.0, 1.0], "s2": [3.0, 1.0]})
    assert server.round == 1 and server.params.tolist() == [0.0, 0.0]


# ------------------------------------------------------------- in the simulator


def run(protocol: str, *, attack: bool) -> tuple[dict[str, Any], Any]:
    raw: dict[str, Any] = {
        "name": "foolsgold",
        "seed": 1,
        "rounds": 20,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
        "topology": {"kind": "star", "n": 11},
        # uniform: the simulator's Sybil identities hold no data share when the peers are
        # assembled, so they would declare 1 sample and weigh nothing in FedAvg's mean
        "protocol": {
            "name": protocol,
            "local_steps": 10,
            "clients_per_round": 10,
            "weighting": "uniform",
        },
        "sim": {"eval_every": 20},
    }
    if attack:  # FoolsGold's Sybil set-up: five identities, their 1s labelled 7
        raw["attack"] = {
            "name": "sybil_label_flip",
            "params": {"source": 1, "target": 7},
            "identities": 5,
            "attach": 11,  # every identity is a client of the server (peer 0)
        }
    simulation = build_simulation(scenario_from_dict(raw))
    rows = run_simulation(simulation, show_progress=False)
    return rows[-1], simulation


def test_foolsgold_holds_off_five_sybils_where_fedavg_falls() -> None:
    """Star of 11 + 5 Sybil clients (15 clients, 10 sampled a round), 20 rounds, seed 1.
    Observed: FedAvg 0.909 without attack, 0.600 with it (98% of 1s read as 7);
    FoolsGold 0.909 with it, attack success 0, every Sybil scored 0."""
    fedavg, _ = run("fedavg", attack=True)
    defended, simulation = run("foolsgold", attack=True)
    clean, _ = run("foolsgold", attack=False)
    print(
        f"fedavg+sybils {fedavg['acc_mean']:.3f} (success {fedavg['attack_success_rate']:.2f}); "
        f"foolsgold+sybils {defended['acc_mean']:.3f} "
        f"(success {defended['attack_success_rate']:.2f}); foolsgold clean {clean['acc_mean']:.3f}"
    )
    assert fedavg["attack_success_rate"] >= 0.5  # the attack is real
    assert defended["attack_success_rate"] <= 0.05
    assert defended["acc_mean"] >= clean["acc_mean"] - 0.03
    server = simulation.engine.protocols[0]
    assert isinstance(server, FoolsGold)
    sybils = {f"p{i}" for i in simulation.adversary.malicious}
    scored = {p: s for p, s in server.scores.items() if p in sybils}
    assert scored and all(score == 0.0 for score in scored.values())


def test_foolsgold_takes_no_other_aggregator() -> None:
    from sim.scenario import ScenarioError

    raw = {"protocol": {"name": "foolsgold", "clients_per_round": 2, "aggregator": "median"}}
    with pytest.raises(ScenarioError, match="foolsgold weights the updates itself"):
        scenario_from_dict(raw)
