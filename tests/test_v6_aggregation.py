"""Robust rules with too few models outside the round protocols (helper v6).

``SynchronousRoundProtocol`` keeps its own model when a robust rule with a fixed ``f``
gets too few models (``TooFewVectors``); FedAvg's server called the same rules on its
updates without that, so clients that stayed silent (crashed, or an attacker's) made
the server raise mid-run: the simulation ended with a traceback, a node's server lost
its protocol. It now keeps the global model for that round, as for fewer than
``min_updates``, and the simulator refuses up front a sample that could never feed the
rule (as it does for D-PSGD's neighbourhoods).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pfl.aggregation import get_aggregator
from p2pfl.protocols.base import (
    Message,
    MessageReceived,
    Record,
    RoundCompleted,
    Send,
    Start,
    TimerFired,
)
from p2pfl.protocols.fedavg import GLOBAL, ROUND_TIMER, SAMPLES, UPDATE, FedAvg
from sim.runner import build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict

pytestmark = pytest.mark.timeout(120)


def _update(sender: str, value: float) -> MessageReceived:
    return MessageReceived(1.0, sender, Message(UPDATE, 0, torch.full((3,), value), {SAMPLES: 1}))


def test_fedavg_with_too_few_updates_for_krum_keeps_the_global_model() -> None:
    """Krum with f = 1 needs 5 rows: the server's own and 4 updates. One sampled client
    stays silent: 4 rows. The round ends at its timer with the global model as it was,
    says why, and the next round is opened."""
    clients = ["a", "b", "c", "d"]
    server = FedAvg("s", torch.zeros(3), clients, server="s", clients_per_round=4,
                    round_timeout=1.0, aggregate=get_aggregator("krum", f=1))  # fmt: skip
    server.handle(Start(0.0))
    for name, value in zip(clients[:3], (1.0, 1.1, 50.0), strict=True):
        assert server.handle(_update(name, value)) == []
    effects = server.handle(TimerFired(1.5, ROUND_TIMER))  # d never answered
    assert torch.equal(server.params, torch.zeros(3))
    assert Record("too_few_to_aggregate", 1.0) in effects and RoundCompleted(0) in effects
    assert server.round == 1
    assert any(isinstance(e, Send) and e.message.kind == GLOBAL and e.message.round == 1 for e in effects)


def _fedavg(**protocol: Any) -> Any:
    return scenario_from_dict({
        "name": "v6-fedavg-krum",
        "seed": 2,
        "rounds": 6,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [8], "lr": 0.1},
        "topology": {"kind": "star", "n": 7},
        "protocol": {"name": "fedavg", "local_steps": 1, "round_timeout": 1.0,
                     "aggregator": "krum", "aggregator_params": {"f": 1}, **protocol},
        "disruptions": [{"kind": "crash", "peers": [1, 2, 3], "at_round": 2}],
        "sim": {"eval_every": 2, "threads": 1},
    })  # fmt: skip


def test_a_simulated_fedavg_run_whose_clients_crash_under_krum_completes() -> None:
    """Six clients a round feed Krum (f = 1) until three of them crash at round 2: then
    at most 4 rows. The run completes; those rounds keep the global model."""
    simulation = build_simulation(_fedavg(clients_per_round=6))
    rows = run_simulation(simulation, show_progress=False)
    assert rows[-1]["round"] == 6
    server = simulation.engine.protocols[0]
    assert getattr(server, "inner", server).round >= 6


def test_a_fedavg_sample_that_can_never_feed_the_rule_is_refused_up_front() -> None:
    with pytest.raises(ScenarioError, match=r"protocol.aggregator_params: krum with f = 1 .*clients_per_round = 3"):
        build_simulation(_fedavg(clients_per_round=3))


def test_a_modest_sample_that_can_never_feed_the_rule_is_refused_up_front() -> None:
    """A MoDeST aggregator combines at most ``sample_size`` trained models and its own:
    4 + 1 rows can never feed Krum with f = 2 (7 needed). Before this check the run
    raised ``TooFewVectors`` from the first aggregation."""
    scenario = scenario_from_dict({
        "name": "v6-modest-krum",
        "seed": 2,
        "rounds": 2,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [8], "lr": 0.1},
        "topology": {"kind": "complete", "n": 8},
        "protocol": {"name": "modest", "sample_size": 4, "local_steps": 1,
                     "aggregator": "krum", "aggregator_params": {"f": 2}},
        "network": {"mode": "overlay"},
        "sim": {"eval_every": 1, "threads": 1},
    })  # fmt: skip
    with pytest.raises(ScenarioError, match=r"modest combines at most 5 models .*sample_size = 4"):
        build_simulation(scenario)


def test_a_sybilwall_neighbourhood_that_can_never_feed_the_rule_is_refused_up_front() -> None:
    """SybilWall mixes a peer's neighbours as D-PSGD does (with its own weights): on a
    ring, 3 models a round can never feed Krum with f = 1, so every round kept the own
    model, silently. Refused as D-PSGD's is."""
    scenario = scenario_from_dict({
        "name": "v6-sybilwall-krum",
        "seed": 2,
        "rounds": 2,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [8], "lr": 0.1},
        "topology": {"kind": "ring", "n": 6},
        "protocol": {"name": "sybilwall", "local_steps": 1, "aggregator": "krum", "aggregator_params": {"f": 1}},
        "sim": {"eval_every": 1, "threads": 1},
    })  # fmt: skip
    with pytest.raises(ScenarioError, match=r"protocol.aggregator_params: krum with f = 1 .*2 neighbours"):
        build_simulation(scenario)


def test_a_modest_run_whose_trainers_crash_under_krum_completes() -> None:
    """Six trainers a round feed Krum (f = 1) at an aggregator until seven of the twelve
    peers crash at round 2: then too few models. The run completes (no TooFewVectors)."""
    scenario = scenario_from_dict({
        "name": "v6-modest-krum-crash", "seed": 5, "rounds": 8,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [8], "lr": 0.1},
        "topology": {"kind": "complete", "n": 12},
        "protocol": {"name": "modest", "sample_size": 6, "num_aggregators": 2, "local_steps": 1,
                     "aggregator": "krum", "aggregator_params": {"f": 1}},
        "network": {"mode": "overlay"},
        "disruptions": [{"kind": "crash", "peers": [1, 2, 3, 4, 5, 6, 7], "at_round": 2}],
        "sim": {"eval_every": 2, "threads": 1},
    })
    rows = run_simulation(build_simulation(scenario), show_progress=False)
    assert rows[-1]["round"] == 8
