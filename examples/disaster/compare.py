"""Lose data-holders or relays: the reference study's comparison, over a grid of settings.

Takes a scenario whose first disruption is a ``crash`` (e.g. ba_digits_lose_holders.toml)
and reruns it with that crash taking data-holding peers or relay-only peers, for each
count, strategy and seed asked for, plus an undisrupted baseline per seed. ``--among
data_only`` replaces the crash by a ``data_loss`` of as many data-holders: they lose
their data but stay up and keep relaying, which separates the loss of data from the
loss of links. Writes one CSV
row per run and prints a Markdown table of the means over seeds.

    python examples/disaster/compare.py examples/disaster/ba_digits_lose_holders.toml \\
        --seeds 1 2 3 --counts 8 16 --strategies random degree --out runs/disaster-digits

``--set key=value`` overrides the scenario as ``p2pfl sim`` does (e.g. ``--set
topology.params.m=1``); ``--write`` also writes every run folder (plots included).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from p2pfl.learning import load_dataset
from sim.runner import build_simulation, run_simulation, write_run
from sim.scenario import load_scenario, scenario_from_dict

COLUMNS = [
    "among", "count", "strategy", "seed", "final_acc", "final_acc_all", "final_acc_min", "acc_largest_component",
    "acc_outside_largest", "acc_with_data", "acc_without_data", "acc_at_crash", "components", "largest_component", "isolated_peers",
    "peers_alive", "wall_s",
]  # fmt: skip


def run_one(raw: dict[str, Any], dataset: Any, out: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    simulation = build_simulation(scenario_from_dict(raw), dataset=dataset)
    rows = run_simulation(simulation, show_progress=False)
    if out is not None:
        write_run(simulation, out)
    last = rows[-1]
    crash_round = raw["disruptions"][0]["at_round"] if raw["disruptions"] else None
    at_crash = next(
        (r for r in rows if crash_round is not None and r["round"] >= crash_round), last
    )
    return {
        "final_acc": last["acc_mean"],
        # every device, dead ones with the model they held when they went down
        "final_acc_all": last.get("acc_mean_all", last["acc_mean"]),
        "final_acc_min": last["acc_min"],
        "acc_largest_component": last.get("acc_largest_component", last["acc_mean"]),
        "acc_outside_largest": last.get("acc_outside_largest", float("nan")),
        "acc_with_data": last.get("acc_with_data", float("nan")),
        "acc_without_data": last.get("acc_without_data", float("nan")),
        "acc_at_crash": at_crash["acc_mean"],
        "components": last.get("components", 1),
        "largest_component": last.get("largest_component", last["peers_alive"]),
        "isolated_peers": last.get("isolated_peers", 0),
        "peers_alive": last["peers_alive"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--counts", type=int, nargs="+", default=None, help="default: the scenario's"
    )
    parser.add_argument(
        "--strategies", nargs="+", default=["random"], choices=["random", "degree", "betweenness"]
    )
    parser.add_argument(
        "--among",
        nargs="+",
        default=["data_holders", "relays"],
        choices=["data_holders", "relays", "all", "data_only"],
    )
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="degree/betweenness targets re-ranked after each loss (one peer at a time)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/disaster-compare"))
    parser.add_argument("--write", action="store_true", help="write every run folder too")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)

    base = load_scenario(args.scenario, args.overrides).model_dump(mode="json", exclude_none=True)
    crash = base["disruptions"][0] if base.get("disruptions") else None
    if crash is None or crash["kind"] != "crash":
        parser.error(f"{args.scenario}: its first disruption must be a crash")
    counts = args.counts or [crash["count"]]
    dataset = load_dataset(
        base["data"]["dataset"], data_dir=base["data"].get("data_dir"), seed=base["seed"]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    grid: list[tuple[str, int, str]] = [] if args.no_baseline else [("none", 0, "-")]
    grid += [(a, c, s) for a in args.among for c in counts for s in args.strategies]

    results: list[dict[str, Any]] = []
    csv_path = args.out / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for seed in args.seeds:
            for among, count, strategy in grid:
                raw = {**base, "seed": seed, "name": f"{base['name']}-{among}-{count}-{strategy}"}
                if among == "none":
                    raw["disruptions"], raw["sim"] = [], {**base["sim"], "connectivity": True}
                else:
                    first = {**crash, "among": among, "count": count, "strategy": strategy}
                    first.pop("fraction", None)
                    first.pop("recompute", None)
                    if args.recompute and strategy != "random" and among != "data_only":
                        first["recompute"] = True
                    first["name"] = f"{count} {among.replace('_', '-')} crash ({strategy})"
                    if among == "data_only":
                        first |= {"kind": "data_loss", "among": "data_holders"}
                        first["name"] = f"{count} data-holders lose data ({strategy})"
                    raw["disruptions"] = [first, *base["disruptions"][1:]]
                run_dir = args.out / f"{raw['name']}-s{seed}" if args.write else None
                row = {"among": among, "count": count, "strategy": strategy, "seed": seed}
                row |= run_one(raw, dataset, run_dir)
                results.append(row)
                writer.writerow(row)
                handle.flush()
                print(
                    f"seed {seed} {among:>12} {count:>3} {strategy:>11}: final acc {row['final_acc']:.4f} "
                    f"(min {row['final_acc_min']:.3f}), {row['components']} components, "
                    f"largest {row['largest_component']}  [{row['wall_s']} s]",
                    file=sys.stderr,
                    flush=True,
                )
    print(markdown(results))
    plot(results, args.out / "results.png")
    print(f"\nper-run rows in {csv_path}, a figure in {args.out / 'results.png'}")
    return 0


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Final accuracy per setting, survivors and all devices (mean and std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["among"], row["count"], row["strategy"]), []).append(row)
    labels = [f"{a}\n{c} {s}" if a != "none" else "no loss" for a, c, s in groups]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups)), 4.2))
    for offset, (key, name) in ((-0.2, ("final_acc", "survivors")), (0.2, ("final_acc_all", "all devices"))):
        means = [statistics.fmean(float(r[key]) for r in rows) for rows in groups.values()]
        spread = [
            statistics.stdev(float(r[key]) for r in rows) if len(rows) > 1 else 0.0
            for rows in groups.values()
        ]
        ax.bar([i + offset for i in range(len(groups))], means, width=0.4, yerr=spread, label=name)
    ax.set_xticks(range(len(groups)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("final test accuracy (mean over seeds)")
    low = min(float(r["final_acc_all"]) for r in results)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict[str, Any]]) -> str:
    """Means (and standard deviations) over seeds of each setting."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["among"], row["count"], row["strategy"]), []).append(row)

    def stat(rows: list[dict[str, Any]], key: str, digits: int = 3) -> str:
        values = [float(r[key]) for r in rows]
        mean = statistics.fmean(values)
        if len(values) < 2:
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    lines = [
        "| lost | count | strategy | seeds | final acc (survivors) | final acc (all devices) "
        "| final acc (min peer) | acc largest comp. "
        "| acc with data | acc without data | components | largest comp. | isolated |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (among, count, strategy), rows in groups.items():
        lines.append(
            f"| {among} | {count} | {strategy} | {len(rows)} | {stat(rows, 'final_acc')} | "
            f"{stat(rows, 'final_acc_all')} | "
            f"{stat(rows, 'final_acc_min')} | {stat(rows, 'acc_largest_component')} | "
            f"{stat(rows, 'acc_with_data')} | {stat(rows, 'acc_without_data')} | "
            f"{stat(rows, 'components', 1)} | {stat(rows, 'largest_component', 1)} | {stat(rows, 'isolated_peers', 1)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
