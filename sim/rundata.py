"""Reading run folders back, and the few statistics that tables across runs need.

Seed groups (:mod:`sim.seeds`) and ``p2pfl compare`` (:mod:`sim.compare`) both work
from what is on disk, so that a run interrupted by Ctrl-C, or written by another
process, counts the same as one that just finished in this one.

Folder kinds, recognised by their content:

- a *run folder* holds ``metrics.csv`` (and ``summary.json``);
- a *seed group* holds ``group.json`` or ``seed-<n>/`` run folders, one per seed;
- a *sweep folder* holds ``cells/<cell>/``, each a run folder or a seed group; cells
  named ``<cell>__s<seed>`` (a sweep with a seeds axis) are read as one seed group.

Spread across seeds is the sample standard deviation (n - 1 in the denominator) and a
95% confidence interval of the mean from Student's t distribution; both are NaN for a
single seed.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError

__all__ = [
    "Entry",
    "RunData",
    "RunDataError",
    "Spread",
    "common_rounds",
    "fmt",
    "markdown_table",
    "read_entries",
    "read_metrics",
    "read_run",
    "reach",
    "spread",
    "write_table_csv",
]


class RunDataError(P2PFLError, ValueError):
    """A folder that is not a run, a seed group or a sweep; one line for the user."""


@dataclass
class RunData:
    """One run folder read back: its rows and its summary (empty if it has none)."""

    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def status(self) -> str:
        # a folder without a status predates status tracking: it was written at the end
        return str(self.summary.get("status", "completed"))

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.path.name.removeprefix("seed-"))


@dataclass
class Entry:
    """What one argument of ``compare`` (or one sweep cell) stands for: one run, or the
    runs of one seed group (one curve with a band)."""

    label: str
    kind: str  # "run" | "seeds"
    runs: list[RunData]
    path: Path


def _number(text: str) -> Any:
    if text == "":
        return math.nan
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """``metrics.csv`` as rows of numbers (text left as is, empty cells as NaN)."""
    with path.open(newline="") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def read_run(path: Path) -> RunData:
    metrics = path / "metrics.csv"
    if not metrics.is_file():
        raise RunDataError(f"{path}: no metrics.csv (is this a run folder?)")
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return RunData(path, read_metrics(metrics), summary)


def _seed_folders(path: Path) -> list[Path]:
    found = [p for p in path.glob("seed-*") if (p / "metrics.csv").is_file()]

    def order(p: Path) -> tuple[int, str]:
        suffix = p.name.removeprefix("seed-")
        return (int(suffix), "") if suffix.lstrip("-").isdigit() else (0, suffix)

    return sorted(found, key=order)


def _read_one(path: Path, label: str) -> Entry | None:
    if (path / "metrics.csv").is_file():
        return Entry(label, "run", [read_run(path)], path)
    members = _seed_folders(path)
    if members or (path / "group.json").is_file():
        return Entry(label, "seeds", [read_run(p) for p in members], path)
    return None


#: a sweep cell of a seeds axis (``p2pfl sweep`` with ``seeds``): ``<cell>__s<seed>``
_SEED_CELL = re.compile(r"^(?P<cell>.+)__s(?P<seed>-?\d+)$")


def _read_sweep(path: Path) -> list[Entry]:
    """A sweep's cells; the cells of one setting under several seeds (``<cell>__s<seed>``)
    are one seed group, so that they are drawn as one curve with a band."""
    cells = path / "cells"
    if not cells.is_dir():
        return []
    groups: dict[str, list[Entry]] = {}
    for folder in sorted(cells.iterdir()):
        entry = _read_one(folder, f"{path.name}/{folder.name}") if folder.is_dir() else None
        if entry is None:
            continue
        match = _SEED_CELL.match(folder.name) if entry.kind == "run" else None
        groups.setdefault(match["cell"] if match else f"\0{folder.name}", []).append(entry)
    found = []
    for key, members in groups.items():
        if key.startswith("\0"):
            found.extend(members)
            continue
        runs = [run for member in members for run in member.runs]
        found.append(Entry(f"{path.name}/{key}", "seeds", runs, cells / key))
    return found


def read_entries(paths: Sequence[Path]) -> list[Entry]:
    """Each path as entries: a run, a seed group, or every cell of a sweep folder."""
    entries: list[Entry] = []
    for path in paths:
        if not path.is_dir():
            raise RunDataError(f"{path}: no such folder")
        entry = _read_one(path, path.name)
        if entry is not None:
            entries.append(entry)
            continue
        found = _read_sweep(path)
        if not found:
            raise RunDataError(
                f"{path}: not a run folder (metrics.csv), a seed group (seed-*/) or a sweep folder (cells/)"
            )
        entries.extend(found)
    labels = [e.label for e in entries]
    for entry in entries:  # two folders of one name in different places: say which
        if labels.count(entry.label) > 1:
            entry.label = str(entry.path)
    return entries


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    low: float
    high: float


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample std and a Student-t 95% interval of the mean (NaN values left out)."""
    kept = [float(v) for v in values if not math.isnan(float(v))]
    n = len(kept)
    nan = math.nan
    if n == 0:
        return Spread(0, nan, nan, nan, nan, nan, nan)
    mean = sum(kept) / n
    if n < 2:
        return Spread(1, mean, nan, nan, nan, mean, mean)
    from scipy.stats import t  # lazily: only tables across seeds need it

    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return Spread(n, mean, std, mean - half, mean + half, min(kept), max(kept))


def common_rounds(runs: Sequence[RunData]) -> list[int]:
    """The evaluation rounds every run measured (their curves are averaged there)."""
    if not runs:
        return []
    shared = set.intersection(*({int(r["round"]) for r in run.rows} for run in runs))
    return sorted(shared)


def reach(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first row whose mean accuracy is at least ``target`` (rows are measured at
    evaluation points only: what it reports is an upper bound to the exact crossing)."""
    for row in rows:
        value = row.get("acc_mean", math.nan)
        if isinstance(value, (int, float)) and value >= target:
            return row
    return None


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant places, NaN and None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) >= 1e4:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(row.get(c, "")) or "–" for c in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body]) + "\n"


def write_table_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: fmt(row.get(c), 8) for c in columns})
