"""Attack-resilience sweeps: every attack x defence x fraction cell of one base scenario.

A sweep file (TOML) names a base scenario and the axes:

```toml
name = "resilience"
base = "base.toml"                    # relative to the sweep file
fractions = [0.2]                     # Byzantine fraction of each attack cell
set = { rounds = 30 }                 # optional: overrides for every cell (dotted keys)

[[attacks]]                           # an [attack] table (sim.adversary), plus a label
label = "none"
name = "none"

[[attacks]]
label = "ALIE"
name = "alie"

[[defences]]                          # a label and dotted-key overrides of the base scenario
label = "median"
set = { "protocol.aggregator" = "median" }

[[defences]]
label = "SybilWall"
set = { "protocol.name" = "sybilwall" }
```

Each cell is the base scenario with the defence's overrides, then the attack table with
``fraction`` filled in (left out for ``name = "none"``, and cells that come out identical
run once). A ``set`` key is a dotted path whose value *replaces* what is there (a table
value replaces the whole table). Cells run one after the other, sharing the dataset.

The sweep folder gets ``cells/<cell>/`` (each cell's run folder), ``results.csv`` (one row
per cell: final honest accuracy, attack success rate...), ``sweep.toml`` (the resolved
sweep) and one heatmap PNG per metric (and per fraction when there are several).
``cell_plots = false`` leaves the plots out of the cells' folders. With ``resume``, cells
whose run folder is complete are read back instead of run again.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import Field, ValidationError, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl.config import Strict, apply_overrides
from sim.scenario import Scenario, ScenarioError, scenario_from_dict

__all__ = ["SWEEP_METRICS", "Cell", "SweepConfig", "load_sweep", "plan_cells", "run_sweep"]

#: columns of results.csv, in order
RESULT_COLUMNS = [
    "attack",
    "defence",
    "fraction",
    "honest_acc_mean",
    "honest_acc_min",
    "attack_success_rate",
    "attack_success_max",
    "malicious_peers",
    "honest_peers",
    "rounds",
    "wall_s",
    "cell",
]
#: metrics drawn as heatmaps: column -> (title, higher is better)
SWEEP_METRICS = {
    "honest_acc_mean": ("final accuracy of honest peers (mean)", True),
    "attack_success_rate": ("attack success rate (honest peers, mean)", False),
}


class SweepDefence(Strict):
    label: str
    #: dotted key -> value, replacing that part of the base scenario
    set: dict[str, Any] = Field(default_factory=dict)


class SweepConfig(Strict):
    name: str = "sweep"
    base: str
    fractions: list[float] = Field(default_factory=lambda: [0.2], min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)
    #: ``[attack]`` tables with a ``label``; validated per cell
    attacks: list[dict[str, Any]] = Field(min_length=1)
    defences: list[SweepDefence] = Field(min_length=1)
    output_dir: str = "runs"
    #: each cell's run folder gets its PNG plots too (about 2 s a cell)
    cell_plots: bool = True

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        for f in value:
            if not 0 <= f < 1:
                raise ValueError(f"every fraction must be in [0, 1), got {f}")
        return value


@dataclass(frozen=True)
class Cell:
    attack: str
    defence: str
    fraction: float | None  # None: the attack has no Byzantine fraction ("none")
    ident: str
    scenario: Scenario


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _assign(raw: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    path = [part for part in dotted.split(".") if part]
    if not path:
        raise ScenarioError(f"{where}: empty key")
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ScenarioError(f"{where}: {dotted!r}: {part!r} is not a table")
        node = child
    node[path[-1]] = copy.deepcopy(value)


def load_sweep(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[SweepConfig, dict[str, Any]]:
    """The sweep file and its base scenario (as a raw dict, ``overrides`` applied)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such sweep file") from None
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path}: not valid TOML: {error}") from None
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ScenarioError(f"{path}: {loc}: {first['msg']}") from None
    base_path = (path.parent / sweep.base).resolve()
    try:
        base = tomllib.loads(base_path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: base: no such scenario file {base_path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{base_path}: not valid TOML: {error}") from None
    for key, value in sweep.set.items():
        _assign(base, key, value, f"{path}: set")
    return sweep, apply_overrides(base, overrides or [])


def plan_cells(sweep: SweepConfig, base: dict[str, Any]) -> list[Cell]:
    """Every cell of the sweep, validated; raises ScenarioError naming the bad cell."""
    cells: list[Cell] = []
    for entry in sweep.attacks:
        table = dict(entry)
        label = str(table.pop("label", table.get("name", "none")))
        untargeted = table.get("name", "none") == "none"
        fractions: list[float | None] = [None] if untargeted else list(sweep.fractions)
        for defence in sweep.defences:
            for fraction in fractions:
                raw = copy.deepcopy(base)
                where = f"defence {defence.label!r}"
                for key, value in defence.set.items():
                    _assign(raw, key, value, where)
                attack = copy.deepcopy(table)
                if fraction is not None and "count" not in attack and "identities" not in attack:
                    attack["fraction"] = fraction
                raw["attack"] = attack
                name = f"{label} x {defence.label}" + (
                    "" if fraction is None else f" @ {fraction:g}"
                )
                try:
                    scenario = scenario_from_dict(raw)
                except ScenarioError as error:
                    raise ScenarioError(f"cell {name}: {error}") from None
                scenario = scenario.model_copy(update={"name": f"{sweep.name}: {name}"})
                ident = f"{_slug(label)}__{_slug(defence.label)}" + (
                    "" if fraction is None else f"__f{fraction:g}"
                )
                cells.append(Cell(label, defence.label, fraction, ident, scenario))
    return cells


def _final_row(cell: Cell, rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    nan = float("nan")
    return {
        "attack": cell.attack,
        "defence": cell.defence,
        "fraction": "" if cell.fraction is None else cell.fraction,
        "honest_acc_mean": last.get("acc_mean", nan),
        "honest_acc_min": last.get("acc_min", nan),
        "attack_success_rate": last.get("attack_success_rate", nan),
        "attack_success_max": last.get("attack_success_max", nan),
        "malicious_peers": last.get("malicious_peers", 0),
        "honest_peers": last.get("peers_evaluated", 0),
        "rounds": last.get("round", 0),
        "wall_s": round(wall, 1),
        "cell": cell.ident,
    }


def _read_back(cell: Cell, folder: Path) -> dict[str, Any] | None:
    summary = folder / "summary.json"
    if not summary.exists():
        return None
    data = json.loads(summary.read_text())
    if data.get("rounds_completed") != cell.scenario.rounds:
        return None
    return _final_row(cell, [data["final"]], float(data.get("wall_time_s", 0.0)))


def run_sweep(
    sweep: SweepConfig,
    base: dict[str, Any],
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run every cell; write results.csv, heatmaps and the cells' run folders."""
    from p2pfl.learning import load_dataset
    from sim.metrics import write_csv
    from sim.runner import build_simulation, run_simulation, summarize, write_run

    cells = plan_cells(sweep, base)
    if out_dir is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out_dir = Path(sweep.output_dir) / f"{_slug(sweep.name)}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.toml").write_text(
        tomli_w.dumps({**sweep.model_dump(mode="json", exclude_none=True), "resolved_base": base})
    )
    datasets: dict[tuple[str, str | None, int], Any] = {}
    done: dict[str, dict[str, Any]] = {}  # scenario JSON -> its result row
    results: list[dict[str, Any]] = []

    def run_cell(cell: Cell) -> dict[str, Any]:
        folder = out_dir / "cells" / cell.ident
        if resume and (row := _read_back(cell, folder)) is not None:
            return row
        data = cell.scenario.data
        key = (data.dataset, data.data_dir, cell.scenario.seed)
        if key not in datasets:
            datasets[key] = load_dataset(
                data.dataset, data_dir=data.data_dir, seed=cell.scenario.seed
            )
        started = time.perf_counter()
        simulation = build_simulation(cell.scenario, dataset=datasets[key])
        rows = run_simulation(simulation, show_progress=False)
        if sweep.cell_plots:
            write_run(simulation, folder)
        else:  # the run folder without its plots
            folder.mkdir(parents=True, exist_ok=True)
            config = cell.scenario.model_dump(mode="json", exclude_none=True)
            (folder / "config.toml").write_text(tomli_w.dumps(config))
            write_csv(simulation.rows, folder / "metrics.csv")
            summary = json.dumps(summarize(simulation), indent=2, default=float)
            (folder / "summary.json").write_text(summary + "\n")
        return _final_row(cell, rows, time.perf_counter() - started)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("cells"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
    )
    with progress:
        task = progress.add_task(sweep.name, total=len(cells))
        for cell in cells:
            progress.update(task, description=f"{cell.attack} x {cell.defence}")
            signature = cell.scenario.model_copy(update={"name": ""}).model_dump_json()
            if signature in done:  # an identical cell ran already (e.g. "none" per fraction)
                row = {
                    **done[signature],
                    "attack": cell.attack,
                    "defence": cell.defence,
                    "cell": cell.ident,
                }
            else:
                row = run_cell(cell)
                done[signature] = row
            results.append(row)
            write_results(results, out_dir / "results.csv")
            if on_cell is not None:
                on_cell(row)
            progress.advance(task)
    plot_heatmaps(results, out_dir, title=sweep.name)
    return out_dir, results


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(k, row.get(k, "")) for k in RESULT_COLUMNS})


def _csv_value(key: str, value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:g}" if key in ("fraction", "wall_s") else f"{value:.4f}"
    return value


def _axes(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], list[Any]]:
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    fractions = list(dict.fromkeys(r["fraction"] for r in rows if r["fraction"] != ""))
    return attacks, defences, fractions or [""]


def _grid(
    rows: list[dict[str, Any]], metric: str, fraction: Any
) -> tuple[list[str], list[str], list[list[float]]]:
    attacks, defences, _ = _axes(rows)
    values = [[float("nan")] * len(defences) for _ in attacks]
    for row in rows:
        if row["fraction"] in ("", fraction):
            value = row.get(metric, float("nan"))
            values[attacks.index(row["attack"])][defences.index(row["defence"])] = (
                float(value) if value not in ("", None) else float("nan")
            )
    return attacks, defences, values


def plot_heatmaps(rows: list[dict[str, Any]], out_dir: Path, *, title: str) -> list[Path]:
    """One PNG per metric (and fraction): attacks down, defences across, values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths: list[Path] = []
    if not rows:
        return paths
    _, _, fractions = _axes(rows)
    for metric, (label, higher_better) in SWEEP_METRICS.items():
        for fraction in fractions:
            attacks, defences, values = _grid(rows, metric, fraction)
            data = np.array(values, dtype=float)
            fig, ax = plt.subplots(figsize=(1.3 * len(defences) + 2.5, 0.55 * len(attacks) + 1.8))
            cmap = plt.get_cmap("RdYlGn" if higher_better else "RdYlGn_r").with_extremes(
                bad="#dddddd"
            )
            image = ax.imshow(
                np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto"
            )
            ax.set_xticks(range(len(defences)), defences, rotation=30, ha="right")
            ax.set_yticks(range(len(attacks)), attacks)
            for i in range(len(attacks)):
                for j in range(len(defences)):
                    text = "-" if math.isnan(data[i, j]) else f"{data[i, j]:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8)
            suffix = "" if fraction == "" else f" (Byzantine fraction {fraction:g})"
            ax.set_title(f"{title}: {label}{suffix}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.04)
            fig.tight_layout()
            name = f"heatmap_{metric}" + ("" if len(fractions) == 1 else f"_f{fraction:g}") + ".png"
            fig.savefig(out_dir / name, dpi=120)
            plt.close(fig)
            paths.append(out_dir / name)
    return paths


def results_table(rows: list[dict[str, Any]], title: str) -> Table:
    """A rich table: attacks down, defences across, ``accuracy / success rate`` per cell."""
    attacks, defences, fractions = _axes(rows)
    table = Table(title=f"{title}: honest accuracy / attack success rate")
    table.add_column("attack")
    if fractions != [""]:
        table.add_column("fraction", justify="right")
    for defence in defences:
        table.add_column(defence, justify="right")
    for attack in attacks:
        for fraction in fractions:
            cells = {
                r["defence"]: r
                for r in rows
                if r["attack"] == attack and r["fraction"] in ("", fraction)
            }
            if not cells:
                continue
            untargeted = all(row["fraction"] == "" for row in cells.values())
            shown = "-" if untargeted else f"{fraction:g}"
            line = [attack] + ([shown] if fractions != [""] else [])
            for defence in defences:
                row = cells.get(defence)
                if row is None:
                    line.append("")
                    continue
                acc, asr = float(row["honest_acc_mean"]), row["attack_success_rate"]
                text = f"{acc:.3f}"
                if isinstance(asr, float) and not math.isnan(asr):
                    text += f" / {asr:.2f}"
                line.append(text)
            table.add_row(*line)
    return table
