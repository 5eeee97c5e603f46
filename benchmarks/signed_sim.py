"""What signing relayed data costs the simulator: MoDeST at 1,000 peers, signed vs not.

    python benchmarks/signed_sim.py [--peers 1000] [--rounds 10] [--repeats 3]

Nodes always sign relayed data (MoDeST's view entries, SybilWall's histories, each by
the peer it is about); the simulator does too by default (``sim.sign_relayed = true``),
so that both drivers take the same code paths. This measures the price: one MoDeST
scenario (digits, logistic regression, sample 10, one aggregator, overlay network), run
signed and unsigned alternately, ``--repeats`` times each, torch on one thread. Reports
the wall time of each run (set-up excluded), medians and their ratio, the events, bytes
and final accuracy of each (signed and unsigned views merge by different rules -- the
newest record about a peer wins whole, against a max-merge of the numbers -- so the two
runs may take slightly different decisions). Writes ``<out>.csv`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from sim.runner import build_simulation, run_simulation  # noqa: E402
from sim.scenario import scenario_from_dict  # noqa: E402


def scenario(peers: int, rounds: int, signed: bool) -> dict[str, Any]:
    return {
        "name": f"modest-{peers}-{'signed' if signed else 'unsigned'}",
        "seed": 1,
        "rounds": rounds,
        "data": {"dataset": "digits", "batch_size": 16},
        "model": {"name": "logreg", "lr": 0.5},
        "topology": {"kind": "complete", "n": peers},
        "network": {"mode": "overlay"},
        "protocol": {"name": "modest", "sample_size": 10, "num_aggregators": 1,
                     "local_steps": 5, "success_fraction": 0.6},  # fmt: skip
        "sim": {"eval_every": rounds, "eval_peers": 50, "threads": 1, "sign_relayed": signed},
    }


def one_run(peers: int, rounds: int, signed: bool) -> dict[str, Any]:
    simulation = build_simulation(scenario_from_dict(scenario(peers, rounds, signed)))
    began = time.perf_counter()
    rows = run_simulation(simulation, show_progress=False)
    wall = time.perf_counter() - began
    records = simulation.engine.records
    return {
        "signed": signed,
        "wall_s": round(wall, 3),
        "events": simulation.engine.events_processed,
        "acc_mean": rows[-1]["acc_mean"],
        "bytes_total": rows[-1]["bytes_total"],
        "bad_entries": records.get("modest.bad_entry", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/signed_sim")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for repeat in range(args.repeats):
        for signed in (False, True):  # alternated: drifts of the machine hit both alike
            row = one_run(args.peers, args.rounds, signed)
            row["repeat"] = repeat
            runs.append(row)
            print(row, flush=True)
    plain = statistics.median(r["wall_s"] for r in runs if not r["signed"])
    signed = statistics.median(r["wall_s"] for r in runs if r["signed"])
    accuracies = {r["acc_mean"] for r in runs}
    print(
        f"{args.peers} peers x {args.rounds} rounds: unsigned {plain:.2f} s, signed {signed:.2f} s "
        f"(median of {args.repeats}), ratio {signed / plain:.2f}; "
        f"final accuracy {'equal' if len(accuracies) == 1 else 'differs'}: {sorted(accuracies)}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    _plot(runs, out.with_suffix(".png"), args.peers, args.rounds)


def _plot(runs: list[dict[str, Any]], path: Path, peers: int, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for signed, colour in ((False, "#4878d0"), (True, "#ee854a")):
        walls = [r["wall_s"] for r in runs if r["signed"] == signed]
        ax.scatter([int(signed)] * len(walls), walls, color=colour, zorder=2)
        ax.hlines(statistics.median(walls), int(signed) - 0.2, int(signed) + 0.2, color=colour)
    ax.set_xticks([0, 1], ["unsigned", "signed"])
    ax.set_ylabel("wall time (s)")
    ax.set_title(f"MoDeST, {peers} peers x {rounds} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
