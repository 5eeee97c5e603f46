"""End-to-end tests of the simulator: convergence, determinism, batching, scenario errors."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.protocols.dpsgd import DPSGD
from sim.runner import build_simulation, run_simulation, write_run
from sim.scenario import ScenarioError, load_scenario, scenario_from_dict

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def small(protocol: dict, **overrides) -> dict:
    raw: dict[str, Any] = {
        "name": "test",
        "seed": 3,
        "rounds": 30,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
        "topology": {"kind": "ring", "n": 8},
        "protocol": protocol,
        "network": {"step_time": 0.002},
        "sim": {"eval_every": 10, "threads": 1},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def run(raw: dict):
    simulation = build_simulation(scenario_from_dict(raw))
    rows = run_simulation(simulation, show_progress=False)
    return simulation, rows


def test_dpsgd_ring_converges_on_digits():
    simulation, rows = run(small({"name": "dpsgd", "local_steps": 5}))
    final = rows[-1]
    assert final["round"] == 30
    assert final["acc_mean"] >= 0.85, final
    assert final["acc_min"] >= 0.75, final
    assert rows[0]["acc_mean"] < 0.3  # it really learned
    # every peer sent one model to each of its 2 neighbours per round (plus the last round)
    assert final["messages_total"] >= 8 * 2 * 30
    assert final["consensus_distance"] < rows[1]["consensus_distance"] * 5


@pytest.mark.parametrize(
    "protocol, topology, network",
    [
        ({"name": "epidemic", "fanout": 2, "local_steps": 5, "round_timeout": 0.1}, {"kind": "complete"}, {"mode": "overlay"}),
        ({"name": "gossip", "period": 0.05, "local_steps": 5}, {"kind": "regular", "params": {"k": 3}}, {}),
    ],
)
def test_other_protocols_converge(protocol, topology, network):
    _, rows = run(small(protocol, topology=topology, network=network))
    assert rows[-1]["acc_mean"] >= 0.80, rows[-1]


def test_same_seed_same_metrics_bit_for_bit():
    raw = small({"name": "gossip", "period": 0.05, "local_steps": 2}, rounds=12, network={"speed_spread": 0.5, "latency_jitter": 0.5, "loss": 0.1})
    _, first = run(raw)
    _, second = run(raw)
    def deterministic(rows):  # everything but wall-clock measurements
        return [{k: v for k, v in r.items() if "wall" not in k and "seconds" not in k} for r in rows]

    strip, again = deterministic(first), deterministic(second)
    assert strip == again
    _, other_seed = run({**raw, "seed": 4})
    assert [r["acc_mean"] for r in other_seed] != [r["acc_mean"] for r in first]


def test_batched_equals_per_peer():
    raw = small({"name": "dpsgd", "local_steps": 3}, rounds=6, sim={"eval_every": 2})
    batched_sim, batched = run(raw)
    per_peer_sim, per_peer = run({**raw, "sim": {**raw["sim"], "backend": "per_peer"}})
    for a, b in zip(batched, per_peer, strict=True):
        assert a["round"] == b["round"]
        assert a["bytes_total"] == b["bytes_total"]
        assert math.isclose(a["acc_mean"], b["acc_mean"], abs_tol=1e-3)
        assert math.isclose(a["loss_mean"], b["loss_mean"], rel_tol=1e-3, abs_tol=1e-4)
    for p, q in zip(batched_sim.engine.protocols, per_peer_sim.engine.protocols, strict=True):
        assert torch.allclose(p.params, q.params, atol=1e-4)
    assert batched_sim.engine.executor.batches_run < per_peer_sim.engine.executor.jobs_run


def test_crashed_neighbour_does_not_block_dpsgd():
    raw = small({"name": "dpsgd", "local_steps": 3, "round_timeout": 0.5}, rounds=10)
    simulation = build_simulation(scenario_from_dict(raw))
    simulation.engine.schedule(0.05, lambda now: simulation.engine.crash(0))
    rows = run_simulation(simulation, show_progress=False)
    assert rows[-1]["round"] == 10
    assert rows[-1]["peers_alive"] == 7
    # the neighbours of the crashed peer learnt of it from failed sends and stopped waiting
    for neighbour in (1, 7):
        protocol = simulation.engine.protocols[neighbour]
        assert isinstance(protocol, DPSGD) and "p0" not in protocol.alive
    assert simulation.engine.now < 10 * 0.5


def test_relay_peers_hold_no_data():
    simulation, rows = run(small({"name": "dpsgd", "local_steps": 2}, rounds=4, data={"relay_fraction": 0.25}))
    assert len(simulation.relays) == 2
    assert all(simulation.data_sizes[r] == 0 for r in simulation.relays)
    assert simulation.data_sizes.sum() == len(simulation.dataset.y_train)


def test_run_folder(tmp_path):
    simulation, _ = run(small({"name": "dpsgd"}, rounds=4, sim={"eval_every": 2}))
    out = write_run(simulation, tmp_path / "run")
    for name in ("config.toml", "metrics.csv", "summary.json", "accuracy_vs_rounds.png", "accuracy_vs_bytes.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 4
    # the resolved config runs again as a scenario
    assert load_scenario(out / "config.toml").rounds == 4
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("round,virtual_time,wall_time,acc_mean")
    assert len(lines) == 1 + 3  # rounds 0, 2, 4


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"protocl": {}}, "protocl: Extra inputs are not permitted"),
        ({"protocol": {"name": "dpsgd", "fanout": 3}}, "protocol.fanout: Extra inputs are not permitted"),
        ({"data": {"batch_size": "big"}}, "data.batch_size: Input should be a valid integer"),
        ({"protocol": {"name": "teleport"}}, "protocol: Input tag 'teleport'"),
        ({"rounds": 0}, "rounds: Input should be greater than or equal to 1"),
    ],
)
def test_bad_scenarios_name_the_key(raw, message):
    with pytest.raises(ScenarioError) as error:
        scenario_from_dict(raw)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_disconnected_graph_rejected_for_dpsgd():
    raw = small({"name": "dpsgd"}, topology={"kind": "erdos_renyi", "n": 12, "params": {"p": 0.0}})
    with pytest.raises(ScenarioError, match="connected components"):
        build_simulation(scenario_from_dict(raw))


def test_cli_reports_bad_scenario_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('rounds = "many"\n')
    result = CliRunner().invoke(app, ["sim", str(bad)])
    assert result.exit_code == 2
    assert "rounds: Input should be a valid integer" in result.output
    assert "Traceback" not in result.output


def test_cli_runs_example_with_overrides(tmp_path):
    result = CliRunner().invoke(
        app,
        ["sim", str(EXAMPLES / "dpsgd_digits_ring.toml"), "--set", "rounds=2", "--set", "topology.n=4",
         "--set", "sim.eval_every=1", "--out", str(tmp_path / "run"), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert "final mean accuracy" in result.output
    assert (tmp_path / "run" / "metrics.csv").exists()


def _is_node_config(path: Path) -> bool:
    return path.name == "node.toml" or path.parent.name == "node"


def _is_sweep(path: Path) -> bool:
    return "defences" in tomllib.loads(path.read_text())  # sweeps: tests/test_sweep.py


SCENARIO_FILES = sorted(
    p for p in EXAMPLES.rglob("*.toml") if not _is_sweep(p) and not _is_node_config(p)
)
NODE_CONFIG_FILES = sorted(p for p in EXAMPLES.rglob("*.toml") if _is_node_config(p))


@pytest.mark.parametrize("path", NODE_CONFIG_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_node_configs_are_valid(path):
    from p2pfl.nodecli import load_node_config

    config = load_node_config(path, [])
    assert config.rounds > 0


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_examples_are_valid(path):
    load_scenario(path)


def test_a_run_whose_rounds_close_on_their_timer_says_so(caplog):
    """A round timeout shorter than a round takes: every round ends on the timer with
    only the models that arrived. The run says so in the log and in the summary."""
    import logging

    from sim.runner import build_simulation, run_simulation, summarize
    from sim.scenario import scenario_from_dict

    def run(timeout: float) -> dict:
        raw = {
            "name": "timer",
            "seed": 1,
            "rounds": 4,
            "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
            "model": {"name": "mlp", "hidden": [16], "lr": 0.1},
            "topology": {"kind": "ring", "n": 6},
            "protocol": {"name": "dpsgd", "local_steps": 1, "round_timeout": timeout},
            # a message takes 1 s to arrive: a 0.1 s timer always fires first
            "network": {"latency": 1.0, "step_time": 0.001},
            "sim": {"eval_every": 4, "threads": 1},
        }
        simulation = build_simulation(scenario_from_dict(raw))
        run_simulation(simulation, show_progress=False)
        return summarize(simulation)

    with caplog.at_level(logging.WARNING, logger="p2pfl.sim"):
        late = run(0.1)
    assert late["rounds_closed_by_timer"] == 1.0
    assert len(late["warnings"]) == 1 and "round timer" in late["warnings"][0]
    assert "protocol.round_timeout = 0.1 s" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p2pfl.sim"):
        fine = run(10.0)
    assert fine["rounds_closed_by_timer"] == 0.0 and fine["warnings"] == []
    assert "round timer" not in caplog.text
