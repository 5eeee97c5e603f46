"""``p2pfl compare``: runs, seed groups and sweeps side by side, in one figure and one table.

Every argument is a folder (see :mod:`sim.rundata` for the kinds): a run is one curve, a
seed group one curve (the mean across seeds) with a band of +- one sample standard
deviation, a sweep one curve per cell. The figure has three panels: mean peer accuracy
against rounds, against total bytes sent, and against virtual time. For a seed group the
x value of bytes and virtual time at a round is the mean across seeds.

The table (``compare.csv``, ``compare.md``) has per entry the final and best mean
accuracy (mean and std across seeds for a group) and, with a target accuracy, the
rounds, bytes and virtual seconds until the mean peer accuracy first reached it. Runs
are measured at evaluation points only, so these are the values at the first evaluation
at or above the target. For a group they are means over the seeds that reached it, and
``reached`` says how many did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.rundata import (
    Entry,
    RunData,
    common_rounds,
    markdown_table,
    reach,
    read_entries,
    spread,
    write_table_csv,
)

__all__ = ["COMPARE_COLUMNS", "compare_runs", "compare_table", "plot_entries"]

COMPARE_COLUMNS = [
    "run",
    "seeds",
    "status",
    "rounds",
    "final_acc",
    "final_acc_std",
    "best_acc",
    "best_acc_std",
    "target",
    "reached",
    "rounds_to_target",
    "bytes_to_target",
    "virtual_time_to_target",
    "path",
]
#: the three panels: x column, axis label, scale applied to the x values
PANELS = (
    ("round", "round", 1.0),
    ("bytes_total", "total bytes sent (MB)", 1e-6),
    ("virtual_time", "virtual time (s)", 1.0),
)


def _status(runs: Sequence[RunData]) -> str:
    statuses = sorted({run.status for run in runs})
    return statuses[0] if len(statuses) == 1 else "+".join(statuses)


def compare_table(entries: Sequence[Entry], target: float | None = None) -> list[dict[str, Any]]:
    """One row per entry (the columns of :data:`COMPARE_COLUMNS`)."""
    table = []
    for entry in entries:
        runs = [run for run in entry.runs if run.rows]
        final = spread([run.rows[-1]["acc_mean"] for run in runs])
        best = spread([max(r["acc_mean"] for r in run.rows) for run in runs])
        rounds = spread([run.rows[-1]["round"] for run in runs])
        row: dict[str, Any] = {
            "run": entry.label,
            "seeds": len(runs),
            "status": _status(runs) if runs else "empty",
            "rounds": rounds.mean,
            "final_acc": final.mean,
            "final_acc_std": final.std,
            "best_acc": best.mean,
            "best_acc_std": best.std,
            "path": str(entry.path),
        }
        if target is not None:
            hits = [hit for run in runs if (hit := reach(run.rows, target)) is not None]
            row.update(
                target=target,
                reached=f"{len(hits)}/{len(runs)}",
                rounds_to_target=spread([h["round"] for h in hits]).mean,
                bytes_to_target=spread([h["bytes_total"] for h in hits]).mean,
                virtual_time_to_target=spread([h["virtual_time"] for h in hits]).mean,
            )
        table.append(row)
    return table


def _curve(runs: Sequence[RunData], x_key: str) -> tuple[list[float], list[float], list[float]]:
    """x (mean across runs), mean accuracy and its sample std at every shared round."""
    by_round = [{int(r["round"]): r for r in run.rows} for run in runs]
    xs, means, stds = [], [], []
    for round_ in common_rounds(runs):
        rows = [rounds[round_] for rounds in by_round]
        acc = spread([r["acc_mean"] for r in rows])
        xs.append(spread([r[x_key] for r in rows]).mean)
        means.append(acc.mean)
        stds.append(0.0 if math.isnan(acc.std) else acc.std)
    return xs, means, stds


def plot_entries(
    entries: Sequence[Entry],
    path: Path,
    *,
    title: str,
    target: float | None = None,
    members: bool = False,
) -> Path:
    """Accuracy against rounds, bytes and virtual time; a band of +- one std for groups
    (``members``: each run of a group as a thin line too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_rows = math.ceil(len(entries) / 2)  # the legend goes under the panels, two per line
    height = 4.4 + 0.25 * legend_rows
    fig, axes = plt.subplots(1, 3, figsize=(15, height), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, entry in enumerate(entries):
        runs = [run for run in entry.runs if run.rows]
        if not runs:
            continue
        colour = colours[index % len(colours)]
        label = entry.label + (f" ({len(runs)} seeds, ±1 std)" if entry.kind == "seeds" else "")
        for ax, (key, _, scale) in zip(axes, PANELS, strict=True):
            xs, means, stds = _curve(runs, key)
            xs = [x * scale for x in xs]
            ax.plot(xs, means, marker="o", markersize=3, color=colour, label=label)
            if entry.kind == "seeds" and len(runs) > 1:
                low = [m - s for m, s in zip(means, stds, strict=True)]
                high = [m + s for m, s in zip(means, stds, strict=True)]
                ax.fill_between(xs, low, high, color=colour, alpha=0.2)
            if members:
                for run in runs:
                    ax.plot([r[key] * scale for r in run.rows], [r["acc_mean"] for r in run.rows],
                            color=colour, linewidth=0.6, alpha=0.5)
    for ax, (_, xlabel, _) in zip(axes, PANELS, strict=True):
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel=xlabel, ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean peer test accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / height + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_runs(
    paths: Sequence[str | Path], out_dir: str | Path, *, target: float | None = None
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Read ``paths``, write ``compare.png``, ``compare.csv`` and ``compare.md`` into
    ``out_dir`` (created if missing); returns the table and the files written."""
    entries = read_entries([Path(p) for p in paths])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = compare_table(entries, target)
    columns = [c for c in COMPARE_COLUMNS if target is not None or not c.endswith("target") and c != "reached"]
    written = [
        plot_entries(entries, out_dir / "compare.png", title=f"{len(entries)} runs compared", target=target),
        out_dir / "compare.csv",
        out_dir / "compare.md",
    ]
    write_table_csv(columns, table, out_dir / "compare.csv")
    note = (
        "final_acc, best_acc: mean peer test accuracy (for a seed group the mean across seeds, "
        "*_std the sample standard deviation)."
    )
    if target is not None:
        note += (
            f" *_to_target: at the first evaluation where mean accuracy >= {target:g} "
            "(mean over the seeds that reached it; `reached` counts them)."
        )
    md_columns = [c for c in columns if c != "path"]
    (out_dir / "compare.md").write_text(markdown_table(md_columns, table) + "\n" + note + "\n")
    return table, written
