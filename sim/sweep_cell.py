"""One sweep cell, wherever it runs: simulate, write its run folder whole or not at all.

A cell's run folder (``cells/<ident>/``) appears in one rename once everything in it is
written, ending with ``cell.json`` (the cell's scenario signature and its result metrics),
so a sweep killed at any moment leaves complete cells or none: ``--resume`` reads those
back, whichever way (serial, ``--jobs``, Ray) the sweep was started. On Ray the worker may
be another machine, so a task can ``ship`` its files back instead, and the driver places
them the same way.

The metrics of a cell come from its last measured row: read back, they are the same
values (JSON keeps floats exactly), so a resumed sweep writes the same results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from p2pfl import jsonsafe
from p2pfl.learning import load_dataset
from sim.metrics import write_csv
from sim.runner import build_simulation, run_simulation, summarize, write_run
from sim.scenario import Scenario

__all__ = [
    "CellTask",
    "cell_metrics",
    "clear_staging",
    "place_files",
    "read_back",
    "run_cell",
    "signature",
]

MARKER = "cell.json"


@dataclass(frozen=True)
class CellTask:
    """What a worker needs for one cell (picklable)."""

    ident: str
    scenario: Scenario
    folder: str  # the cell's run folder, cells/<ident>
    plots: bool  # the run folder's PNG plots (about 2 s a cell)
    ship: bool  # return the files instead of placing them (Ray: maybe another machine)


def signature(scenario: Scenario) -> str:
    """What makes two cells the same run: the scenario without its name."""
    # how often a run checkpoints changes nothing it measures (and cells signed before it
    # existed keep their signature)
    return scenario.model_copy(update={"name": ""}).model_dump_json(exclude={"sim": {"checkpoint_every"}})


def _digest(scenario: Scenario) -> str:
    return hashlib.sha256(signature(scenario).encode()).hexdigest()


def cell_metrics(last: dict[str, Any]) -> dict[str, Any]:
    """The results.csv metrics of a cell from its last metrics row."""
    nan = float("nan")
    return {
        "honest_acc_mean": last.get("acc_mean", nan),
        "honest_acc_min": last.get("acc_min", nan),
        "attack_success_rate": last.get("attack_success_rate", nan),
        "attack_success_max": last.get("attack_success_max", nan),
        "malicious_peers": last.get("malicious_peers", 0),
        # the real share of malicious peers (a Sybil cell: identities / all peers)
        "malicious_share": last.get("malicious_share", nan) if "malicious_peers" in last else 0.0,
        "honest_peers": last.get("peers_evaluated", 0),
        "rounds": last.get("round", 0),
    }


def run_cell(task: CellTask) -> dict[str, Any]:
    """Simulate one cell; returns ``{"metrics", "wall_s", "files"}`` (files only if shipped)."""
    scenario = task.scenario
    data = scenario.data
    dataset = load_dataset(data.dataset, data_dir=data.data_dir, seed=scenario.seed)  # cached
    simulation = build_simulation(scenario, dataset=dataset)
    rows = run_simulation(simulation, show_progress=False)
    metrics = cell_metrics(rows[-1] if rows else {})
    wall = float(simulation.wall_time)
    folder = Path(task.folder)
    if task.ship:
        with tempfile.TemporaryDirectory(prefix="p2pfl-cell-") as tmp:
            _write_folder(simulation, Path(tmp), task, metrics, wall)
            files = {
                str(p.relative_to(tmp)): p.read_bytes()
                for p in sorted(Path(tmp).rglob("*"))
                if p.is_file()
            }
        return {"metrics": metrics, "wall_s": wall, "files": files}
    staging = _staging(folder)
    try:
        _write_folder(simulation, staging, task, metrics, wall)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"metrics": metrics, "wall_s": wall, "files": None}


def _write_folder(
    simulation: Any, out: Path, task: CellTask, metrics: dict[str, Any], wall: float
) -> None:
    if task.plots:
        write_run(simulation, out)
    else:  # the run folder without its plots
        out.mkdir(parents=True, exist_ok=True)
        config = task.scenario.model_dump(mode="json", exclude_none=True)
        (out / "config.toml").write_text(tomli_w.dumps(config))
        write_csv(simulation.rows, out / "metrics.csv")
        summary = jsonsafe.dumps(summarize(simulation), indent=2, default=float)
        (out / "summary.json").write_text(summary + "\n")
    marker = {"ident": task.ident, "signature": _digest(task.scenario), "wall_s": wall}
    # valid JSON, and a resumed cell's row stays byte for byte: a non-finite metric is
    # kept as its name ("nan", "inf") and read back as that float
    marker["metrics"] = {k: _named(v) for k, v in metrics.items()}
    (out / MARKER).write_text(json.dumps(marker, indent=2, allow_nan=False) + "\n")


def _named(value: Any) -> Any:
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


def _unnamed(value: Any) -> Any:
    return float(value) if value in ("nan", "inf", "-inf") else value


#: where cell folders are written before their rename, beside them (one file system);
#: not itself a run folder, so readers of ``cells/`` (``p2pfl compare``) pass it by
STAGING = ".partial"


def _staging(folder: Path) -> Path:
    parent = folder.parent / STAGING
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=parent))


def clear_staging(cells: Path) -> None:
    """Drop what a killed sweep left half-written (a new sweep starts with none)."""
    shutil.rmtree(cells / STAGING, ignore_errors=True)


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` (an unfinished or stale one) by the finished ``staging``."""
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)


def place_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write a shipped run folder into place, whole (as a worker does locally)."""
    staging = _staging(folder)
    try:
        for name, blob in files.items():
            path = staging / name
            if staging.resolve() not in path.resolve().parents:
                raise ValueError(f"cell file outside its folder: {name!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_back(folder: Path, scenario: Scenario) -> dict[str, Any] | None:
    """The metrics of a finished run folder of this very scenario, else None.

    Folders written before ``cell.json`` existed are accepted when their summary says
    every round ran.
    """
    marker = folder / MARKER
    if marker.exists():
        data = json.loads(marker.read_text())
        if data.get("signature") != _digest(scenario):
            return None  # another configuration ran here: run this one again
        return {k: _unnamed(v) for k, v in data["metrics"].items()}
    summary = folder / "summary.json"
    if not summary.exists():
        return None
    data = json.loads(summary.read_text())
    if data.get("rounds_completed") != scenario.rounds:
        return None
    return cell_metrics(data["final"])
