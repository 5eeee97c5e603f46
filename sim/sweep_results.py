"""What a sweep writes: results.csv, status.csv, seeds.csv, heatmaps and the console table.

``results.csv`` holds one row per cell in the sweep's planned order and nothing that
depends on how or when the cells ran (wall times live in ``status.csv``), so a serial
sweep, one with ``--jobs N``, one on Ray and a resumed one write the same bytes.

Across seeds (cells that differ only in their seed), the heatmaps, the table and
``seeds.csv`` give the **mean** and the **sample standard deviation** (``n - 1`` in the
denominator; empty with a single seed) of each metric over the seeds whose cell ran;
``seeds.csv`` adds ``_ci95``, the half-width of the 95% confidence interval of the mean
(Student's t, ``n - 1`` degrees of freedom). Failed cells are counted in ``failed`` and
left out.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = [
    "RESULT_COLUMNS",
    "SEED_METRICS",
    "SWEEP_METRICS",
    "STATUS_COLUMNS",
    "plot_heatmaps",
    "results_table",
    "seed_stats",
    "share_label",
    "write_results",
    "write_seed_stats",
    "write_status",
]

#: columns of results.csv, in order
RESULT_COLUMNS = [
    "attack",
    "defence",
    "fraction",
    "malicious_share",  # the real share of malicious peers (Sybils: identities / all peers)
    "seed",
    "honest_acc_mean",
    "honest_acc_min",
    "attack_success_rate",
    "attack_success_max",
    "malicious_peers",
    "honest_peers",
    "rounds",
    "status",  # ok | failed
    "cell",
]
#: columns of status.csv: how each cell was obtained this time
STATUS_COLUMNS = ["cell", "status", "wall_s", "error"]  # ran | resumed | same as X | failed
#: metrics drawn as heatmaps: column -> (title, higher is better)
SWEEP_METRICS = {
    "honest_acc_mean": ("final accuracy of honest peers (mean)", True),
    "attack_success_rate": ("attack success rate (honest peers, mean)", False),
}
#: metrics summarised across seeds in seeds.csv
SEED_METRICS = ("honest_acc_mean", "honest_acc_min", "attack_success_rate")


def _csv_value(key: str, value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if key == "malicious_share":
            return f"{value:.4g}"
        return f"{value:g}" if key in ("fraction", "wall_s") else f"{value:.4f}"
    return value


def _write(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(k, row.get(k, "")) for k in columns})


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    _write(rows, path, RESULT_COLUMNS)


def write_status(rows: list[dict[str, Any]], path: Path) -> None:
    _write(rows, path, STATUS_COLUMNS)


def _number(value: Any) -> float:
    return float(value) if value not in ("", None) else float("nan")


def _ci95(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean of n values (Student's t)."""
    if n < 2 or math.isnan(std):
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def seed_stats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, defence, fraction): mean and sample std of each metric over seeds."""
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["attack"], row["defence"], row["fraction"]), []).append(row)
    stats: list[dict[str, Any]] = []
    for (attack, defence, fraction), group in groups.items():
        ok = [r for r in group if r.get("status", "ok") == "ok"]
        entry: dict[str, Any] = {
            "attack": attack,
            "defence": defence,
            "fraction": fraction,
            "seeds": len(ok),
            "failed": len(group) - len(ok),
            "malicious_share": _share(ok),
        }
        for metric in SEED_METRICS:
            values = [v for v in (_number(r.get(metric)) for r in ok) if not math.isnan(v)]
            entry[f"{metric}_mean"] = statistics.fmean(values) if values else float("nan")
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else float("nan")
            entry[f"{metric}_ci95"] = _ci95(entry[f"{metric}_std"], len(values))
        stats.append(entry)
    return stats


def _share(rows: list[dict[str, Any]]) -> float:
    """The real share of malicious peers of a cell's seeds (the same graph size in each:
    their mean), ``nan`` when no row says it."""
    values = [v for v in (_number(r.get("malicious_share")) for r in rows) if not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def share_label(entries: list[dict[str, Any]], fraction: Any) -> str:
    """``" (real share x)"`` when the cells' real share of malicious peers is not the
    configured ``fraction`` (a Sybil cell with a fixed number of identities, a count, a
    rounded fraction); ``""`` when it is, or is unknown. Several values: joined by "/"."""
    values = (_number(e.get("malicious_share")) for e in entries if e["fraction"] != "")
    shares = sorted({round(v, 4) for v in values if not math.isnan(v)})
    if not shares or fraction in ("", None):
        return ""
    if all(abs(s - float(fraction)) < 5e-4 for s in shares):
        return ""
    return " (real share " + "/".join(f"{s:.3g}" for s in shares) + ")"


def write_seed_stats(rows: list[dict[str, Any]], path: Path) -> None:
    columns = ["attack", "defence", "fraction", "malicious_share", "seeds", "failed"]
    columns += [f"{m}_{s}" for m in SEED_METRICS for s in ("mean", "std", "ci95")]
    _write(seed_stats(rows), path, columns)


def _axes(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], list[Any]]:
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    fractions = list(dict.fromkeys(r["fraction"] for r in rows if r["fraction"] != ""))
    return attacks, defences, fractions or [""]


def _grid(
    stats: list[dict[str, Any]], metric: str, fraction: Any
) -> tuple[list[str], list[str], list[list[dict[str, Any] | None]]]:
    """The seed-stats entries laid out attacks down, defences across, for one fraction."""
    attacks, defences, _ = _axes(stats)
    grid: list[list[dict[str, Any] | None]] = [[None] * len(defences) for _ in attacks]
    for entry in stats:
        if entry["fraction"] in ("", fraction):
            grid[attacks.index(entry["attack"])][defences.index(entry["defence"])] = entry
    return attacks, defences, grid


def _seeds_note(stats: list[dict[str, Any]]) -> str:
    most = max((entry["seeds"] for entry in stats), default=0)
    return f" - mean ± sample std over {most} seeds" if most > 1 else ""


def _title_note(stats: list[dict[str, Any]]) -> str:
    note = _seeds_note(stats)
    return "\n" + note.removeprefix(" - ") if note else ""


def plot_heatmaps(rows: list[dict[str, Any]], out_dir: Path, *, title: str) -> list[Path]:
    """One PNG per metric (and fraction): attacks down, defences across, values written in.

    Several seeds: the colour is the mean over seeds, the text ``mean`` over ``±std``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths: list[Path] = []
    if not rows:
        return paths
    stats = seed_stats(rows)
    note = _title_note(stats)  # on a line of its own: long titles are cut at the edges
    _, _, fractions = _axes(stats)
    for metric, (label, higher_better) in SWEEP_METRICS.items():
        for fraction in fractions:
            attacks, defences, grid = _grid(stats, metric, fraction)
            nan = float("nan")
            mean = [[e[f"{metric}_mean"] if e else nan for e in line] for line in grid]
            std = [[e[f"{metric}_std"] if e else nan for e in line] for line in grid]
            data = np.array(mean, dtype=float)
            fig, ax = plt.subplots(figsize=(1.3 * len(defences) + 2.5, 0.55 * len(attacks) + 1.8))
            cmap = plt.get_cmap("RdYlGn" if higher_better else "RdYlGn_r").with_extremes(
                bad="#dddddd"
            )
            image = ax.imshow(
                np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto"
            )
            ax.set_xticks(range(len(defences)), defences, rotation=30, ha="right")
            shown = [
                attack + share_label([e for e in line if e is not None], fraction)
                for attack, line in zip(attacks, grid, strict=True)
            ]
            ax.set_yticks(range(len(attacks)), shown)
            for i in range(len(attacks)):
                for j in range(len(defences)):
                    text = "-" if math.isnan(data[i, j]) else f"{data[i, j]:.2f}"
                    if not math.isnan(std[i][j]):  # seeds: 3 digits, a spread is small
                        text = f"{data[i, j]:.3f}\n±{std[i][j]:.3f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8)
            suffix = "" if fraction == "" else f" (Byzantine fraction {fraction:g})"
            ax.set_title(f"{title}: {label}{suffix}{note}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.04)
            fig.tight_layout()
            name = f"heatmap_{metric}" + ("" if len(fractions) == 1 else f"_f{fraction:g}") + ".png"
            fig.savefig(out_dir / name, dpi=120)
            plt.close(fig)
            paths.append(out_dir / name)
    return paths


def _shown(entry: dict[str, Any], metric: str, digits: int) -> str:
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f"±{std:.{digits}f}")


def results_table(rows: list[dict[str, Any]], title: str) -> Table:
    """A rich table: attacks down, defences across, ``accuracy / success rate`` per cell.

    Several seeds: each value is ``mean±std`` (sample standard deviation over seeds).
    """
    stats = seed_stats(rows)
    attacks, defences, fractions = _axes(stats)
    table = Table(title=f"{title}: honest accuracy / attack success rate{_seeds_note(stats)}")
    table.add_column("attack")
    if fractions != [""]:
        table.add_column("fraction", justify="right")
    for defence in defences:
        table.add_column(defence, justify="right")
    for attack in attacks:
        for fraction in fractions:
            cells = {
                e["defence"]: e
                for e in stats
                if e["attack"] == attack and e["fraction"] in ("", fraction)
            }
            if not cells:
                continue
            untargeted = all(entry["fraction"] == "" for entry in cells.values())
            shown = "-" if untargeted else f"{fraction:g}"
            if not untargeted:  # a Sybil cell: the identities' real share beside it
                shown += share_label(list(cells.values()), fraction)
            line = [attack] + ([shown] if fractions != [""] else [])
            for defence in defences:
                entry = cells.get(defence)
                if entry is None:
                    line.append("")
                    continue
                if entry["seeds"] == 0:
                    line.append("failed")
                    continue
                text = _shown(entry, "honest_acc_mean", 3)
                success = _shown(entry, "attack_success_rate", 2)
                if success:
                    text += f" / {success}"
                if entry["failed"]:
                    text += f" ({entry['failed']} failed)"
                line.append(text)
            table.add_row(*line)
    return table
