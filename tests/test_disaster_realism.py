"""Disaster realism: accuracy over every device (dead ones keep their last model) beside
the survivors', and targets re-ranked on the graph each loss leaves behind.

Runs are tiny (logistic regression on digits, 12-13 peers, a few rounds) and seeded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pytest

from p2pfl.learning import evaluate
from sim.disruptions import DisruptionError, choose_targets, parse_disruption
from sim.mixing import plain
from sim.runner import Simulation, build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict
from topologies import select_peers


def scenario(disruptions: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "realism",
        "seed": 3,
        "rounds": 6,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 8},
        "model": {"name": "logreg", "lr": 0.1},
        "topology": {"kind": "ring", "n": 12},
        "protocol": {"name": "dpsgd", "local_steps": 1, "round_timeout": 0.2},
        "network": {"step_time": 0.01},
        "sim": {"eval_every": 100, "threads": 1},
        "disruptions": disruptions,
    }
    raw.update(overrides)
    return raw


def accuracy_of(simulation: Simulation, peer: int) -> float:
    """One peer's model evaluated on its own, outside the evaluator's batching."""
    ev = simulation.evaluator
    params = plain(simulation.engine.protocols[peer].params)
    return float(evaluate(ev.trainer, params, ev.x_test, ev.y_test).accuracy[0])


# ------------------------------------------------------------------ accuracy over all devices


def test_all_devices_accuracy_counts_the_dead_with_their_last_model() -> None:
    raw = scenario([{"kind": "crash", "at_round": 1, "count": 4, "name": "quake"}])
    simulation = build_simulation(scenario_from_dict(raw))
    rows = run_simulation(simulation, show_progress=False)
    first, last = rows[0], rows[-1]
    # before the crash nobody is dead: both views agree
    assert first["acc_mean_all"] == pytest.approx(first["acc_mean"])
    assert first["peers_evaluated_all"] == first["peers_evaluated"] == 12

    assert simulation.disruptions is not None
    dead = set(simulation.disruptions.changes[0].down)
    assert len(dead) == 4 and last["peers_alive"] == 8
    by_peer = {p: accuracy_of(simulation, p) for p in range(12)}
    survivors = [by_peer[p] for p in range(12) if p not in dead]
    everyone = list(by_peer.values())
    assert last["peers_evaluated"] == 8 and last["peers_evaluated_all"] == 12
    assert last["acc_mean"] == pytest.approx(np.mean(survivors), abs=1e-12)
    assert last["acc_mean_all"] == pytest.approx(np.mean(everyone), abs=1e-12)
    assert last["acc_min_all"] == pytest.approx(min(everyone), abs=1e-12)
    assert last["acc_max_all"] == pytest.approx(max(everyone), abs=1e-12)
    assert last["acc_std_all"] == pytest.approx(np.std(everyone, ddof=1), abs=1e-12)
    # the dead stopped learning after round 1, so the survivors' mean flatters the network
    assert last["acc_mean_all"] != pytest.approx(last["acc_mean"], abs=1e-6)
    assert last["acc_mean_all"] < last["acc_mean"]


# ------------------------------------------------------------------ recomputed targets


def two_hubs() -> nx.Graph:
    """Hub 0 with leaves 1-5, hub 6 with leaves 7-9, joined by the path 0-10-11-12-6.

    Betweenness (pairs whose shortest path crosses the peer), counted by hand:
    0: C(5,2) + 5*7 = 45; 10: 6*6 = 36; 11: 7*5 = 35; 12: 8*4 = 32; 6: C(3,2) + 3*9 = 30.
    Once 0 is gone the leaves 1-5 are cut off and what is left is 10-11-12-6-{7,8,9}:
    10: 0; 11: 1*5 = 5; 12: 2*4 = 8; 6: C(3,2) + 3*3 = 12, so hub 6 comes next.
    Once 6 is gone too, only 11 (the middle of 10-11-12) lies on a path.
    """
    g = nx.Graph()
    g.add_edges_from((0, leaf) for leaf in range(1, 6))
    g.add_edges_from((6, leaf) for leaf in range(7, 10))
    g.add_edges_from([(0, 10), (10, 11), (11, 12), (12, 6)])
    return g


def test_hand_counted_betweenness_of_the_two_hubs() -> None:
    score = nx.betweenness_centrality(two_hubs(), normalized=False)
    assert {p: score[p] for p in (0, 10, 11, 12, 6)} == {0: 45, 10: 36, 11: 35, 12: 32, 6: 30}


def test_recomputed_betweenness_takes_the_second_hub_not_the_path() -> None:
    g = two_hubs()
    assert select_peers(g, 3, "betweenness", seed=1) == [0, 10, 11]  # ranked once
    assert select_peers(g, 3, "betweenness", seed=1, recompute=True) == [0, 6, 11]
    # degree too: 0 (6 links), 6 (4 links), then on what is left 11 is the only one with 2
    assert select_peers(g, 3, "degree", seed=1, recompute=True) == [0, 6, 11]
    assert select_peers(g, 2, "degree", seed=1)[:2] == [0, 6]


def test_crash_in_steps_ranks_each_step_on_the_graph_left() -> None:
    g = two_hubs()
    again = parse_disruption("crash:count=1,strategy=betweenness,recompute=true")
    once = parse_disruption("crash:count=1,strategy=betweenness")
    step1 = choose_targets(again, g, seed=7).peers
    assert step1 == (0,)
    alive = set(g) - set(step1)
    assert choose_targets(again, g, seed=7, alive=alive).peers == (6,)
    assert choose_targets(once, g, seed=7, alive=alive).peers == (10,)  # intact-graph ranking
    # failed links are losses too: with 0-1 .. 0-4 cut, what is left is the chain
    # 5-0-10-11-12-6-{7,8,9} plus four lone leaves, where 6 lies on C(3,2) + 3*5 = 18
    # paths, more than 12 (4*4 = 16) or 0 (1*7 = 7)
    cut = {(0, leaf) for leaf in range(1, 5)}
    assert choose_targets(again, g, seed=7, failed_links=cut).peers == (6,)
    assert choose_targets(once, g, seed=7, failed_links=cut).peers == (0,)


def test_recompute_in_a_simulation_follows_the_losses(tmp_path: Path) -> None:
    path = tmp_path / "two_hubs.edges"
    path.write_text("".join(f"{u} {v}\n" for u, v in sorted(two_hubs().edges)))
    steps = [
        {"kind": "crash", "at_round": r, "count": 1, "strategy": "betweenness", "recompute": True}
        for r in (1, 2)
    ]
    raw = scenario(
        steps, rounds=3, topology={"kind": "file", "n": 13, "params": {"path": str(path)}}
    )
    simulation = build_simulation(scenario_from_dict(raw))
    assert simulation.graph.number_of_nodes() == 13
    run_simulation(simulation, show_progress=False)
    assert simulation.disruptions is not None
    downs = [change.down for change in simulation.disruptions.changes]
    # node labels follow the file's order of first appearance; map back by structure
    hub_a = max(simulation.graph, key=simulation.graph.degree)
    assert downs[0] == (hub_a,)
    rest = nx.Graph(simulation.graph)
    rest.remove_node(hub_a)
    expected = nx.betweenness_centrality(rest)
    assert downs[1] == (max(expected, key=expected.__getitem__),)
    assert simulation.graph.degree(downs[1][0]) == 4  # the second hub, not the path


@pytest.mark.parametrize(
    "extra",
    [{"strategy": "random"}, {"peers": [1, 2]}, {"strategy": "degree", "recompute": "sometimes"}],
)
def test_recompute_is_checked_in_the_config(extra: dict[str, Any]) -> None:
    table: dict[str, Any] = {"kind": "crash", "at_round": 1, "recompute": True}
    table.update(extra)
    if "peers" not in table:
        table["count"] = 2
    with pytest.raises(ScenarioError) as caught:
        scenario_from_dict(scenario([table]))
    message = str(caught.value)
    assert "\n" not in message and "recompute" in message
    with pytest.raises(DisruptionError, match="recompute"):
        parse_disruption("crash:count=2,recompute=true")


def test_recompute_shows_in_the_label() -> None:
    spec = parse_disruption("crash:count=2,strategy=degree,recompute=true")
    assert spec.label == "crash 2 (degree, recomputed)"
