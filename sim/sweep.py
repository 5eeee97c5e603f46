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
value replaces the whole table). ``seeds = [1, 2, 3]`` (or ``p2pfl sweep --seeds``) makes
the scenario's ``seed`` an axis too: every cell once per seed, ``__s<seed>`` in its name.

Cells run one after the other in this process (sharing the dataset), in ``jobs`` local
processes, or as Ray tasks (``ray``: see :func:`sim.cells.run_cells`); results.csv is the
same bytes whichever way. A cell that raises is written as ``status = failed`` (its
traceback in ``errors/<cell>.txt``) and the others go on.

The sweep folder gets ``cells/<cell>/`` (each cell's run folder, placed whole when the cell
finishes), ``results.csv`` (one row per cell: final honest accuracy, attack success
rate...), ``status.csv`` (how each cell was obtained, its wall time), ``seeds.csv`` (with
a seeds axis: mean and sample std over seeds), ``sweep.toml`` (the resolved sweep) and
one heatmap PNG per metric (and per fraction when there are several).
``cell_plots = false`` leaves the plots out of the cells' folders. With ``resume``, cells
whose run folder is complete and of the same configuration are read back instead of run
again.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import tomli_w
from pydantic import Field, ValidationError, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from p2pfl.config import (
    MAX_SEED,
    ConfigError,
    Strict,
    apply_overrides,
    describe_validation_error,
    read_toml,
)
from sim.cells import Outcome, check_ray, run_cells
from sim.rundir import RunFolderError, ensure_folder
from sim.scenario import Scenario, ScenarioError, scenario_from_dict
from sim.seeds import parse_seeds
from sim.sweep_cell import CellTask, clear_staging, place_files, read_back, run_cell, signature
from sim.sweep_results import (
    SWEEP_METRICS,
    plot_heatmaps,
    results_table,
    write_results,
    write_seed_stats,
    write_status,
)

__all__ = [
    "SWEEP_METRICS",
    "Cell",
    "SweepConfig",
    "load_sweep",
    "plan_cells",
    "plot_heatmaps",
    "results_table",
    "run_sweep",
]


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
    #: the scenario's ``seed`` as an axis: every cell once per seed (None: the base's seed)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(None, min_length=1)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        for f in value:
            if not 0 <= f < 1:
                raise ValueError(f"every fraction must be in [0, 1), got {f}")
        if len({f"{f:g}" for f in value}) != len(value):  # one cell folder per fraction
            raise ValueError(f"fractions must be distinct, got {value}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value


@dataclass(frozen=True)
class Cell:
    attack: str
    defence: str
    fraction: float | None  # None: the attack has no Byzantine fraction ("none")
    ident: str
    scenario: Scenario

    @property
    def seed(self) -> int:
        return self.scenario.seed


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
    raw = read_toml(path, "sweep", ScenarioError)
    if "base" not in raw and ("protocol" in raw or "topology" in raw or "rounds" in raw):
        raise ScenarioError(f"{path}: a scenario file, not a sweep (no base); run it with: p2pfl sim {path}")
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as error:
        raise ScenarioError(f"{path}: {describe_validation_error(error)}") from None
    base_path = (path.parent / sweep.base).resolve()
    if not base_path.exists():
        raise ScenarioError(f"{path}: base: no such scenario file {base_path}")
    base = read_toml(base_path, "scenario", ScenarioError)
    for key, value in sweep.set.items():
        _assign(base, key, value, f"{path}: set")
    try:
        return sweep, apply_overrides(base, overrides or [])
    except ConfigError as error:  # "--set rounds" (no '='), "--set rounds.x=1"
        raise ScenarioError(str(error)) from None


def plan_cells(sweep: SweepConfig, base: dict[str, Any]) -> list[Cell]:
    """Every cell of the sweep, validated; raises ScenarioError naming the bad cell.

    Order: attacks, then defences, then fractions, then seeds (innermost), so the seeds
    of one cell sit together in results.csv.
    """
    cells: list[Cell] = []
    seeds: list[int | None] = list(sweep.seeds) if sweep.seeds else [None]
    for entry in sweep.attacks:
        table = dict(entry)
        label = str(table.pop("label", table.get("name", "none")))
        untargeted = table.get("name", "none") == "none"
        fractions: list[float | None] = [None] if untargeted else list(sweep.fractions)
        for defence in sweep.defences:
            for fraction in fractions:
                for seed in seeds:
                    cells.append(_plan_cell(sweep, base, label, table, defence, fraction, seed))
    _require_distinct_folders(cells)
    return cells


def _require_distinct_folders(cells: list[Cell]) -> None:
    """Two cells must not share a run folder: labels "a b" and "a-b" both give ``a-b``,
    and the second cell's folder silently replaced the first's (which --resume then ran
    again every time). Identical cells (the same label twice) are refused alike."""
    seen: dict[str, Cell] = {}
    for cell in cells:
        other = seen.setdefault(cell.ident, cell)
        if other is not cell:
            raise ScenarioError(
                f"cells {other.attack!r} x {other.defence!r} and {cell.attack!r} x {cell.defence!r} "
                f"would share the folder cells/{cell.ident}; give the attacks and the defences "
                "labels that differ in letters or digits"
            )


def _plan_cell(
    sweep: SweepConfig,
    base: dict[str, Any],
    label: str,
    table: dict[str, Any],
    defence: SweepDefence,
    fraction: float | None,
    seed: int | None,
) -> Cell:
    raw = copy.deepcopy(base)
    where = f"defence {defence.label!r}"
    for key, value in defence.set.items():
        _assign(raw, key, value, where)
    attack = copy.deepcopy(table)
    if fraction is not None and "count" not in attack and "identities" not in attack:
        attack["fraction"] = fraction
    raw["attack"] = attack
    if seed is not None:
        raw["seed"] = seed
    name = f"{label} x {defence.label}" + ("" if fraction is None else f" @ {fraction:g}")
    name += "" if seed is None else f" seed {seed}"
    try:
        scenario = scenario_from_dict(raw)
    except ScenarioError as error:
        raise ScenarioError(f"cell {name}: {error}") from None
    scenario = scenario.model_copy(update={"name": f"{sweep.name}: {name}"})
    ident = f"{_slug(label)}__{_slug(defence.label)}"
    ident += "" if fraction is None else f"__f{fraction:g}"
    ident += "" if seed is None else f"__s{seed}"
    return Cell(label, defence.label, fraction, ident, scenario)


def _require_data(cells: list[Cell]) -> None:
    """Fail at once, not in every cell, when a dataset's files are not there at all."""
    from p2pfl.learning import DatasetUnavailable, default_data_dir
    from p2pfl.learning.datasets import IDX_DATASETS, find_idx_file

    for name, data_dir in dict.fromkeys(
        (c.scenario.data.dataset, c.scenario.data.data_dir) for c in cells
    ):
        folder = Path(data_dir or default_data_dir()).expanduser() / name
        for file in IDX_DATASETS.get(name, ()):
            if find_idx_file(folder, file) is None:
                raise DatasetUnavailable(
                    f"dataset {name!r} is not in {folder} (missing {file.gz_name}); "
                    f"run `p2pfl data fetch {name}` to download it"
                )


def _result_row(cell: Cell, metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "attack": cell.attack,
        "defence": cell.defence,
        "fraction": "" if cell.fraction is None else cell.fraction,
        "seed": cell.seed,
        **(metrics or {}),
        "status": "ok" if metrics is not None else "failed",
        "cell": cell.ident,
    }


def run_sweep(
    sweep: SweepConfig,
    base: dict[str, Any],
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    jobs: int = 1,
    ray: str | None = None,
    show_progress: bool = True,
    console: Console | None = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run every cell; write results.csv, status.csv, heatmaps and the cells' run folders.

    ``jobs`` > 1 runs cells in that many local processes, ``ray`` (``"local"``, ``"auto"``
    or a cluster address) as Ray tasks. Returns the sweep folder and the result rows in
    planned order; a failed cell's row has ``status = "failed"``. Raises ScenarioError
    for a bad cell, DatasetUnavailable when a dataset is missing (checked up front unless
    on Ray, whose workers may be other machines), CellsError when Ray cannot run.
    """
    if resume and out_dir is None:
        raise ScenarioError("--resume needs --out: the folder of the sweep to resume")
    cells = plan_cells(sweep, base)
    if ray is None:
        _require_data(cells)
    else:
        check_ray(ray)  # before the sweep's folder is made: a failed connection leaves none
    if out_dir is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out_dir = Path(sweep.output_dir) / f"{_slug(sweep.name)}-{stamp}"
    out_dir = Path(out_dir)
    if not resume:
        written = [name for name in ("results.csv", "status.csv") if (out_dir / name).is_file()]
        if written:  # its cells would be run again and replaced, or mixed with other cells'
            raise RunFolderError(
                f"{out_dir}: already holds a sweep ({written[0]}); add --resume to reuse its "
                "finished cells, or choose another --out"
            )
    ensure_folder(out_dir)  # created; a file in the way or no permission is one line
    clear_staging(out_dir / "cells")
    (out_dir / "sweep.toml").write_text(
        tomli_w.dumps({**sweep.model_dump(mode="json", exclude_none=True), "resolved_base": base})
    )
    # Cells that come out identical (e.g. "none" at every fraction) run once, as the first.
    twins: dict[str, list[int]] = {}
    for index, cell in enumerate(cells):
        twins.setdefault(signature(cell.scenario), []).append(index)
    firsts = [indices[0] for indices in twins.values()]
    rows: list[dict[str, Any] | None] = [None] * len(cells)
    status: list[dict[str, Any] | None] = [None] * len(cells)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("cells"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
    )
    bar = progress.add_task(sweep.name, total=len(cells))

    def finish(
        first: int, metrics: dict[str, Any] | None, how: str, wall: Any = "", error: str = ""
    ) -> None:
        """Record a cell and its twins; rewrite the CSVs so a kill keeps what is done."""
        group = twins[signature(cells[first].scenario)]
        for index in group:
            rows[index] = _result_row(cells[index], metrics)
            status[index] = {
                "cell": cells[index].ident,
                "status": how if index == first else f"same as {cells[first].ident}",
                "wall_s": round(wall, 2) if isinstance(wall, float) else wall,
                "error": error,
            }
        write_results([r for r in rows if r is not None], out_dir / "results.csv")
        write_status([s for s in status if s is not None], out_dir / "status.csv")
        for index in group:
            if on_cell is not None:
                on_cell(rows[index])  # type: ignore[arg-type]
        progress.update(bar, advance=len(group), description=f"{cells[first].ident}: {how}")

    errors = out_dir / "errors"
    to_run: list[int] = []
    with progress:
        for first in firsts:
            folder = out_dir / "cells" / cells[first].ident
            metrics = read_back(folder, cells[first].scenario) if resume else None
            if metrics is not None:
                finish(first, metrics, "resumed")
            else:
                to_run.append(first)
        tasks = [
            CellTask(
                ident=cells[i].ident,
                scenario=cells[i].scenario,
                folder=str(out_dir / "cells" / cells[i].ident),
                plots=sweep.cell_plots,
                ship=ray is not None,  # a Ray worker may not see this file system
            )
            for i in to_run
        ]

        def done(outcome: Outcome[dict[str, Any]]) -> None:
            first = to_run[outcome.index]
            error_file = errors / f"{cells[first].ident}.txt"
            if outcome.value is not None:
                if outcome.value.get("files") is not None:
                    place_files(out_dir / "cells" / cells[first].ident, outcome.value["files"])
                error_file.unlink(missing_ok=True)
                finish(first, outcome.value["metrics"], "ran", outcome.wall_s)
            else:
                errors.mkdir(exist_ok=True)
                error_file.write_text(f"{outcome.error}\n\n{outcome.detail}")
                finish(first, None, "failed", outcome.wall_s, outcome.error or "")

        try:
            run_cells(run_cell, tasks, jobs=jobs, ray=ray, on_done=done)
        except KeyboardInterrupt:  # results.csv has the finished cells: draw them beside it
            finished = [r for r in rows if r is not None]
            if finished:
                plot_heatmaps(finished, out_dir, title=f"{sweep.name} (interrupted: {len(finished)} of {len(cells)} cells)")
            raise
    clear_staging(out_dir / "cells")  # empty by now
    results = [r for r in rows if r is not None]
    if sweep.seeds:
        write_seed_stats(results, out_dir / "seeds.csv")
    plot_heatmaps(results, out_dir, title=sweep.name)
    return out_dir, results


def parse_seed_list(text: str) -> list[int]:
    """``--seeds`` of a sweep: :func:`sim.seeds.parse_seeds`, its error a ScenarioError."""
    try:
        return parse_seeds(text)
    except ValueError as error:
        raise ScenarioError(str(error)) from None
