"""Zeroth-order fine-tuning (one byte per step) against D-PSGD: bytes, rounds, accuracy.

Runs examples/zo_digits.toml and the same network under D-PSGD (one SGD step per round,
whole models exchanged) for each seed, both from the *same* start model: the briefly
SGD-trained one zeroth-order fine-tunes (D-PSGD's peers are handed it before the run, as
its configuration has no pre-training). Reports, per protocol, the mean and spread over
the seeds of: bytes sent per round (all peers), bytes per message, final accuracy, and
the rounds and bytes until the mean accuracy first reaches ``--target``.

    OMP_NUM_THREADS=1 python benchmarks/zo_vs_dpsgd.py --seeds 1,2,3 --rounds 300

The accuracy is measured every ``--every`` rounds, so rounds-to-target is a multiple of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tomllib
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.runner import build_simulation, run_simulation  # noqa: E402
from sim.scenario import scenario_from_dict  # noqa: E402

EXAMPLE = ROOT / "examples" / "zo_digits.toml"


def scenarios(seed: int, rounds: int, every: int) -> dict[str, dict[str, Any]]:
    zo = tomllib.loads(EXAMPLE.read_text())
    zo.update(seed=seed, rounds=rounds, sim={"eval_every": every, "threads": 1})
    dpsgd = {**zo, "name": "zo-dpsgd-baseline"}
    dpsgd["protocol"] = {"name": "dpsgd", "local_steps": 1, "round_timeout": 1.0}
    return {"zeroth_order": zo, "dpsgd": dpsgd}


def run(raw: dict[str, Any], start: torch.Tensor | None, target: float) -> dict[str, Any]:
    simulation = build_simulation(scenario_from_dict(raw))
    if start is not None:  # D-PSGD from the zeroth-order run's pre-trained start
        for protocol in simulation.engine.protocols:
            protocol.params = start.clone()
    first = simulation.engine.protocols[0].params.detach().clone()
    rows = run_simulation(simulation, show_progress=False)
    last = rows[-1]
    reached = next((r for r in rows if r["acc_mean"] >= target), None)
    messages = max(int(last["messages_total"]), 1)
    return {
        "start": first,
        "acc_start": rows[0]["acc_mean"],
        "acc_final": last["acc_mean"],
        "bytes_per_round": last["bytes_total"] / last["round"],
        "bytes_per_message": last["bytes_total"] / messages,
        "rounds_to_target": reached["round"] if reached else None,
        "bytes_to_target": reached["bytes_total"] if reached else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, Any]]] = {"zeroth_order": [], "dpsgd": []}
    for seed in seeds:
        raws = scenarios(seed, args.rounds, args.every)
        zo = run(raws["zeroth_order"], None, args.target)
        dp = run(raws["dpsgd"], zo["start"].detach().clone(), args.target)
        for name, result in (("zeroth_order", zo), ("dpsgd", dp)):
            result.pop("start")
            results[name].append({"seed": seed, **result})
    print(f"{len(seeds)} seeds, {args.rounds} rounds, target accuracy {args.target}")
    print("protocol      | bytes/round | bytes/msg | acc start | acc final      | rounds to target | MB to target")
    for name, runs in results.items():
        print(f"{name:13} | {_stat(runs, 'bytes_per_round', '.0f')} | {_stat(runs, 'bytes_per_message', '.0f')} "
              f"| {_stat(runs, 'acc_start', '.3f')} | {_stat(runs, 'acc_final', '.3f')} "
              f"| {_stat(runs, 'rounds_to_target', '.0f')} | {_stat(runs, 'bytes_to_target', '.3g', 1e-6)}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


def _stat(runs: list[dict[str, Any]], key: str, fmt: str, scale: float = 1.0) -> str:
    values = [r[key] * scale for r in runs if r[key] is not None]
    missed = len(runs) - len(values)
    if not values:
        return "not reached"
    text = format(statistics.mean(values), fmt)
    if len(values) > 1:
        text += " +- " + format(statistics.stdev(values), fmt)
    return text + (f" ({missed} not reached)" if missed else "")


if __name__ == "__main__":
    main()
