"""Federated baselines under Sybils: FedAvg against FoolsGold, per number of identities.

    python benchmarks/fl_baselines.py                 # identities 0, 1, 5, 10; seeds 1-3
    python benchmarks/fl_baselines.py --quick         # identities 0, 5; one seed

The scenario is ``examples/baselines/foolsgold_sybils.toml`` (digits, a server and 10
honest clients, 10 clients sampled a round, 20 rounds, uniform weighting) with
``identities`` Sybil clients that train on 1s labelled 7 and send one shared update a
round. Printed per protocol and identity count: the honest peers' final accuracy and the
attack success rate (share of the test set's 1s read as 7), mean and spread (min-max)
over the seeds, and the CPU seconds of the whole cell. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sim.attack_config import AttackConfig
from sim.runner import build_simulation, run_simulation
from sim.scenario import load_scenario

EXAMPLE = (
    Path(__file__).resolve().parent.parent / "examples" / "baselines" / "foolsgold_sybils.toml"
)


def cell(protocol: str, identities: int, seed: int, partition: str) -> tuple[float, float]:
    overrides = [f"protocol.name={protocol!r}", f"seed={seed}", f"data.partition={partition!r}"]
    overrides.append(f"attack.identities={max(identities, 1)}")
    scenario = load_scenario(EXAMPLE, overrides)
    if identities == 0:  # no attack at all
        scenario = scenario.model_copy(update={"attack": AttackConfig()})
    simulation = build_simulation(scenario)
    last = run_simulation(simulation, show_progress=False)[-1]
    return float(last["acc_mean"]), float(last.get("attack_success_rate", float("nan")))


def summary(values: list[float]) -> str:
    if any(v != v for v in values):
        return "-"
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--partition",
        default="iid",
        choices=["iid", "shards", "dirichlet"],
        help="the clients' data (shards: 2 label shards each; dirichlet: alpha 0.5)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    identities = [0, 5] if args.quick else [0, 1, 5, 10]
    seeds = [1] if args.quick else [1, 2, 3]
    print(
        f"partition {args.partition}; seeds {seeds}; accuracy of honest peers, attack success (1 -> 7): mean (min-max)"
    )
    print(f"{'protocol':<10} {'sybils':>6}  {'accuracy':<22} {'attack success':<22} cpu s")
    for protocol in ("fedavg", "foolsgold"):
        for k in identities:
            started = time.process_time()
            results = [cell(protocol, k, seed, args.partition) for seed in seeds]
            cpu = time.process_time() - started
            accuracy = summary([a for a, _ in results])
            success = summary([s for _, s in results])
            print(f"{protocol:<10} {k:>6}  {accuracy:<22} {success:<22} {cpu:.1f}")


if __name__ == "__main__":
    main()
