"""MoDeST in the simulator: batched training, the example scenarios' disruptions, joiners."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pfl.config import apply_overrides
from p2pfl.learning import load_dataset
from p2pfl.protocols.modest import ModestProtocol
from sim.runner import build_simulation, run_simulation, summarize, write_run
from sim.scenario import Scenario, scenario_from_dict

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "modest"

# The example scenarios shrunk to the embedded digits data and 20 peers.
SMALL = [
    'data.dataset="digits"',
    "model.hidden=[16]",
    "topology.n=20",
    "protocol.sample_size=5",
    "protocol.local_steps=3",
    "sim.eval_test_samples=0",
    "sim.eval_every=5",
]


def example(
    name: str, *overrides: str, disruptions: list[dict[str, Any]] | None = None
) -> Scenario:
    """An example scenario of ``examples/modest``, shrunk, with its disruptions replaced."""
    raw = tomllib.loads((EXAMPLES / f"{name}.toml").read_text())
    raw = apply_overrides(raw, [*SMALL, *overrides])
    if disruptions is not None:
        raw["disruptions"] = disruptions
    return scenario_from_dict(raw)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=1)


def test_batched_and_per_peer_backends_agree(digits) -> None:
    """The batched backend defers plain means; MoDeST's weighted means must survive that."""
    finals = []
    for backend in ("batched", "per_peer"):
        scenario = example("late_join", "rounds=8", f'sim.backend="{backend}"', disruptions=[])
        simulation = build_simulation(scenario, dataset=digits)
        run_simulation(simulation, show_progress=False)
        finals.append(torch.stack([torch.as_tensor(p.params) for p in simulation.engine.protocols]))
    assert torch.allclose(finals[0], finals[1], atol=2e-3)  # float rounding only
    assert finals[0].norm(dim=1).max() < 100  # no runaway (unnormalised) means


def test_rounds_go_on_after_eighty_percent_crash(digits, tmp_path: Path) -> None:
    crash = {"kind": "crash", "fraction": 0.8, "at_round": 10}
    scenario = example("crash80", "rounds=25", disruptions=[crash])
    simulation = build_simulation(scenario, dataset=digits)
    rows = run_simulation(simulation, show_progress=False)
    assert simulation.engine.alive.sum() == 4
    assert rows[-1]["round"] == 25  # the survivors finished every round
    after = [r["acc_mean"] for r in rows if r["round"] >= 10]
    assert after[-1] > after[0]  # and kept learning
    out = write_run(simulation, tmp_path / "run")
    assert (out / "disruption.png").exists() and (out / "accuracy_vs_rounds.png").exists()


def test_late_joiners_are_sampled(digits) -> None:
    joins = [
        {"kind": "join", "peers": [15, 16, 17], "at_round": 5},
        {"kind": "join", "peers": [18, 19], "at_round": 10},
    ]
    scenario = example("late_join", "rounds=30", disruptions=joins)
    simulation = build_simulation(scenario, dataset=digits)
    engine = simulation.engine
    joiners = range(15, 20)
    modest = [p for p in engine.protocols if isinstance(p, ModestProtocol)]
    assert len(modest) == len(engine.protocols)
    founders = [p for p in modest if p.peer_id not in {f"p{i}" for i in joiners}]
    # nobody knows the joiners before they announce themselves
    assert all("p15" not in p.view for p in founders)
    run_simulation(simulation, show_progress=False)
    assert all(engine.started[i] for i in joiners)
    took_part = [i for i in joiners if engine.stats.rounds_done[i] > 0]
    assert len(took_part) >= 4, took_part
    assert summarize(simulation)["counters"]["modest.joiners_took_part"] == len(took_part)
    assert sum("p19" in p.view for p in founders) >= len(founders) // 2
