"""Bytes to a target accuracy, per codec and protocol: what compression buys on MNIST.

    OMP_NUM_THREADS=1 python benchmarks/compression.py \\
        [--peers 8] [--rounds 60] [--seeds 1,2,3] [--target 0.8] [--out DIR]

Runs the simulator (the same peers a node runs: ``protocol.codec`` is applied by the
assembly of a peer, so the counts are those of the encoded messages) for every protocol
(D-PSGD on a 4-regular graph, Epidemic Learning with fanout 3 and MoDeST with samples of
half the peers, both over an overlay) and every codec (fp32, fp16, int8, top-k keeping
5% of the values without and with error feedback), each with every seed, on MNIST (IID
shares, an MLP with 32 hidden units, 5 local steps a round, accuracy on 1,000 test
samples every 2 rounds). For each run it finds the first measurement at which the peers'
mean accuracy reaches ``--target`` and the bytes all peers had sent by then.

Writes ``runs.csv`` (one line per run), ``curves.csv`` (every measurement of every run),
``compression.csv`` (per protocol and codec: mean and population standard deviation over
the seeds that reached the target, how many did, the ratio to fp32, the final accuracy)
and ``compression.png`` (mean accuracy against bytes sent, one panel per
protocol), and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from p2pfl.learning import load_dataset
from sim.runner import build_simulation, run_simulation
from sim.scenario import scenario_from_dict

CODECS: dict[str, Any] = {
    "fp32": "fp32",
    "fp16": "fp16",
    "int8": "int8",
    "topk5%": {"name": "topk", "fraction": 0.05},
    "topk5%+ef": {"name": "topk", "fraction": 0.05, "error_feedback": True},
}


def protocols(peers: int) -> dict[str, tuple[dict[str, Any], dict[str, Any], str]]:
    """name -> (protocol table, topology table, network mode)."""
    return {
        "dpsgd": ({"name": "dpsgd"}, {"kind": "regular", "n": peers, "params": {"k": 4}}, "graph"),
        "epidemic": (
            {"name": "epidemic", "fanout": 3},
            {"kind": "complete", "n": peers},
            "overlay",
        ),
        "modest": (
            {"name": "modest", "sample_size": max(2, peers // 2)},
            {"kind": "complete", "n": peers},
            "overlay",
        ),
    }


def run_one(
    protocol: str, codec: str, seed: int, args: argparse.Namespace, dataset: Any
) -> dict[str, Any]:
    table, topology, mode = protocols(args.peers)[protocol]
    scenario = scenario_from_dict(
        {
            "name": f"compression-{protocol}-{codec}",
            "seed": seed,
            "rounds": args.rounds,
            "data": {"dataset": "mnist", "partition": "iid", "batch_size": 32},
            "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
            "topology": topology,
            "protocol": {**table, "local_steps": 5, "codec": CODECS[codec]},
            "network": {"mode": mode},
            "sim": {"eval_every": 2, "eval_test_samples": 1000, "threads": 1},
        }
    )
    started = time.process_time()
    simulation = build_simulation(scenario, dataset=dataset)
    rows = run_simulation(simulation, show_progress=False)
    reached = next((row for row in rows if row["acc_mean"] >= args.target), None)
    return {
        "protocol": protocol,
        "codec": codec,
        "seed": seed,
        "bytes_to_target": reached["bytes_total"] if reached else "",
        "round_to_target": reached["round"] if reached else "",
        "final_acc": rows[-1]["acc_mean"],
        "final_bytes": rows[-1]["bytes_total"],
        "cpu_s": round(time.process_time() - started, 2),
        "curve": [(row["bytes_total"], row["acc_mean"], row["round"]) for row in rows],
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for protocol in dict.fromkeys(r["protocol"] for r in runs):
        base = None
        for codec in CODECS:
            cell = [r for r in runs if r["protocol"] == protocol and r["codec"] == codec]
            hit = [float(r["bytes_to_target"]) for r in cell if r["bytes_to_target"] != ""]
            mean = statistics.mean(hit) if hit else float("nan")
            if codec == "fp32":
                base = mean
            table.append(
                {
                    "protocol": protocol,
                    "codec": codec,
                    "reached": f"{len(hit)}/{len(cell)}",
                    "mb_to_target_mean": round(mean / 1e6, 3) if hit else "",
                    "mb_to_target_std": round(statistics.pstdev(hit) / 1e6, 3) if hit else "",
                    "vs_fp32": round(mean / base, 3) if hit and base == base and base else "",
                    "final_acc_mean": round(statistics.mean(r["final_acc"] for r in cell), 4),
                }
            )
    return table


def plot(runs: list[dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["protocol"] for r in runs))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, protocol in zip(axes[0], names, strict=True):
        for codec in CODECS:
            cell = [r["curve"] for r in runs if r["protocol"] == protocol and r["codec"] == codec]
            if not cell:
                continue
            points = min(len(c) for c in cell)
            xs = [statistics.mean(c[i][0] for c in cell) / 1e6 for i in range(points)]
            ys = [statistics.mean(c[i][1] for c in cell) for i in range(points)]
            shown = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0]  # log axis
            ax.plot(*zip(*shown, strict=True), marker=".", label=codec)
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(protocol)
        ax.set_xlabel("MB sent by all peers (mean over seeds)")
        ax.set_ylabel("mean test accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--protocols", default="dpsgd,epidemic,modest")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compression"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for protocol in args.protocols.split(","):
        for seed in seeds:
            dataset = load_dataset("mnist", seed=seed)
            for codec in CODECS:
                run = run_one(protocol, codec, seed, args, dataset)
                runs.append(run)
                print(
                    f"{protocol:9s} {codec:10s} seed {seed}  to target {run['bytes_to_target']!s:>10} B"
                    f"  final acc {run['final_acc']:.3f}  cpu {run['cpu_s']} s",
                    flush=True,
                )
    fields = [k for k in runs[0] if k != "curve"]
    with (args.out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    with (args.out / "curves.csv").open("w", newline="") as handle:
        curve_writer = csv.writer(handle)
        curve_writer.writerow(["protocol", "codec", "seed", "round", "bytes_total", "acc_mean"])
        for run in runs:
            for nbytes, acc, round_ in run["curve"]:
                curve_writer.writerow(
                    [run["protocol"], run["codec"], run["seed"], round_, nbytes, acc]
                )
    table = summarise(runs)
    with (args.out / "compression.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot(runs, args.target, args.out / "compression.png")
    print(f"\nMB sent by all {args.peers} peers until mean accuracy >= {args.target}")
    print("| protocol | codec | reached | MB to target (mean +- std) | vs fp32 | final acc |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in table:
        mb = (
            f"{row['mb_to_target_mean']} +- {row['mb_to_target_std']}"
            if row["reached"][0] != "0"
            else "-"
        )
        print(
            f"| {row['protocol']} | {row['codec']} | {row['reached']} | {mb} | {row['vs_fp32'] or '-'}"
            f" | {row['final_acc_mean']} |"
        )
    print(f"\nwritten: {args.out}/runs.csv, curves.csv, compression.csv, compression.png")


if __name__ == "__main__":
    from bench_cli import run

    run(main)
