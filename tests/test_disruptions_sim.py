"""Disruptions in the simulator: each kind does what it says, on small graphs.

Runs are tiny (logistic regression on digits, a handful of peers and rounds) and fully
deterministic; what a test checks is observed through the engine (who is alive, who
received what, when) rather than through accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.protocols.base import MessageReceived, Protocol
from p2pfl.protocols.dpsgd import DPSGD
from sim.disruption_metrics import connectivity_row
from sim.disruptions import DisruptionError, DisruptionRuntime, parse_disruption
from sim.disruptions.config import Crash
from sim.runner import Simulation, build_simulation, run_simulation, write_run
from sim.scenario import ScenarioError, load_scenario, scenario_from_dict
from topologies import build_graph

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "disaster"
LATENCY = 0.01  # the scenario default


def scenario(disruptions: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "disrupt",
        "seed": 5,
        "rounds": 8,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 8},
        "model": {"name": "logreg", "lr": 0.1},
        "topology": {"kind": "ring", "n": 6},
        "protocol": {"name": "dpsgd", "local_steps": 1, "round_timeout": 0.2},
        "network": {"step_time": 0.01},
        "sim": {"eval_every": 100, "threads": 1},
        "disruptions": disruptions,
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return raw


def build(raw: dict[str, Any]) -> Simulation:
    return build_simulation(scenario_from_dict(raw))


def disruptions_of(simulation: Simulation) -> DisruptionRuntime:
    """The run's disruption runtime (every scenario here has disruptions)."""
    assert simulation.disruptions is not None
    return simulation.disruptions


def alive(protocol: Protocol) -> set[str]:
    """The neighbours a D-PSGD peer (every scenario here) believes alive."""
    assert isinstance(protocol, DPSGD)
    return protocol.alive


def record_deliveries(simulation: Simulation) -> list[tuple[float, int, int]]:
    """(time, sender, receiver) of every model a live peer received."""
    engine = simulation.engine
    seen: list[tuple[float, int, int]] = []

    def on_handled(peer: int, event: Any, effects: Any) -> None:
        if isinstance(event, MessageReceived):
            seen.append((event.now, engine.index[event.sender], peer))

    engine.on_handled(on_handled)
    return seen


def probe(simulation: Simulation, at: float) -> dict[str, Any]:
    """Copy who is alive and started at virtual time ``at``."""
    state: dict[str, Any] = {}
    engine = simulation.engine

    def look(now: float) -> None:
        state.update(alive=engine.alive.copy(), started=engine.started.copy(), now=now)

    engine.schedule(at, look)
    return state


# ---------------------------------------------------------------------------- crash


def test_degree_crash_takes_the_hub_which_stops_sending():
    raw = scenario(
        [{"kind": "crash", "at_round": 2, "count": 1, "strategy": "degree"}],
        topology={"kind": "star", "n": 6},
    )
    simulation = build(raw)
    deliveries = record_deliveries(simulation)
    rows = run_simulation(simulation, show_progress=False)
    change = disruptions_of(simulation).changes[0]
    assert change.down == (0,)  # peer 0 is the star's hub
    assert not simulation.engine.alive[0]
    assert rows[-1]["peers_alive"] == 5
    # nothing from the hub arrived after it crashed (its last messages were already in flight)
    assert not [d for d in deliveries if d[1] == 0 and d[0] > change.time + 2 * LATENCY]
    # the leaves found out from failed sends, nobody told them
    for leaf in range(1, 6):
        assert "p0" not in alive(simulation.engine.protocols[leaf])
    assert rows[-1]["components"] == 5 and rows[-1]["isolated_peers"] == 5
    assert simulation.events == [(2, "crash 1 (degree)")]


def test_crash_among_relays_or_data_holders_picks_from_that_pool():
    for among in ("relays", "data_holders"):
        raw = scenario(
            [{"kind": "crash", "at_round": 1, "count": 2, "among": among}],
            topology={"kind": "ring", "n": 8},
            data={"relay_fraction": 0.5},
            rounds=2,
        )
        simulation = build(raw)
        run_simulation(simulation, show_progress=False)
        down = set(disruptions_of(simulation).changes[0].down)
        relays = {int(r) for r in simulation.relays}
        assert len(down) == 2
        assert down <= relays if among == "relays" else not down & relays


def test_selection_is_deterministic_under_the_scenario_seed():
    def crashed(seed: int) -> tuple[int, ...]:
        raw = scenario(
            [{"kind": "crash", "at_time": 0.0, "count": 3}], topology={"kind": "ring", "n": 12}
        )
        simulation = build({**raw, "seed": seed, "rounds": 1})
        run_simulation(simulation, show_progress=False)
        return disruptions_of(simulation).changes[0].down

    assert crashed(1) == crashed(1)
    assert len({crashed(seed) for seed in range(1, 6)}) > 1


def test_recover_brings_the_same_peers_back_and_they_greet_their_neighbours():
    raw = scenario(
        [
            {"kind": "crash", "name": "quake", "at_round": 2, "peers": [0]},
            {"kind": "recover", "of": "quake", "at_round": 4},
        ],
        rounds=8,
    )
    simulation = build(raw)
    run_simulation(simulation, show_progress=False)
    changes = disruptions_of(simulation).changes
    assert changes[0].down == (0,) and changes[1].up == (0,)
    engine = simulation.engine
    assert engine.alive[0]
    assert engine.stats.rounds_done[0] >= 6  # it caught up and went on
    # its neighbours had dropped it after failed sends; the greeting put it back
    assert "p0" in alive(engine.protocols[1]) and "p0" in alive(engine.protocols[5])


def test_data_loss_leaves_the_peer_up_and_relaying_without_data():
    raw = scenario(
        [{"kind": "data_loss", "at_round": 2, "peers": [3]}], rounds=6, sim={"eval_every": 2}
    )
    simulation = build(raw)
    deliveries = record_deliveries(simulation)
    rows = run_simulation(simulation, show_progress=False)
    assert simulation.engine.alive.all()
    assert simulation.engine.executor.samplers[3] is None and simulation.data_sizes[3] == 0
    assert [d for d in deliveries if d[1] == 3 and d[0] > disruptions_of(simulation).changes[0].time]
    assert "acc_without_data" in rows[-1] and "acc_without_data" not in rows[0]


# ---------------------------------------------------------------------------- links


def test_link_failure_makes_sends_over_that_link_fail():
    raw = scenario([{"kind": "link_failure", "at_time": 0.0, "links": [[0, 1]]}])
    simulation = build(raw)
    deliveries = record_deliveries(simulation)
    rows = run_simulation(simulation, show_progress=False)
    assert rows[-1]["round"] == 8
    assert not [d for d in deliveries if {d[1], d[2]} == {0, 1}]
    assert [d for d in deliveries if {d[1], d[2]} == {1, 2}]
    protocols = simulation.engine.protocols
    assert "p1" not in alive(protocols[0]) and "p0" not in alive(protocols[1])
    assert "p5" in alive(protocols[0])  # the other link still works
    assert rows[-1]["links_failed"] == 1 and rows[-1]["components"] == 1  # a ring minus one link


def test_partition_stops_traffic_across_the_cut_and_heal_restores_it():
    raw = scenario(
        [
            {"kind": "partition", "at_round": 2, "parts": 2, "method": "spectral", "name": "split"},
            {"kind": "heal", "at_round": 6},
        ],
        topology={"kind": "ring", "n": 8},
        rounds=12,
        sim={"eval_every": 2},
    )
    simulation = build(raw)
    deliveries = record_deliveries(simulation)
    rows = run_simulation(simulation, show_progress=False)
    split, heal = disruptions_of(simulation).changes
    assert len(split.cut) == 2 and sorted(heal.restored) == sorted(split.cut)
    g = nx.cycle_graph(8)
    g.remove_edges_from(split.cut)
    side = {v: i for i, comp in enumerate(nx.connected_components(g)) for v in comp}
    across = [t for t, u, v in deliveries if side[u] != side[v]]
    assert not [t for t in across if split.time + 2 * LATENCY < t < heal.time]
    assert [t for t in across if t > heal.time]  # traffic flows again
    # both ends of each healed link learnt the other is back
    for u, v in split.cut:
        assert f"p{v}" in alive(simulation.engine.protocols[u])
    by_round = {r["round"]: r for r in rows}
    assert by_round[4]["components"] == 2 and by_round[4]["largest_component"] == 4
    assert rows[-1]["components"] == 1 and rows[-1]["links_failed"] == 0


# ---------------------------------------------------------------------------- region


def test_region_outage_kills_exactly_the_peers_inside_the_radius():
    center, radius = (0.4, 0.6), 0.3
    raw = scenario(
        [{"kind": "region_outage", "at_time": 0.05, "center": list(center), "radius": radius}],
        topology={"kind": "geometric", "n": 30, "params": {"radius": 0.35}},
        rounds=3,
    )
    simulation = build(raw)
    run_simulation(simulation, show_progress=False)
    pos = nx.get_node_attributes(simulation.graph, "pos")
    inside = {v for v, (x, y) in pos.items() if math.hypot(x - center[0], y - center[1]) <= radius}
    assert 0 < len(inside) < 30
    assert set(disruptions_of(simulation).changes[0].down) == inside
    assert {int(v) for v in np.flatnonzero(~simulation.engine.alive)} == inside


def test_region_outage_needs_a_geometric_graph():
    raw = scenario([{"kind": "region_outage", "at_round": 1, "center": [0.5, 0.5], "radius": 0.2}])
    with pytest.raises(
        ScenarioError, match=r"disruptions\.0 \(region_outage\): needs a geometric graph"
    ):
        build(raw)


# ---------------------------------------------------------------------------- battery


def test_idle_drain_empties_a_battery_at_capacity_over_rate():
    raw = scenario(
        [{"kind": "battery", "count": 1, "capacity_j": 0.3, "idle_drain_per_s_j": 1.0}],
        rounds=100,
        protocol={"round_timeout": 0.05},
    )
    simulation = build(raw)
    rows = run_simulation(simulation, show_progress=False)
    runtime = disruptions_of(simulation)
    (peer,) = runtime.batteries
    assert runtime.depleted_at == {peer: pytest.approx(0.3)}
    assert not simulation.engine.alive[peer]
    assert rows[-1]["peers_depleted"] == 1 and rows[-1]["peers_alive"] == 5
    assert any(label == "first battery empty" for _, label in simulation.events)


def test_training_drain_stops_a_peer_after_its_energy_for_two_rounds():
    # 1 J per step, 5 steps per round: the second round's training empties 10 J.
    raw = scenario(
        [{"kind": "battery", "capacity_j": 10.0, "drain_per_step_j": 1.0, "heterogeneity": 0.0}],
        protocol={"local_steps": 5},
        rounds=6,
    )
    simulation = build(raw)
    run_simulation(simulation, show_progress=False)
    engine = simulation.engine
    assert disruptions_of(simulation).depleted == set(range(6))
    assert list(engine.stats.rounds_done) == [1] * 6  # crashed as round 1's training began
    assert not engine.alive.any()


def test_battery_capacities_vary_within_the_heterogeneity():
    raw = scenario([{"kind": "battery", "capacity_j": 100.0, "heterogeneity": 0.5}], rounds=1)
    simulation = build(raw)
    run_simulation(simulation, show_progress=False)
    capacities = [b.capacity_j for b in disruptions_of(simulation).batteries.values()]
    assert len(capacities) == 6 and len(set(capacities)) == 6
    assert all(50.0 <= c <= 150.0 for c in capacities)


# ---------------------------------------------------------------------------- join, churn


def test_join_starts_peers_late_and_they_catch_up():
    raw = scenario(
        [{"kind": "join", "at_time": 0.3, "peers": [2, 3]}], rounds=12, network={"step_time": 0.05}
    )
    simulation = build(raw)
    before = probe(simulation, 0.25)
    rows = run_simulation(simulation, show_progress=False)
    assert not before["alive"][[2, 3]].any() and not before["started"][[2, 3]].any()
    assert before["alive"][[0, 1, 4, 5]].all()
    engine = simulation.engine
    assert engine.alive.all() and engine.started.all()
    assert rows[0]["peers_alive"] == 4 and rows[-1]["peers_alive"] == 6
    assert engine.stats.rounds_done[2] > 0
    # the neighbours that had written them off after failed sends heard them join
    assert "p2" in alive(engine.protocols[1]) and "p3" in alive(engine.protocols[4])


def test_churn_follows_its_trace():
    trace = [[0.1, 2, "leave"], [0.3, 2, "join"], [0.2, 4, "leave"]]
    raw = scenario([{"kind": "churn", "trace": trace}], rounds=12, network={"step_time": 0.05})
    simulation = build(raw)
    probes = {t: probe(simulation, t) for t in (0.05, 0.15, 0.25, 0.35)}
    run_simulation(simulation, show_progress=False)
    alive_at = {t: (bool(p["alive"][2]), bool(p["alive"][4])) for t, p in probes.items()}
    assert alive_at == {
        0.05: (True, True),
        0.15: (False, True),
        0.25: (False, False),
        0.35: (True, False),
    }


def test_drawn_churn_is_reproducible_and_leaves_the_other_peers_alone():
    churn = {"kind": "churn", "count": 2, "mean_session": 0.2, "mean_downtime": 0.1, "horizon": 1.0}
    raw = scenario([churn], rounds=12, network={"step_time": 0.05})
    first, second = build(raw), build(raw)
    seen = [record_deliveries(s) for s in (first, second)]
    down: set[int] = set()

    def watch(peer: int, event: Any, effects: Any) -> None:
        down.update(int(p) for p in np.flatnonzero(~first.engine.alive))

    first.engine.on_handled(watch)
    for simulation in (first, second):
        run_simulation(simulation, show_progress=False)
    assert seen[0] == seen[1]
    churning = set(disruptions_of(first).members[0])
    assert len(churning) == 2 and down == churning


# ---------------------------------------------------------------------------- metrics


def test_component_metrics_on_a_hand_built_split():
    # two triangles joined by the link 2-3, plus peer 6 hanging off peer 5 and dead peer 7
    g = nx.Graph([(0, 1), (1, 2), (0, 2), (2, 3), (3, 4), (4, 5), (3, 5), (5, 6), (6, 7)])
    alive = np.array([True] * 7 + [False])
    peers = [0, 1, 2, 3, 4, 5, 6]
    accuracy = [0.9, 0.8, 0.7, 0.4, 0.5, 0.6, 0.1]
    row = connectivity_row(g, alive, {(2, 3), (5, 6)}, peers, accuracy)
    assert row["components"] == 3
    assert row["largest_component"] == 3 and row["largest_component_frac"] == 3 / 8
    assert row["isolated_peers"] == 1 and row["links_failed"] == 2
    assert row["alive_frac"] == 7 / 8
    # the largest component is {0, 1, 2} (ties go to the smallest peer id)
    assert row["acc_largest_component"] == pytest.approx(0.8)
    assert row["acc_outside_largest"] == pytest.approx((0.4 + 0.5 + 0.6 + 0.1) / 4)
    assert row["acc_isolated"] == pytest.approx(0.1)
    assert row["acc_component_min"] == pytest.approx(0.1)
    assert row["acc_by_component"] == "3:0.8000;3:0.5000;1:0.1000"
    # a sample of evaluated peers: components without one are left out
    sampled = connectivity_row(g, alive, {(2, 3), (5, 6)}, [3, 4], [0.4, 0.5])
    assert math.isnan(sampled["acc_largest_component"]) and math.isnan(sampled["acc_isolated"])
    assert sampled["acc_by_component"] == "3:0.4500"


# ---------------------------------------------------------------------------- run folder, CLI


def test_run_folder_has_connectivity_plots_graphs_and_log(tmp_path):
    raw = scenario(
        [{"kind": "crash", "at_round": 2, "count": 1, "strategy": "betweenness"}],
        rounds=4,
        sim={"eval_every": 1},
    )
    simulation = build(raw)
    run_simulation(simulation, show_progress=False)
    out = write_run(simulation, tmp_path / "run")
    for name in ("disruption.png", "graph_before.png", "graph_after.png", "accuracy_vs_rounds.png"):
        assert (out / name).stat().st_size > 0, name
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"components", "largest_component", "acc_largest_component", "peers_depleted"} <= set(
        header
    )
    log = json.loads((out / "disruptions.json").read_text())
    assert log["fired"][0]["kind"] == "crash" and len(log["fired"][0]["down"]) == 1
    # the resolved config keeps its disruptions and runs again
    crash = load_scenario(out / "config.toml").disruptions[0]
    assert isinstance(crash, Crash) and crash.strategy == "betweenness"


def test_no_connectivity_columns_without_disruptions():
    simulation = build(scenario([], rounds=1))
    rows = run_simulation(simulation, show_progress=False)
    assert simulation.disruptions is None and "components" not in rows[-1]
    asked = build(scenario([], rounds=1, sim={"connectivity": True}))
    assert "components" in run_simulation(asked, show_progress=False)[-1]


def test_topo_draws_the_graph_before_and_after_a_disruption(tmp_path):
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    result = CliRunner().invoke(
        app,
        ["topo", "geometric", "-n", "60", "-p", "radius=0.25", "--png", str(before),
         "--disrupt", "region_outage:center=0.5,0.5,radius=0.25", "--after", str(after)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert before.stat().st_size > 0 and after.stat().st_size > 0
    assert "outage r=0.25 at (0.5, 0.5)" in result.output
    bad = CliRunner().invoke(app, ["topo", "ring", "--disrupt", "crash:cont=2"])
    assert bad.exit_code == 2 and "cont: Extra inputs are not permitted" in bad.output


def test_one_line_disruptions_parse_lists_and_reject_processes():
    spec = parse_disruption("region_outage:center=0.2,0.8,radius=0.1")
    assert spec.center == (0.2, 0.8) and spec.radius == 0.1 and spec.at_time == 0.0
    assert parse_disruption("crash:count=3,strategy=degree,at_round=4").at_round == 4
    g = build_graph("ring", 8)
    from sim.disruptions import preview_disruption

    with pytest.raises(DisruptionError, match="only crash"):
        preview_disruption(g, "battery:capacity_j=3")


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "disruption, message",
    [
        (
            {"kind": "crash", "at_round": 1, "count": 2, "colour": "red"},
            "disruptions.0.colour: Extra inputs",
        ),
        ({"kind": "crash", "count": 2}, "disruptions.0: needs at_round or at_time"),
        (
            {"kind": "crash", "at_round": 1, "at_time": 2.0, "count": 1},
            "at_round or at_time, not both",
        ),
        (
            {"kind": "crash", "at_round": 1, "count": 2, "fraction": 0.5},
            "exactly one of count, fraction, peers",
        ),
        (
            {"kind": "crash", "at_round": 1, "count": 1, "strategy": "loudest"},
            "disruptions.0.strategy: Input should be",
        ),
        (
            {"kind": "crash", "at_round": 1, "fraction": 1.5},
            "disruptions.0.fraction: Input should be less than",
        ),
        ({"kind": "meteor", "at_round": 1}, "disruptions.0: Input tag 'meteor'"),
        ({"kind": "data_loss", "at_round": 1}, "exactly one of count, fraction, peers"),
        (
            {"kind": "region_outage", "at_round": 1, "center": [0.5, 0.5]},
            "disruptions.0.radius: Field required",
        ),
        (
            {"kind": "battery", "capacity_j": 0},
            "disruptions.0.capacity_j: Input should be greater than 0",
        ),
        ({"kind": "churn", "mean_session": 2.0}, "give a trace, or mean_session"),
        (
            {"kind": "churn", "trace": [[1.0, 0, "vanish"]]},
            "disruptions.0.trace.0.2: Input should be",
        ),
        (
            {"kind": "recover", "at_round": 3},
            "disruptions.0 (recover) has no earlier crash or region_outage",
        ),
    ],
)
def test_bad_disruptions_name_the_key(disruption, message):
    with pytest.raises(ScenarioError) as error:
        scenario_from_dict(scenario([disruption]))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_references_and_counts_are_checked():
    named = [
        {"kind": "partition", "at_round": 1, "name": "split"},
        {"kind": "heal", "at_round": 2, "of": "quake"},
    ]
    with pytest.raises(ScenarioError, match="no earlier partition or link_failure named 'quake'"):
        scenario_from_dict(scenario(named))
    twice = [{"kind": "crash", "at_round": 1, "count": 1, "name": "x"}] * 2
    with pytest.raises(ScenarioError, match="names must be unique: x"):
        scenario_from_dict(scenario(twice))
    too_many = [{"kind": "crash", "at_round": 1, "count": 4, "among": "relays"}]
    with pytest.raises(
        ScenarioError, match=r"disruptions\.0 \(crash\): count=4 but only 3 peers among relays"
    ):
        build(scenario(too_many, data={"relay_fraction": 0.5}))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_disaster_examples_are_valid(path):
    assert load_scenario(path).disruptions


def test_a_disruption_after_the_last_round_is_said_not_silently_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A scenario run shorter than it was written (``--set rounds=3``) keeps its disruptions;
    one that can never fire is said in the log, not silently left out of the study."""
    raw = scenario([{"kind": "crash", "at_round": 5, "count": 1}, {"kind": "crash", "at_round": 1, "count": 1}])
    raw["rounds"] = 3
    with caplog.at_level("WARNING", logger="p2pfl.sim"):
        build(raw)
    warned = [r.getMessage() for r in caplog.records if "never fires" in r.getMessage()]
    assert warned == ["disruptions[0] (crash) at_round = 5 never fires: the run has 3 rounds"]
