"""MoDeST's claims against its baselines: rounds and bytes to a target, FL vs MoDeST vs D-PSGD.

    python benchmarks/papers/modest_fl.py                      # digits, 40 peers, IID and non-IID, seeds 1-3
    python benchmarks/papers/modest_fl.py --dataset mnist      # MNIST, 100 peers (slow: about an hour a seed)
    python benchmarks/papers/modest_fl.py --seeds 1 --partitions iid --protocols fedavg modest-a1

The MoDeST paper (de Vos et al., "Epidemic Learning"'s line of work: "MoDeST: bridging the gap
between federated and decentralized learning with decentralized sampling") claims that
decentralized sampling (a) converges as fast as federated learning with a server, and (b)
needs 3-14x less communication than D-PSGD to reach the same accuracy. Each run here is the
simulator with one protocol, one partition and one seed, stopped when its accuracy first
reaches the target (or at ``--max-rounds``):

``dpsgd``      D-PSGD on a random 4-regular graph, Metropolis-Hastings weights;
``fedavg``     federated averaging: a server (peer 0, the centre of a star) samples
               ``s`` of the other peers a round, they train and send back;
``modest-a1``  MoDeST, sample ``s``, one aggregator;
``modest-a3``  MoDeST, sample ``s``, three aggregators.

Two readings of accuracy, both from the same runs. *All peers*: the mean test accuracy of
every peer's current model (``acc_mean``), the strict reading, the one D-PSGD is judged by.
*Freshest model*: the model the next round starts from -- the server's for FedAvg, the
aggregate of the peer that aggregated last for MoDeST (D-PSGD has no such model: its
rows repeat the all-peers reading). FL's claim is about the second.

Output (``--out``, default ``benchmarks/results/papers``): ``modest_fl_runs.csv`` (one row
per run and reading: round, virtual time, bytes to the target), ``modest_fl.csv`` (the
table: mean and sample std over seeds, bytes ratio to D-PSGD per seed then averaged),
``modest_fl.png`` (accuracy vs bytes of seed 1), ``modest_fl_runs.png`` (rounds and bytes to
the target per protocol, mean and std over seeds: the table's figures) and the table in
Markdown on stdout. ``--plot RUNS_CSV`` re-draws ``modest_fl_runs.png`` beside an existing
``modest_fl_runs.csv`` and runs nothing:

    python benchmarks/papers/modest_fl.py --plot benchmarks/results/papers/mnist/modest_fl_runs.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/modest.py: the shared MoDeST set-up

# torch, the simulator and benchmarks/modest.py load where a run needs them, so that
# ``--plot`` (a CSV in, a PNG out) starts fast and needs none of them.
if TYPE_CHECKING:
    import modest

PROTOCOLS = ("dpsgd", "fedavg", "modest-a1", "modest-a3")
PARTITIONS = {
    "iid": {"partition": "iid"},
    "non-iid": {"partition": "dirichlet", "alpha": 0.3},
}
READINGS = {"acc_mean": "all peers", "acc_fresh": "freshest model"}


@dataclass(frozen=True)
class Case:
    setting: modest.Setting
    partition: str
    protocol: str


def scenario(case: Case) -> tuple[str, dict[str, Any]]:
    """The benchmark's scenario for ``case`` (benchmarks/modest.py's, plus FedAvg)."""
    import modest

    setting = case.setting
    if case.protocol == "fedavg":
        label, raw = modest.scenario("dpsgd", setting)  # the same data, model, network
        label = f"FedAvg (server, s={setting.sample_size})"
        raw["topology"] = {"kind": "star", "n": setting.peers}
        raw["protocol"] = {
            "name": "fedavg",
            "server": 0,
            "clients_per_round": setting.sample_size,
            "local_steps": setting.local_steps,
        }
    else:
        label, raw = modest.scenario(case.protocol, setting)
    raw["name"] = f"papers-modest-{case.protocol}-{case.partition}-s{setting.seed}"
    raw["data"].update(PARTITIONS[case.partition])
    return label, raw


def fresh_accuracy(simulation: Any, protocol: str) -> float:
    """Accuracy of the model the next round starts from (see the module docstring)."""
    import modest
    import torch

    from p2pfl.learning import evaluate

    if protocol.startswith("modest"):
        return modest.latest_aggregate_accuracy(simulation)
    if protocol == "fedavg":
        server = simulation.engine.protocols[0]
        evaluator = simulation.evaluator
        result = evaluate(
            simulation.trainer, torch.as_tensor(server.params), evaluator.x_test, evaluator.y_test
        )
        return float(result.accuracy[0])
    return float("nan")


def run_case(case: Case, dataset: Any) -> tuple[str, list[dict[str, Any]], float]:
    """One run until both readings reach the target (or the round limit): its rows."""
    from sim.runner import build_simulation, run_simulation
    from sim.scenario import scenario_from_dict

    label, raw = scenario(case)
    simulation = build_simulation(scenario_from_dict(raw), dataset=dataset)
    rows: list[dict[str, Any]] = []
    target = case.setting.target

    def on_row(row: dict[str, Any]) -> None:
        fresh = fresh_accuracy(simulation, case.protocol)
        row["acc_fresh"] = row["acc_mean"] if math.isnan(fresh) else fresh
        rows.append(row)
        if row["acc_mean"] >= target and any(r["acc_fresh"] >= target for r in rows):
            simulation.engine.rounds = row["round"]  # both readings are there: stop

    started = time.perf_counter()
    run_simulation(simulation, show_progress=False, on_row=on_row)
    return label, rows, time.perf_counter() - started


def first_reaching(rows: list[dict[str, Any]], column: str, target: float) -> dict[str, Any] | None:
    return next((r for r in rows if r[column] >= target), None)


def outcome_rows(case: Case, label: str, rows: list[dict[str, Any]], wall: float) -> list[dict[str, Any]]:
    out = []
    for column, reading in READINGS.items():
        hit = first_reaching(rows, column, case.setting.target)
        at = hit or rows[-1]
        out.append({
            "protocol": case.protocol, "label": label, "partition": case.partition,
            "seed": case.setting.seed, "reading": reading, "target": case.setting.target,
            "reached": hit is not None, "round": at["round"],
            "virtual_time_s": round(at["virtual_time"], 3),
            "bytes_total": at["bytes_total"], "bytes_per_peer_max": at["bytes_per_peer_max"],
            "final_acc": round(rows[-1][column], 4), "wall_s": round(wall, 2),
        })  # fmt: skip
    return out


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (partition, protocol, reading); ratios to D-PSGD per seed."""
    baseline = {
        (r["partition"], r["seed"]): r["bytes_total"]
        for r in runs
        if r["protocol"] == "dpsgd" and r["reading"] == "all peers" and r["reached"]
    }
    table = []
    keys = sorted({(r["partition"], r["protocol"], r["reading"]) for r in runs},
                  key=lambda k: (k[0], PROTOCOLS.index(k[1]), k[2]))  # fmt: skip
    for partition, protocol, reading in keys:
        if protocol == "dpsgd" and reading == "freshest model":
            continue  # no such model: the same numbers as "all peers"
        group = [r for r in runs if (r["partition"], r["protocol"], r["reading"]) == (partition, protocol, reading)]
        reached = [r for r in group if r["reached"]]
        ratios = [
            baseline[(partition, r["seed"])] / r["bytes_total"]
            for r in reached
            if (partition, r["seed"]) in baseline and r["bytes_total"] > 0
        ]
        table.append({
            "partition": partition, "protocol": protocol, "label": group[0]["label"],
            "reading": reading, "reached": f"{len(reached)}/{len(group)}",
            "rounds": _mean_std([r["round"] for r in reached]),
            "virtual_s": _mean_std([r["virtual_time_s"] for r in reached]),
            "total_MB": _mean_std([r["bytes_total"] / 1e6 for r in reached]),
            "busiest_peer_MB": _mean_std([r["bytes_per_peer_max"] / 1e6 for r in reached]),
            "dpsgd_bytes_over_this": _mean_std(ratios),
        })  # fmt: skip
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    columns = ["partition", "label", "reading", "reached", "rounds", "virtual_s", "total_MB",
               "busiest_peer_MB", "dpsgd_bytes_over_this"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in table]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(curves: dict[tuple[str, str], tuple[str, list[dict[str, Any]]]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = sorted({p for p, _ in curves})
    fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.4), squeeze=False)
    for ax, partition in zip(axes[0], partitions, strict=True):
        for (part, protocol), (label, rows) in curves.items():
            if part != partition:
                continue
            sent = [r for r in rows if r["bytes_total"] > 0]
            mb = [r["bytes_total"] / 1e6 for r in sent]
            line = ax.plot(mb, [r["acc_mean"] for r in sent], marker="o", markersize=3, label=label)[0]
            if protocol != "dpsgd":
                ax.plot(mb, [r["acc_fresh"] for r in sent], linestyle=":", color=line.get_color())
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set(xscale="log", xlabel="total bytes sent (MB, log)", ylabel="test accuracy",
               title=f"{partition} (solid: all peers, dotted: freshest model)", ylim=(0, 1))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reached(run: dict[str, Any]) -> bool:
    return run["reached"] is True or str(run["reached"]) == "True"  # a bool, or read back from the CSV


def plot_runs(runs: list[dict[str, Any]], path: Path) -> None:
    """The table's figures as bars: rounds and MB to the target per protocol, one row of panels
    per partition; solid bars are the all-peers reading, hatched ones the freshest model.
    Mean over the seeds that reached the target, sample std as error bar; above the MB bars,
    how many times fewer bytes than D-PSGD (per seed, then averaged, as in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    partitions = list(dict.fromkeys(r["partition"] for r in runs))
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in runs)]
    protocols += [p for p in dict.fromkeys(r["protocol"] for r in runs) if p not in protocols]
    labels = {r["protocol"]: r["label"] for r in runs}
    readings = [("all peers", None), ("freshest model", "//")]
    fig, axes = plt.subplots(len(partitions), 2, figsize=(12, 3.8 * len(partitions)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.38
    for line, partition in zip(axes, partitions, strict=True):
        mine = [r for r in runs if r["partition"] == partition]
        seeds = len({r["seed"] for r in mine})
        baseline = {r["seed"]: float(r["bytes_total"]) for r in mine
                    if r["protocol"] == "dpsgd" and r["reading"] == "all peers" and _reached(r)}  # fmt: skip
        for ax, (column, scale, ylabel) in zip(
            line, (("round", 1.0, "rounds to the target"), ("bytes_total", 1e6, "total MB sent to the target")), strict=True
        ):
            for slot, (reading, hatch) in enumerate(readings):
                for index, protocol in enumerate(protocols):
                    group = [r for r in mine if r["protocol"] == protocol and r["reading"] == reading]
                    if not group or (protocol == "dpsgd" and reading == "freshest model"):
                        continue  # D-PSGD has no freshest model: its rows repeat all peers
                    reached = [r for r in group if _reached(r)]
                    values = [float(r[column]) / scale for r in reached]
                    x = index + (slot - 0.5) * width
                    if not values:
                        ax.annotate(f"0/{len(group)}\nreached", (x, 0.01), xycoords=ax.get_xaxis_transform(),
                                    ha="center", va="bottom", fontsize=7)  # at the foot, log axis or not
                        continue
                    mean = statistics.mean(values)
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    ax.bar(x, mean, width, yerr=std, capsize=3, color=colors[index % len(colors)],
                           hatch=hatch, edgecolor="white" if hatch else None, alpha=0.9 if hatch else 1.0)  # fmt: skip
                    complete = len(reached) == len(group) == seeds  # else say how many runs the bar holds
                    note = "" if complete else f"{len(reached)}/{len(group)} reached"
                    if column == "bytes_total" and protocol != "dpsgd":
                        ratios = [baseline[r["seed"]] / float(r["bytes_total"]) for r in reached
                                  if r["seed"] in baseline and float(r["bytes_total"]) > 0]  # fmt: skip
                        if ratios:
                            note = f"÷{statistics.mean(ratios):.1f}" + (f"\n{note}" if note else "")
                    if note:
                        ax.annotate(note, (x, mean + std), ha="center", va="bottom", fontsize=7,
                                    xytext=(0, 2), textcoords="offset points")  # fmt: skip
            ax.set_xticks(range(len(protocols)), [labels[p] for p in protocols], fontsize=8, rotation=12)
            ax.set_ylabel(ylabel)
            if column == "bytes_total":
                ax.set_yscale("log")  # D-PSGD's bytes are 5-50 times the others'
                ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.set_ylabel(ylabel + " (log)")
                ax.set_ylim(top=ax.get_ylim()[1] * 2.5)
            else:
                ax.set_ylim(top=ax.get_ylim()[1] * 1.15)
            ax.grid(axis="y", alpha=0.3)
            target = float(mine[0]["target"])
            ax.set_title(f"{partition}, target {target:.2f}, {seeds} seed(s)", fontsize=9)
        line[1].annotate("÷k: k times fewer bytes than D-PSGD", (0.99, 0.97), xycoords="axes fraction",
                         ha="right", va="top", fontsize=7)  # fmt: skip
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor="grey", hatch=h, edgecolor="white") for _, h in readings]
    fig.legend(handles, [name for name, _ in readings], loc="upper right", fontsize=8, ncol=2)
    fig.suptitle("FL vs MoDeST vs D-PSGD: cost of reaching the target (mean ± std over seeds that reached it)",
                 fontsize=10, x=0.4)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: the columns ``plot_runs`` reads from every run
PLOTTED = ("protocol", "label", "partition", "seed", "reading", "target", "reached", "round", "bytes_total")


def plot_csv(path: Path) -> int:
    """``--plot``: ``plot_runs`` from a ``modest_fl_runs.csv`` alone; 2 on a bad file."""
    from result_csv import read_result_rows, replot

    return replot(path, read_result_rows(path, PLOTTED, "a modest_fl_runs.csv"), plot_runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--partitions", nargs="+", choices=tuple(PARTITIONS), default=list(PARTITIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--target", type=float, help="target accuracy (digits 0.80, MNIST 0.90)")
    parser.add_argument("--max-rounds", type=int)
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "papers")
    parser.add_argument("--plot", type=Path, metavar="RUNS_CSV", help="only re-draw the PNG beside this modest_fl_runs.csv")
    args = parser.parse_args(argv)
    if args.plot is not None:
        return plot_csv(args.plot)

    import modest
    import torch

    from p2pfl.learning import load_dataset

    base = modest.QUICK if args.dataset == "digits" else modest.FULL
    if args.target is not None:
        base = replace(base, target=args.target)
    if args.max_rounds is not None:
        base = replace(base, max_rounds=args.max_rounds)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    curves: dict[tuple[str, str], tuple[str, list[dict[str, Any]]]] = {}
    for seed in args.seeds:
        setting = replace(base, seed=seed)
        dataset = load_dataset(setting.dataset, seed=seed)
        for partition in args.partitions:
            for protocol in args.protocols:
                case = Case(setting, partition, protocol)
                label, rows, wall = run_case(case, dataset)
                runs.extend(outcome_rows(case, label, rows, wall))
                if seed == args.seeds[0]:
                    curves[(partition, protocol)] = (label, rows)
                last = runs[-2]
                print(f"seed {seed} {partition:<8} {label:<26} all peers: "
                      f"{'round ' + str(last['round']) if last['reached'] else 'not reached'} "
                      f"({last['bytes_total'] / 1e6:.1f} MB)  {wall:.1f}s", flush=True)  # fmt: skip
                write_csv(runs, args.out / "modest_fl_runs.csv")  # as measured: nothing lost
    table = summarize(runs)
    write_csv(table, args.out / "modest_fl.csv")
    plot(curves, base.target, args.out / "modest_fl.png")
    plot_runs(runs, args.out / "modest_fl_runs.png")
    print(f"\n{base.dataset}, {base.peers} peers, s={base.sample_size}, {base.local_steps} local steps, "
          f"target {base.target:.2f}, seeds {args.seeds}\n")  # fmt: skip
    print(markdown(table))
    print(f"\nwrote {args.out}/modest_fl_runs.csv, modest_fl.csv, modest_fl.png, modest_fl_runs.png")
    return 0


if __name__ == "__main__":
    from bench_cli import run  # (benchmarks/ is on the path, above)

    run(main)
