"""The hostile-peer fuzzer (issue 12), longer than CI: more seeds, more messages, per protocol.

    python benchmarks/fuzz.py [--protocols dpsgd ...] [--seeds 5] [--rounds 30] [--peers 10]
                              [--burst 48] [--view-names 2000] [--cases mixed round ...]
                              [--out benchmarks/results/fuzz]

For each protocol (MoDeST and SybilWall with signed relayed data, as nodes run them) and
seed, one run of ``sim.fuzz.run_fuzz`` with every category of hostile message mixed and
floods on, and one run per category alone (a bug in one category must not hide the
others). Prints, and writes to ``<out>.csv`` (one row per run) and ``<out>_summary.csv``
(one row per protocol) with a bar chart ``<out>.png``: messages tried, refused by
reason, accepted, and which invariants held. Runs take seconds each on digits.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import Counter
from pathlib import Path
from typing import Any

from p2pfl.learning import load_dataset
from sim.fuzz import CATEGORIES, REASONS, FuzzOptions, FuzzResult, fuzz_scenario, run_fuzz

SIGNED = {"modest": True, "sybilwall": True}
ALL = ["dpsgd", "epidemic", "gossip", "modest", "sybilwall", "bristle"]
INVARIANTS = ("raises", "stall", "jump", "early", "accuracy", "counted")


def one_run(
    protocol: str, seed: int, case: str, args: argparse.Namespace, dataset: Any
) -> dict[str, Any]:
    """One fuzz run as a CSV row (a run that cannot even start undisturbed is a row too)."""
    raw = fuzz_scenario(
        protocol, seed=seed, rounds=args.rounds, n=args.peers, signed=SIGNED.get(protocol, False)
    )
    if case == "mixed":
        options = FuzzOptions(seed=seed, burst_size=args.burst, view_names=args.view_names)
    else:
        options = FuzzOptions(
            seed=seed,
            burst_size=args.burst,
            view_names=args.view_names,
            categories=(case,),
            flood_every=0,
        )
    started = time.perf_counter()
    row: dict[str, Any] = {"protocol": protocol, "seed": seed, "case": case}
    try:
        result = run_fuzz(raw, options=options, dataset=dataset)
    except RuntimeError as error:  # the undisturbed run itself failed
        row.update(wall_s=round(time.perf_counter() - started, 2), error=str(error)[:300])
        return row
    row.update(_describe(result))
    row["wall_s"] = round(time.perf_counter() - started, 2)
    return row


def _describe(result: FuzzResult) -> dict[str, Any]:
    row: dict[str, Any] = {
        "tried": result.messages,
        "accepted": result.accepted_hostile,
        "acc_undisturbed": round(result.baseline.acc_mean, 4),
        "acc_hostile": round(result.hostile.acc_mean, 4),
        "rounds_done": result.hostile.rounds_done,
    }
    row.update({f"refused_{r}": result.refused_hostile.get(r, 0) for r in REASONS})
    row.update({f"held_{name}": int(result.held[name]) for name in INVARIANTS})
    row["violations"] = " | ".join(v[:200] for v in result.violations)
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per protocol: messages tried, refusals by reason, runs in which each invariant held."""
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        mine = [r for r in rows if r["protocol"] == protocol]
        done = [r for r in mine if "error" not in r]
        total: Counter[str] = Counter()
        for r in done:
            total.update(
                {k: r[k] for k in ("tried", "accepted", *(f"refused_{x}" for x in REASONS))}
            )
        summary: dict[str, Any] = {
            "protocol": protocol,
            "runs": len(mine),
            "runs_failed_to_start": len(mine) - len(done),
        }
        summary.update(total)
        for name in INVARIANTS:
            summary[f"held_{name}"] = f"{sum(r[f'held_{name}'] for r in done)}/{len(done)}"
        broken = sorted({r["case"] for r in done if r["violations"]})
        summary["cases_with_violations"] = " ".join(broken)
        out.append(summary)
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Stacked bars of refusals by reason (and accepted) per protocol; invariants held below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["protocol"] for s in summary]
    fig, (bars, table) = plt.subplots(2, 1, figsize=(9, 7), gridspec_kw={"height_ratios": [3, 1]})
    bottom = [0.0] * len(names)
    for key in [*(f"refused_{r}" for r in REASONS), "accepted"]:
        values = [float(s.get(key, 0)) for s in summary]
        bars.bar(names, values, bottom=bottom, label=key.removeprefix("refused_"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    bars.set_ylabel("hostile messages")
    bars.set_title("Hostile-peer fuzzer: fate of the adversary's messages")
    bars.legend(fontsize=8, ncols=2)
    cells = [[s[f"held_{name}"] for name in INVARIANTS] for s in summary]
    table.axis("off")
    table.table(
        cellText=cells, rowLabels=names, colLabels=[f"{n} held" for n in INVARIANTS], loc="center"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", nargs="+", default=ALL, choices=ALL)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--burst", type=int, default=48, help="hostile messages per burst")
    parser.add_argument(
        "--view-names", type=int, default=2000, help="made-up names per forged view"
    )
    parser.add_argument(
        "--cases", nargs="+", default=["mixed", *(c for c in CATEGORIES if c != "flood")]
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz"))
    args = parser.parse_args()
    dataset = load_dataset("digits", seed=0)
    rows = []
    for protocol in args.protocols:
        for seed in range(args.seeds):
            for case in args.cases:
                row = one_run(protocol, seed, case, args, dataset)
                rows.append(row)
                verdict = row.get("error") or row.get("violations") or "all invariants held"
                print(
                    f"{protocol:9s} seed {seed} {case:10s} tried {row.get('tried', 0):6d}  {row['wall_s']:6.1f}s  {verdict[:160]}",
                    flush=True,
                )
    summary = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out.with_suffix(".csv"))
    write_csv(summary, args.out.parent / f"{args.out.name}_summary.csv")
    plot(summary, args.out.with_suffix(".png"))
    for s in summary:
        print(s)
    print(
        f"wrote {args.out.with_suffix('.csv')}, {args.out.name}_summary.csv, {args.out.with_suffix('.png')}"
    )


if __name__ == "__main__":
    main()
