"""The Bristle reproduction's figures: honest accuracy and attack success per defence, as a PNG.

    python benchmarks/papers/bristle.py benchmarks/results/papers/bristle_none.csv \\
        benchmarks/results/papers/bristle_byzantine.csv          # re-draw both PNGs
    python benchmarks/papers/bristle.py --sweep runs/bristle-byz \\
        benchmarks/results/papers/bristle_byzantine.csv          # copy a sweep's results.csv, then draw

The runs themselves are two ``p2pfl sweep``s (``examples/papers/bristle_none.toml`` and
``bristle_byzantine.toml``, seeds 1-3; the commands are in docs/papers_bristle.md). Each
sweep folder's ``results.csv`` (one row per cell and seed) is kept as
``benchmarks/results/papers/bristle_{none,byzantine}.csv``; ``--sweep DIR`` makes that copy.
The sweep's own heatmaps put attacks down and defences across, which for one attack is a
single row of colours; this script draws, beside each CSV (same name, ``.png``), bars per
defence instead: the mean final accuracy of honest peers and that of the worst honest peer,
and, where the attack has one, the attack success rate (mean over honest peers, and the
largest), each the mean over seeds with the sample standard deviation as error bar. One row
of panels per (attack, fraction). Nothing is run: the CSV alone is read.

A file that is missing or lacks the columns gives a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/result_csv.py
from result_csv import read_result_rows, replot  # noqa: E402

#: the columns every row must have (those of ``sim.sweep_results.RESULT_COLUMNS`` read here)
NEEDED = ("attack", "defence", "fraction", "seed", "honest_acc_mean", "honest_acc_min", "attack_success_rate",
          "attack_success_max", "status")  # fmt: skip


def _number(value: str) -> float:
    """A CSV cell as a float; empty (no such figure, e.g. no attack) is NaN."""
    return float(value) if value not in ("", None) else math.nan


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample std of the finite values (NaN, 0 when there are none, or one)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, 0.0
    return statistics.mean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _bars(
    ax: Any, defences: list[str], rows: list[dict[str, str]], pairs: tuple[tuple[str, str], ...]
) -> None:
    """Two bars per defence (solid, then hatched), mean ± std over seeds, values written on top."""
    width = 0.4
    for slot, (column, label) in enumerate(pairs):
        means, stds = [], []
        for defence in defences:
            mean, std = _spread([_number(r[column]) for r in rows if r["defence"] == defence])
            means.append(mean)
            stds.append(std)
        xs = [i + (slot - 0.5) * width for i in range(len(defences))]
        shown = [0.0 if math.isnan(m) else m for m in means]
        bars = ax.bar(xs, shown, width, yerr=stds, capsize=3, label=label, color="C0" if slot == 0 else "C1",
                      hatch=None if slot == 0 else "//", edgecolor="white")  # fmt: skip
        ax.bar_label(
            bars,
            labels=["-" if math.isnan(m) else f"{m:.2f}" for m in means],
            fontsize=7,
            padding=2,
        )
    ax.set_xticks(range(len(defences)), defences, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.22)  # accuracies and rates are shares; the top is room for the legend
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=2)


def plot(rows: list[dict[str, str]], path: Path, title: str) -> None:
    """The figure described in the module docstring, for the rows of one results CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["status"] == "ok"]  # failed cells carry no figures
    groups = list(dict.fromkeys((r["attack"], r["fraction"]) for r in rows))
    attacked = any(not math.isnan(_number(r["attack_success_rate"])) for r in rows)
    columns = 2 if attacked else 1
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    fig, axes = plt.subplots(len(groups), columns, figsize=(0.9 * len(defences) * columns + 3, 3.6 * len(groups)),
                             squeeze=False)  # fmt: skip
    for line, (attack, fraction) in zip(axes, groups, strict=True):
        mine = [r for r in rows if (r["attack"], r["fraction"]) == (attack, fraction)]
        seeds = len({r["seed"] for r in mine})
        where = (
            ("no attack" if attack == "none" else attack)
            + (f", {float(fraction):.0%} malicious" if fraction else "")
            + f", {seeds} seed(s)"
        )
        _bars(line[0], defences, mine, (("honest_acc_mean", "honest peers, mean"),
                                         ("honest_acc_min", "worst honest peer")))  # fmt: skip
        line[0].set_ylabel("final test accuracy")
        line[0].set_title(f"{where}: accuracy of honest peers", fontsize=9)
        if attacked:
            _bars(line[1], defences, mine, (("attack_success_rate", "mean over honest peers"),
                                             ("attack_success_max", "largest")))  # fmt: skip
            line[1].set_ylabel("attack success rate (lower is better)")
            line[1].set_title(f"{where}: attack success", fontsize=9)
    fig.suptitle(f"{title} (mean ± sample std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_rows(path: Path) -> list[dict[str, str]] | str:
    """The rows of a sweep results CSV, or the one-line reason it is not one."""
    rows = read_result_rows(path, NEEDED, "a sweep's results.csv")
    if isinstance(rows, list) and not any(r["status"] == "ok" for r in rows):
        return f"{path}: no cell with status ok, nothing to draw"
    return rows


def plot_csv(path: Path) -> int:
    """The PNG beside ``path``; 2 with a one-line message on a bad file."""
    return replot(path, read_rows(path), lambda rows, png: plot(rows, png, f"Bristle reproduction, {path.stem}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "csv", type=Path, nargs="+", help="results CSV(s); the PNG goes beside each"
    )
    parser.add_argument("--sweep", type=Path, metavar="DIR",
                        help="first copy DIR/results.csv (a finished p2pfl sweep) to the one CSV given")  # fmt: skip
    args = parser.parse_args(argv)
    if args.sweep is not None:
        if len(args.csv) != 1:
            parser.error("--sweep copies to exactly one CSV")
        source = args.sweep / "results.csv"
        if not source.is_file():
            print(f"error: --sweep: no results.csv in {args.sweep} (is it a finished p2pfl sweep folder?)",
                  file=sys.stderr)  # fmt: skip
            return 2
        args.csv[0].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, args.csv[0])
        print(f"copied {source} to {args.csv[0]}")
    return max(plot_csv(path) for path in args.csv)


if __name__ == "__main__":
    raise SystemExit(main())
