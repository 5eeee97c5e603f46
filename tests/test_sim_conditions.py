"""Network conditions by place (regions, links), gradual degradation and mobility."""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np
import pytest

from sim.disruptions.moving import MobilityAction
from sim.network import Network
from sim.runner import build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict


def _network(**kwargs: Any) -> Network:
    return Network(nx.path_graph(4), latency=0.01, bandwidth=1000.0, **kwargs)


def test_default_path_is_unchanged_without_conditions() -> None:
    net = _network()
    assert net.transmit(0.0, 0, 1, 500).arrival == pytest.approx(0.5 + 0.01)
    assert net.transmit(0.0, 0, 1, 500).arrival == pytest.approx(1.0 + 0.01)  # queued behind
    assert net.transmit(0.0, 0, 2, 10).unroutable  # not a link in graph mode


def test_peer_uplink_and_access_latency_by_hand() -> None:
    net = _network()
    net.set_peer(1, bandwidth=250.0, latency=0.2)
    net.set_peer(2, latency=0.05)
    # 1 -> 2: 100 bytes at 1's 250 B/s, link 0.01 + access 0.2 (sender) + 0.05 (receiver)
    assert net.transmit(0.0, 1, 2, 100).arrival == pytest.approx(0.4 + 0.01 + 0.2 + 0.05)
    # 0 -> 1: 0's default 1000 B/s, then 0.01 + 0.2 (1 is the receiver)
    assert net.transmit(0.0, 0, 1, 100).arrival == pytest.approx(0.1 + 0.01 + 0.2)
    assert net.uplink(1) == 250.0 and net.uplink(0) == 1000.0


def test_link_override_caps_rate_and_sets_latency() -> None:
    net = _network()
    net.set_link(0, 1, latency=0.3, bandwidth=100.0)
    assert net.transmit(0.0, 1, 0, 50).arrival == pytest.approx(0.5 + 0.3)  # both ways
    # the other link has no cap: 1's uplink (free at 0.5) sends it at 1000 B/s
    assert net.transmit(0.0, 1, 2, 50).arrival == pytest.approx(0.5 + 0.05 + 0.01)
    conditions = net.link_conditions(1, 0)
    assert (conditions.latency, conditions.loss, conditions.bandwidth) == (0.3, 0.0, 100.0)


def test_lossy_link_and_access_loss_compound() -> None:
    net = _network(seed=3)
    net.set_link(0, 1, loss=0.5)
    net.set_peer(1, loss=0.5)  # 1 - 0.5 * 0.5 = 0.75 lost on 0-1; 0.5 on 1-2
    lost = sum(net.transmit(float(i), 0, 1, 1).arrival is None for i in range(4000))
    assert 0.72 < lost / 4000 < 0.78
    lost = sum(net.transmit(float(i), 2, 1, 1).arrival is None for i in range(4000))
    assert 0.47 < lost / 4000 < 0.53


def test_bad_conditions_are_refused() -> None:
    net = _network()
    with pytest.raises(ValueError, match="loss"):
        net.set_link(0, 1, loss=1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        net.set_peer(0, bandwidth=0.0)


def _scenario(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "conditions",
        "seed": 2,
        "rounds": 6,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": 0.1},
        "topology": {"kind": "ring", "n": 8},
        "protocol": {"name": "dpsgd", "local_steps": 2},
        "sim": {"eval_every": 3},
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def test_a_slow_region_slows_the_run_and_nothing_else_changes() -> None:
    plain = run_simulation(build_simulation(scenario_from_dict(_scenario())), show_progress=False)
    slow = build_simulation(scenario_from_dict(_scenario(network={
        "regions": [{"name": "rural", "peers": [0, 1], "latency": 0.5, "bandwidth": 1e5}]
    })))  # fmt: skip
    rows = run_simulation(slow, show_progress=False)
    assert slow.engine.network.uplink(0) == 1e5 and slow.engine.network.uplink(2) == 12.5e6
    assert rows[-1]["virtual_time"] > plain[-1]["virtual_time"] + 6 * 0.5
    assert rows[-1]["round"] == plain[-1]["round"] == 6
    assert "round_timeouts" not in slow.engine.records  # slower, but no round waited out


@pytest.mark.parametrize(
    ("network", "needle"),
    [
        ({"regions": [{"peers": [1], "latency": 0.1, "fraction": 0.5}]}, "exactly one of"),
        ({"regions": [{"peers": [1]}]}, "at least one of"),
        ({"regions": [{"peers": [99], "loss": 0.1}]}, "network.regions.0.peers"),
        ({"regions": [{"center": [0.5, 0.5], "radius": 0.2, "loss": 0.1}]}, "geometric"),
        ({"links": [{"between": [2, 2], "loss": 0.1}]}, "two different peers"),
        ({"links": [{"between": [0, 40], "loss": 0.1}]}, "network.links.0.between"),
    ],
)
def test_bad_region_or_link_is_one_line(network: dict[str, Any], needle: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        build_simulation(scenario_from_dict(_scenario(network=network)))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_degradation_reaches_its_end_values_linearly() -> None:
    simulation = build_simulation(scenario_from_dict(_scenario(
        rounds=8,
        disruptions=[{"kind": "degrade", "at_round": 2, "over_rounds": 4, "loss": 0.4,
                      "latency_factor": 3.0, "peers": [0]}],
    )))  # fmt: skip
    seen: dict[int, float] = {}
    engine = simulation.engine

    def record(r: int) -> None:
        seen.setdefault(r, engine.network.link_conditions(0, 1).loss)

    engine.on_progress(record)
    run_simulation(simulation, show_progress=False)
    # Fired at round 2 (step 1 of 4: loss 0.1), then +0.1 a round until 0.4 at round 5.
    # This listener was added before the degradation's own (made when it fires), so from
    # round 3 on it sees the value of the round before.
    assert [round(seen[r], 9) for r in (2, 3, 4, 5, 6, 7)] == [0.1, 0.1, 0.2, 0.3, 0.4, 0.4]
    assert engine.records["degrade.steps"] == 4
    assert engine.network.link_conditions(0, 1).latency == pytest.approx(0.01 * 3.0)
    assert engine.network.link_conditions(3, 4).loss == 0.0  # not a link of peer 0


def _mobile(seed: int) -> Any:
    raw = _scenario(
        seed=seed,
        rounds=10,
        topology={"kind": "geometric", "n": 20, "params": {"radius": 0.5}},
        disruptions=[{"kind": "mobility", "at_round": 1, "speed": 0.15, "radius": 0.35}],
    )
    return build_simulation(scenario_from_dict(raw))


def test_mobility_holds_down_exactly_the_links_out_of_range() -> None:
    simulation = _mobile(seed=4)
    rows = run_simulation(simulation, show_progress=False)
    assert math.isfinite(rows[-1]["acc_mean"])
    action = next(a for a in simulation.disruptions.actions if isinstance(a, MobilityAction))
    failed = simulation.engine.network.failed_links
    for u, v in action.edges.tolist():
        far = np.hypot(*(action.positions[u] - action.positions[v])) > 0.35
        assert ((u, v) in failed) == far, (u, v)
    records = simulation.engine.records
    assert records["mobility.links_cut"] > 0 and records["mobility.links_restored"] > 0


def test_mobility_is_deterministic_under_the_seed() -> None:
    first, second = _mobile(seed=4), _mobile(seed=4)
    run_simulation(first, show_progress=False)
    run_simulation(second, show_progress=False)
    assert first.engine.network.failed_links == second.engine.network.failed_links
    assert first.engine.records["mobility.links_cut"] == second.engine.records["mobility.links_cut"]


def test_mobility_needs_a_geometric_map() -> None:
    with pytest.raises(ScenarioError, match="geometric"):
        build_simulation(scenario_from_dict(_scenario(
            disruptions=[{"kind": "mobility", "at_round": 1, "speed": 0.1, "radius": 0.2}]
        )))  # fmt: skip
