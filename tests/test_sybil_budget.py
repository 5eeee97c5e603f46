"""A Sybil adversary's one data set and one training, spread over its identities (issue 16),
and sweeps that show a Sybil cell's real share of identities beside the configured fraction.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl.attacks import ByzantineProtocol
from p2pfl.learning import BatchSampler
from p2pfl.protocols.base import Send, Train
from p2pfl.protocols.fedavg import SAMPLES, FedAvg
from sim.adversary import innermost, sybil_budget
from sim.engine import Engine
from sim.runner import build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict
from sim.sweep import load_sweep, run_sweep
from sim.sweep_results import results_table, seed_stats, share_label
from tests.sweep_kit import tiny_base

# ---------------------------------------------------------------------------- the split itself


@pytest.mark.parametrize("k", [1, 3, 7])
def test_shared_budget_trains_every_identity_on_all_and_declares_a_part_each(k: int) -> None:
    indices = np.arange(100, 150)
    parts, declared = sybil_budget(indices, k, "shared", np.random.default_rng(0))
    assert all(np.array_equal(part, indices) for part in parts) and len(parts) == k
    assert sum(declared) == 50 and max(declared) - min(declared) <= 1


@pytest.mark.parametrize("k", [1, 3, 7])
def test_split_budget_cuts_the_data_into_disjoint_parts_each_declared(k: int) -> None:
    indices = np.arange(100, 150)
    parts, declared = sybil_budget(indices, k, "split", np.random.default_rng(0))
    assert declared == [len(part) for part in parts] and sum(declared) == 50
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == 50 and set(joined.tolist()) == set(indices.tolist())
    assert max(declared) - min(declared) <= 1


def test_split_budget_with_fewer_samples_than_identities_is_refused() -> None:
    with pytest.raises(ValueError, match="5 identities cannot split 3 samples"):
        sybil_budget(np.arange(3), 5, "split", np.random.default_rng(0))


# ---------------------------------------------------------------------------- in the simulator


def _scenario(budget: str | None, identities: int = 3, **extra) -> dict:
    attack = {
        "name": "sybil_label_flip",
        "identities": identities,
        "attach": 2,
        "params": {"source": 1, "target": 7},
    }
    if budget is not None:
        attack["budget"] = budget
    raw = {
        "name": "budget",
        "seed": 2,
        "rounds": 2,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "logreg", "lr": 0.2},
        "topology": {"kind": "ring", "n": 8},
        "protocol": {"name": "dpsgd", "local_steps": 6},
        "network": {"step_time": 0.002},
        "sim": {"eval_every": 2, "threads": 1},
        "attack": attack,
    }
    raw.update(extra)
    return raw


def _adversary_data(simulation, n: int = 8) -> int:
    """What the adversary holds: an average honest share of 1s (all of them, when fewer)."""
    sizes = simulation.data_sizes[:n]
    ones = int((simulation.dataset.y_train == 1).sum())
    return min(int(sizes[sizes > 0].mean()), ones)


def _sybil_sends(simulation, first: int = 8) -> tuple[dict[int, dict[int, torch.Tensor]], list]:
    """Run; the model each identity (peers ``first``...) sent per round, and every
    ``(peer, effect)`` of the run."""
    log: list = []
    simulation.engine.on_handled(
        lambda peer, event, effects: log.extend((peer, e) for e in effects)
    )
    run_simulation(simulation, show_progress=False)
    sent: dict[int, dict[int, torch.Tensor]] = {}
    for peer, effect in log:
        if peer >= first and isinstance(effect, Send) and effect.message.params is not None:
            sent.setdefault(effect.message.round, {})[peer] = effect.message.params
    return sent, log


def _sampler(engine: Engine, peer: int) -> BatchSampler:
    sampler = engine.executor.samplers[peer]
    assert sampler is not None, f"peer {peer} trains nothing"
    return sampler


def test_shared_budget_one_data_set_one_training_declared_once_in_all() -> None:
    simulation = build_simulation(scenario_from_dict(_scenario(None)))  # "shared" by default
    engine = simulation.engine
    samplers = [_sampler(engine, s) for s in (8, 9, 10)]
    assert all(np.array_equal(s.indices, samplers[0].indices) for s in samplers)
    assert len({s.seed for s in samplers}) == 1  # K copies of one training
    assert len(samplers[0]) == _adversary_data(simulation)
    declared = [int(simulation.data_sizes[s]) for s in (8, 9, 10)]
    assert sum(declared) == _adversary_data(simulation) and max(declared) - min(declared) <= 1
    assert all(innermost(engine.protocols[s]).local_steps == 6 for s in (8, 9, 10))
    sent, _ = _sybil_sends(simulation)
    assert len(sent) >= 2
    for models in sent.values():
        assert len(models) == 3 and all(torch.equal(m, models[8]) for m in models.values())


def test_split_budget_disjoint_data_a_share_of_the_steps_and_own_models() -> None:
    simulation = build_simulation(scenario_from_dict(_scenario("split")))
    engine = simulation.engine
    parts = [_sampler(engine, s).indices for s in (8, 9, 10)]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == _adversary_data(simulation)
    assert (simulation.dataset.y_train[torch.from_numpy(joined)] == 1).all()
    assert [int(simulation.data_sizes[s]) for s in (8, 9, 10)] == [len(p) for p in parts]
    # one device's 6 steps a round, split over 3 identities
    assert all(innermost(engine.protocols[s]).local_steps == 2 for s in (8, 9, 10))
    assert all(innermost(engine.protocols[i]).local_steps == 6 for i in range(8))
    assert all(isinstance(engine.protocols[s], ByzantineProtocol) for s in (8, 9, 10))  # isolated
    assert all(
        isinstance(p := engine.protocols[s], ByzantineProtocol) and p.collusion is None
        for s in (8, 9, 10)
    )
    sent, log = _sybil_sends(simulation)
    for models in sent.values():  # each identity sends what it trained on its own part
        assert len(models) == 3 and not torch.equal(models[8], models[9])
    steps = {(p >= 8, e.steps) for p, e in log if isinstance(e, Train)}
    assert steps == {(True, 2), (False, 6)}  # the training the engine ran for each


def test_sybil_identities_declare_their_samples_to_fedavg_not_one() -> None:
    raw = _scenario(
        None,
        identities=4,
        topology={"kind": "star", "n": 6},
        rounds=4,
        protocol={"name": "fedavg", "local_steps": 2, "clients_per_round": 5},
    )
    raw["attack"]["attach"] = 6  # every identity a client of the server (peer 0)
    simulation = build_simulation(scenario_from_dict(raw))
    engine = simulation.engine
    # a peer that is not FedAvg inside would be missing here, and the next line fail
    inner = [innermost(engine.protocols[s]) for s in range(6, 10)]
    declared = [p.samples for p in inner if isinstance(p, FedAvg)]
    assert declared == [int(simulation.data_sizes[s]) for s in range(6, 10)]
    assert sum(declared) == _adversary_data(simulation, 6) and min(declared) > 1
    _, log = _sybil_sends(simulation, first=6)
    updates = [(p, e.message) for p, e in log if isinstance(e, Send) and e.message.kind == "update"]
    assert {p for p, _ in updates} & set(range(6, 10))  # sampled identities sent updates
    for p, message in updates:  # each with the count its identity holds
        assert message.meta[SAMPLES] == int(simulation.data_sizes[p]) > 1


def test_budget_is_for_sybil_attacks_and_checked() -> None:
    raw = _scenario("split")
    raw["attack"] = {"name": "label_flip", "count": 1, "budget": "split"}
    with pytest.raises(ScenarioError, match=r"^attack: .*budget is for Sybil attacks"):
        scenario_from_dict(raw)
    with pytest.raises(ScenarioError, match=r"^attack\.budget: "):
        scenario_from_dict(_scenario("halves"))


def test_split_budget_too_small_for_its_identities_is_one_line() -> None:
    raw = _scenario("split", identities=200)
    raw["attack"]["attach"] = 1
    with pytest.raises(ScenarioError, match=r"200 identities cannot split \d+ samples"):
        build_simulation(scenario_from_dict(raw))


def test_metrics_rows_carry_the_real_share_of_malicious_peers() -> None:
    simulation = build_simulation(scenario_from_dict(_scenario(None)))
    rows = run_simulation(simulation, show_progress=False)
    assert rows[-1]["malicious_peers"] == 3 and rows[-1]["malicious_share"] == 3 / 11


# ---------------------------------------------------------------------------- sweep labels

BASE = tiny_base(rounds=1, local_steps=1, eval_every=1)

SWEEP = """
name = "sybil-share"
base = "base.toml"
fractions = [0.2]
cell_plots = false

[[attacks]]
label = "none"
name = "none"

[[attacks]]
label = "sybil 3 ids"
name = "sybil_label_flip"
identities = 3
attach = 2

[[attacks]]
label = "sybil by fraction"
name = "sybil_label_flip"
attach = 2

[[defences]]
label = "mean"
"""


def test_a_sybil_sweep_cell_shows_its_real_share_beside_the_configured_fraction(
    tmp_path: Path,
) -> None:
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "sweep.toml").write_text(SWEEP)
    sweep, base = load_sweep(tmp_path / "sweep.toml")
    out, results = run_sweep(sweep, base, out_dir=tmp_path / "out", show_progress=False)
    with (out / "results.csv").open() as handle:
        rows = {r["attack"]: r for r in csv.DictReader(handle)}
    assert list(rows["none"])[:5] == ["attack", "defence", "fraction", "malicious_share", "seed"]
    assert rows["none"]["malicious_share"] == "0"
    # 3 identities among 6 + 3 peers: a third, not the 0.2 the sweep's fractions say
    assert rows["sybil 3 ids"]["fraction"] == "0.2"
    assert rows["sybil 3 ids"]["malicious_share"] == "0.3333"
    # by fraction: round(0.2 * 6 / 0.8) = 2 identities of 8 peers
    assert rows["sybil by fraction"]["malicious_share"] == "0.25"
    stats = {e["attack"]: e for e in seed_stats(results)}
    assert share_label([stats["sybil 3 ids"]], 0.2) == " (real share 0.333)"
    assert share_label([stats["none"]], 0.2) == ""  # no fraction: nothing to compare
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    console = Console(file=buffer, width=200)
    console.print(results_table(results, "t"))
    text = buffer.getvalue()
    assert "0.2 (real share 0.333)" in text and "0.2 (real share 0.25)" in text


def test_share_label_is_empty_when_the_share_is_the_fraction() -> None:
    entry = {"fraction": 0.25, "malicious_share": 0.25}
    assert share_label([entry], 0.25) == ""
    assert share_label([{"fraction": 0.25, "malicious_share": float("nan")}], 0.25) == ""
    two = [entry, {"fraction": 0.25, "malicious_share": 1 / 3}]
    assert share_label(two, 0.25) == " (real share 0.25/0.333)"
