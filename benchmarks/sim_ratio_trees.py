"""The simulator/bare ratio of ``benchmarks/sim_scale.py`` for several source trees, alternated.

Issue 13 asks that the ratio be no worse than before its redesign. A ratio measured on
another day is not a baseline: this machine's figures for the same code move by several
percent from hour to hour. So each tree -- a checkout of an older commit, and this one --
runs its *own* ``benchmarks/sim_scale.py`` ratio part in a fresh process, the trees in
turn, ``--runs`` times, and the medians are compared side by side.

    git worktree add /tmp/bar 81365fa && git worktree add /tmp/pre 77ead4a
    OMP_NUM_THREADS=1 python benchmarks/sim_ratio_trees.py /tmp/bar /tmp/pre . --runs 4

Each run is ``part_ratio(N, ROUNDS, 2, "mnist", 1, segments=SEGMENTS)`` of that tree (the
bare batched compute and the simulator in alternating segments, one torch thread), its
imports checked to come from that tree. Written to ``--out``: ``ratios.csv`` (one row per
run: tree, commit, run, ratio, seconds per round of both) and ``ratios.png`` (every run,
by tree, medians marked).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: what one run does in the tree's own code; prints "ratio bare_s sim_s"
RUN = """
import sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/benchmarks"]
import sim_scale, sim.training
assert sim.training.__file__.startswith(tree), sim.training.__file__
rows = sim_scale.part_ratio({n}, {rounds}, 2, "mnist", 1, segments={segments})
bare, simulator = rows
print(simulator["ratio_wall"], bare["wall_per_round_s"], simulator["wall_per_round_s"])
"""


def commit_of(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "?"


def run_once(tree: Path, n: int, rounds: int, segments: int) -> tuple[float, float, float]:
    code = RUN.format(n=n, rounds=rounds, segments=segments)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tree)], capture_output=True, text=True, env=env, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(f"sim_ratio_trees.py: {tree}: the run failed:\n{done.stderr[-2000:]}")
    ratio, bare, simulated = (float(v) for v in done.stdout.split()[-3:])
    return ratio, bare, simulated


def plot(rows: list[dict[str, Any]], trees: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(trees), 3.6))
    for x, tree in enumerate(trees):
        values = [r["ratio"] for r in rows if r["tree"] == tree]
        ax.scatter([x] * len(values), values, color="tab:blue", alpha=0.7)
        ax.hlines(statistics.median(values), x - 0.25, x + 0.25, color="black")
    ax.set_xticks(range(len(trees)), trees, rotation=15)
    ax.set_ylabel("simulator / bare (wall)")
    ax.set_title("sim_scale ratio by tree, alternated (line: median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="sim_scale's ratio for several trees, alternated")
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (checkouts)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--segments", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sim_ratio_trees")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    for tree in trees:
        if not (tree / "benchmarks" / "sim_scale.py").is_file():
            print(f"sim_ratio_trees.py: {tree}: no benchmarks/sim_scale.py there", file=sys.stderr)
            raise SystemExit(2)
    labels = [f"{tree.name} ({commit_of(tree)})" for tree in trees]
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for run in range(1, args.runs + 1):
        for tree, label in zip(trees, labels, strict=True):
            ratio, bare, simulated = run_once(tree, args.n, args.rounds, args.segments)
            load = os.getloadavg()[0]
            rows.append({"tree": label, "run": run, "n": args.n, "ratio": ratio,
                         "bare_s_per_round": bare, "sim_s_per_round": simulated, "load": load})  # fmt: skip
            print(f"run {run} {label}: ratio {ratio:.3f} (bare {bare:.4f} s, simulator {simulated:.4f} s per round; load {load:.1f})", flush=True)  # noqa: E501
            with (args.out / "ratios.csv").open("w", newline="") as handle:  # as measured
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    print()
    for label in labels:
        values = [r["ratio"] for r in rows if r["tree"] == label]
        print(f"{label}: median {statistics.median(values):.3f} over {len(values)} runs")
    plot(rows, labels, args.out / "ratios.png")
    print(f"written: {args.out / 'ratios.csv'}, {args.out / 'ratios.png'}")


if __name__ == "__main__":
    main()
