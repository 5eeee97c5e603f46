"""MoDeST vs D-PSGD vs Epidemic Learning: bytes and time to reach a target accuracy.

    python benchmarks/modest.py             # MNIST, 100 peers, target 0.90 (about an hour on 2 busy cores)
    python benchmarks/modest.py --quick     # smoke test: digits, 40 peers, target 0.80 (a minute or two)
    python benchmarks/modest.py --protocols modest-a1 dpsgd --target 0.85

One seed, the same data partition (IID), the same initial model and the same evaluation
set for every protocol; each runs in the simulator until its accuracy first reaches the
target (or ``--max-rounds``):

``dpsgd``      D-PSGD on a random 4-regular graph, Metropolis-Hastings weights;
``epidemic``   Epidemic Learning, each peer pushes to ``s = ceil(log2 n)`` random peers;
``modest-a1``  MoDeST, sample ``s = 10``, one aggregator;
``modest-a3``  MoDeST, sample ``s = 10``, three aggregators.

Every peer of D-PSGD and Epidemic Learning trains ``--local-steps`` SGD steps per round;
in MoDeST only the ten sampled peers do. The network is the simulator's: 10 ms latency,
100 Mbit/s uplinks, 5 ms per SGD step.

Accuracy. The stopping rule is the *mean test accuracy of all peers' current models*
(``acc_mean``), the same for every protocol. In MoDeST a peer's model is the last one it
trained or aggregated, so peers that were not sampled for a while hold old models and
pull the mean down: it is the strict reading. The FL-style reading -- the freshest
aggregated model, which is what the next sample trains -- is reported for MoDeST as an
extra row (``latest aggregate``), from the same run.

Traffic is counted by the simulator on every message sent (models, views, pings): total,
and per peer (mean and max). The table's last column is D-PSGD's total bytes at the
target divided by the row's. Output: a table on stdout, and in ``--out`` (default
``benchmarks/results``) ``modest.csv`` (every evaluation of every protocol),
``modest_summary.csv`` (the table) and ``modest.png`` (accuracy vs bytes and vs time).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from p2pfl.learning import evaluate, load_dataset  # noqa: E402
from p2pfl.protocols.modest import ModestProtocol  # noqa: E402
from sim.runner import build_simulation, run_simulation  # noqa: E402
from sim.scenario import scenario_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("dpsgd", "epidemic", "modest-a1", "modest-a3")
BASELINE = "dpsgd"


@dataclass(frozen=True)
class Setting:
    dataset: str
    peers: int
    hidden: int
    local_steps: int
    target: float
    max_rounds: int
    eval_every: int
    eval_test: int
    sample_size: int = 10
    seed: int = 1


FULL = Setting("mnist", 100, 128, 10, 0.90, 150, 2, 2000)
QUICK = Setting("digits", 40, 32, 5, 0.80, 60, 2, 0)


def protocol_spec(name: str, setting: Setting) -> tuple[str, dict[str, Any]]:
    """(label, scenario tables that differ between protocols)."""
    n, steps = setting.peers, setting.local_steps
    overlay = {"topology": {"kind": "complete", "n": n}, "network": {"mode": "overlay"}}
    if name == "dpsgd":
        return "D-PSGD (4-regular)", {
            "topology": {"kind": "regular", "n": n, "params": {"k": 4}},
            "protocol": {"name": "dpsgd", "local_steps": steps},
            "network": {"mode": "graph"},
        }
    if name == "epidemic":
        fanout = math.ceil(math.log2(n))
        return f"Epidemic (s={fanout})", {
            **overlay,
            "protocol": {"name": "epidemic", "fanout": fanout, "local_steps": steps},
        }
    if name.startswith("modest-a"):
        a, s = int(name.removeprefix("modest-a")), setting.sample_size
        return f"MoDeST (s={s}, a={a})", {
            **overlay,
            "protocol": {
                "name": "modest",
                "sample_size": s,
                "num_aggregators": a,
                "local_steps": steps,
            },
        }
    raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")


def scenario(name: str, setting: Setting) -> tuple[str, dict[str, Any]]:
    label, spec = protocol_spec(name, setting)
    raw: dict[str, Any] = {
        "name": f"bench-modest-{name}",
        "seed": setting.seed,
        "rounds": setting.max_rounds,
        "data": {"dataset": setting.dataset, "partition": "iid", "batch_size": 32},
        "model": {"name": "mlp", "hidden": [setting.hidden], "lr": 0.1},
        "sim": {
            "eval_every": setting.eval_every,
            "eval_test_samples": setting.eval_test,
            "threads": 1,
        },
        **spec,
    }
    raw["network"] = {"latency": 0.01, "bandwidth": 12.5e6, "step_time": 0.005, **raw["network"]}
    return label, raw


@dataclass
class Outcome:
    name: str
    label: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def first(self, column: str, target: float) -> dict[str, Any] | None:
        """The first evaluation at which ``column`` reached ``target``."""
        return next((r for r in self.rows if r.get(column, -1.0) >= target), None)


def latest_aggregate_accuracy(simulation: Any) -> float:
    """Accuracy of the freshest aggregated model: held by the live peer that aggregated last."""
    engine = simulation.engine
    best: ModestProtocol | None = None
    for i, protocol in enumerate(engine.protocols):
        if not (engine.alive[i] and engine.started[i]) or not isinstance(protocol, ModestProtocol):
            continue
        if best is None or protocol.aggregated_round > best.aggregated_round:
            best = protocol
    if best is None or best.aggregated_round == 0:
        return float("nan")
    evaluator = simulation.evaluator
    result = evaluate(
        simulation.trainer, torch.as_tensor(best.params), evaluator.x_test, evaluator.y_test
    )
    return float(result.accuracy[0])


def run_protocol(name: str, setting: Setting, dataset: Any) -> Outcome:
    label, raw = scenario(name, setting)
    simulation = build_simulation(scenario_from_dict(raw), dataset=dataset)
    outcome = Outcome(name, label)
    is_modest = name.startswith("modest")

    def on_row(row: dict[str, Any]) -> None:
        if is_modest:
            row["acc_latest"] = latest_aggregate_accuracy(simulation)
        row["protocol"] = name
        outcome.rows.append(row)
        print(
            f"  {label:<22} round {row['round']:>4}  acc {row['acc_mean']:.4f}"
            + (f" (latest {row['acc_latest']:.4f})" if is_modest else "")
            + f"  {row['bytes_total'] / 1e6:9.1f} MB  t={row['virtual_time']:7.2f}s",
            flush=True,
        )
        if row["acc_mean"] >= setting.target:
            simulation.engine.rounds = row["round"]  # stop here: the target is reached

    started = time.perf_counter()
    run_simulation(simulation, show_progress=False, on_row=on_row)
    outcome.wall_s = time.perf_counter() - started
    return outcome


# ------------------------------------------------------------------------------ reporting

SUMMARY_COLUMNS = [
    "protocol", "label", "accuracy", "target", "reached", "round", "virtual_time_s",
    "bytes_total", "bytes_per_peer_mean", "bytes_per_peer_max", "messages_total",
    "dpsgd_bytes_ratio", "wall_s",
]  # fmt: skip


def summarize(outcomes: list[Outcome], target: float) -> list[dict[str, Any]]:
    table: list[dict[str, Any]] = []
    for outcome in outcomes:
        readings = [("acc_mean", outcome.label)]
        if outcome.name.startswith("modest"):
            readings.append(("acc_latest", f"{outcome.label}, latest aggregate"))
        for column, label in readings:
            row = outcome.first(column, target)
            last = outcome.rows[-1]
            table.append({
                "protocol": outcome.name,
                "label": label,
                "accuracy": column,
                "target": target,
                "reached": row is not None,
                "round": (row or last)["round"],
                "virtual_time_s": (row or last)["virtual_time"],
                "bytes_total": (row or last)["bytes_total"],
                "bytes_per_peer_mean": (row or last)["bytes_per_peer_mean"],
                "bytes_per_peer_max": (row or last)["bytes_per_peer_max"],
                "messages_total": (row or last)["messages_total"],
                "wall_s": outcome.wall_s,
            })  # fmt: skip
    baseline = next((r for r in table if r["protocol"] == BASELINE and r["reached"]), None)
    for entry in table:
        entry["dpsgd_bytes_ratio"] = (
            baseline["bytes_total"] / entry["bytes_total"]
            if baseline is not None and entry["reached"]
            else float("nan")
        )
    return table


def print_table(table: list[dict[str, Any]], setting: Setting) -> None:
    print()
    print(
        f"{setting.dataset}, {setting.peers} peers, IID, MLP {setting.hidden} hidden, "
        f"{setting.local_steps} local steps; target accuracy {setting.target:.2f}; seed {setting.seed}"
    )
    header = (
        f"{'protocol':<40} {'round':>5} {'time s':>8} {'total MB':>10} "
        f"{'MB/peer mean':>12} {'MB/peer max':>11} {'D-PSGD/this':>11}"
    )
    print(header)
    print("-" * len(header))
    for e in table:
        mark = "" if e["reached"] else "  (target not reached: last evaluation)"
        ratio = "-" if math.isnan(e["dpsgd_bytes_ratio"]) else f"{e['dpsgd_bytes_ratio']:.1f}x"
        print(
            f"{e['label']:<40} {e['round']:>5} {e['virtual_time_s']:>8.2f} "
            f"{e['bytes_total'] / 1e6:>10.1f} {e['bytes_per_peer_mean'] / 1e6:>12.2f} "
            f"{e['bytes_per_peer_max'] / 1e6:>11.2f} {ratio:>11}{mark}"
        )


def write_csv(rows: list[dict[str, Any]], path: Path, first: list[str]) -> None:
    columns = list(first)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(outcomes: list[Outcome], setting: Setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_bytes, by_time) = plt.subplots(1, 2, figsize=(12, 4.6))
    for outcome in outcomes:
        sent = [r for r in outcome.rows if r["bytes_total"] > 0]  # a log axis has no 0
        mb = [r["bytes_total"] / 1e6 for r in sent]
        line = by_bytes.plot(
            mb, [r["acc_mean"] for r in sent], marker="o", markersize=3, label=outcome.label
        )[0]
        seconds = [r["virtual_time"] for r in outcome.rows]
        acc = [r["acc_mean"] for r in outcome.rows]
        by_time.plot(
            seconds, acc, marker="o", markersize=3, color=line.get_color(), label=outcome.label
        )
        if outcome.name.startswith("modest"):
            kwargs = {
                "linestyle": ":",
                "color": line.get_color(),
                "label": f"{outcome.label}, latest aggregate",
            }
            by_bytes.plot(mb, [r["acc_latest"] for r in sent], **kwargs)
            by_time.plot(seconds, [r["acc_latest"] for r in outcome.rows], **kwargs)
    for ax in (by_bytes, by_time):
        ax.axhline(setting.target, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_ylabel("test accuracy (mean over peers' models)")
    by_bytes.set(xscale="log", xlabel="total bytes sent (MB, log scale)")
    by_time.set(xlabel="virtual time (s)")
    by_bytes.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"{setting.dataset}, {setting.peers} peers: accuracy vs traffic "
        f"(dashed: target {setting.target:.2f})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 40 peers, target 0.80")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--target", type=float, help="target mean accuracy")
    parser.add_argument("--max-rounds", type=int, help="give up after this many rounds")
    parser.add_argument("--peers", type=int)
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    setting = QUICK if args.quick else FULL
    overrides = {
        "target": args.target,
        "max_rounds": args.max_rounds,
        "peers": args.peers,
        "local_steps": args.local_steps,
        "seed": args.seed,
    }
    setting = Setting(
        **{**setting.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    )
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread, {platform.machine()}, python {sys.version.split()[0]}; "
        f"{setting}"
    )
    dataset = load_dataset(setting.dataset, seed=setting.seed)
    outcomes = []
    for name in args.protocols:
        print(f"{name}:", flush=True)
        outcomes.append(run_protocol(name, setting, dataset))
    table = summarize(outcomes, setting.target)
    print_table(table, setting)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "modest_quick" if args.quick else "modest"
    rows = [row for outcome in outcomes for row in outcome.rows]
    write_csv(rows, args.out / f"{stem}.csv", ["protocol", "round", "acc_mean", "acc_latest"])
    write_csv(table, args.out / f"{stem}_summary.csv", SUMMARY_COLUMNS)
    plot(outcomes, setting, args.out / f"{stem}.png")
    print(f"\nwrote {args.out / stem}.csv, {stem}_summary.csv and {stem}.png")
    return 0


if __name__ == "__main__":
    from bench_cli import run

    run(main)
