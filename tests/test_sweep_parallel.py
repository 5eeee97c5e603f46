"""Sweeps run in parallel (--jobs, Ray) write the serial sweep's results.csv byte for byte;
a failing cell is reported while the others finish; a killed sweep resumes, whichever way
it was started, running only the cells it lacks; seeds are an axis with mean and spread."""

from __future__ import annotations

import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from sim.cells import run_cells
from tests.sweep_kit import tiny_base

BASE = tiny_base()

# 2 attacks x 3 defences x 2 seeds = 12 cells; the "broken" defence validates but cannot
# build (its topology file does not exist): 4 failing cells among 8 good ones.
SWEEP = """
name = "grid"
base = "base.toml"
fractions = [0.34]
cell_plots = false
seeds = [4, 5]

[[attacks]]
label = "none"
name = "none"

[[attacks]]
label = "label flip"
name = "label_flip"

[[defences]]
label = "mean"

[[defences]]
label = "median"
set = { "protocol.aggregator" = "median" }

[[defences]]
label = "broken"
set = { "topology.kind" = "file", "topology.params" = { path = "no-such-graph.edges" } }
"""
CELLS, FAILING = 12, 4


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "base.toml").write_text(BASE)
    (folder / "sweep.toml").write_text(SWEEP)
    return folder / "sweep.toml"


def _sweep(sweep_file: Path, out: Path, *flags: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["sweep", str(sweep_file), "--out", str(out), "--quiet", *flags]
    )
    return result.exit_code, result.output


def _status(out: Path) -> dict[str, str]:
    with (out / "status.csv").open() as handle:
        return {row["cell"]: row["status"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def serial_run(sweep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The reference: the sweep run one cell after the other in this process."""
    out = tmp_path_factory.mktemp("serial") / "out"
    code, output = _sweep(sweep_file, out)
    assert code == 1, output  # the failing cells make it exit 1, after writing everything
    return out, output


@pytest.fixture
def serial(serial_run: tuple[Path, str]) -> Path:
    return serial_run[0]


def _assert_failures_reported(out: Path, output: str) -> None:
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == CELLS
    failed = [r["cell"] for r in rows if r["status"] == "failed"]
    assert len(failed) == FAILING and all("__broken" in cell for cell in failed)
    for row in rows:
        if row["status"] == "ok":  # the good cells all finished, with their results
            assert row["rounds"] == "2" and 0.0 <= float(row["honest_acc_mean"]) <= 1.0
            assert (out / "cells" / row["cell"] / "metrics.csv").exists()
        else:
            assert row["honest_acc_mean"] == "" and row["rounds"] == ""
            error = (out / "errors" / f"{row['cell']}.txt").read_text()
            assert "ScenarioError" in error and "no-such-graph.edges" in error
    assert {c: s for c, s in _status(out).items() if s == "failed"} == dict.fromkeys(
        failed, "failed"
    )
    assert f"{FAILING} cell(s) failed" in output and failed[0] in output


def test_serial_sweep_reports_failed_cells_and_keeps_the_others(
    serial_run: tuple[Path, str],
) -> None:
    _assert_failures_reported(*serial_run)


def test_jobs_2_writes_the_serial_results_csv_byte_for_byte(
    sweep_file: Path, serial: Path, tmp_path: Path
) -> None:
    out = tmp_path / "jobs2"
    code, output = _sweep(sweep_file, out, "--jobs", "2")
    assert code == 1, output
    _assert_failures_reported(out, output)
    assert (out / "results.csv").read_bytes() == (serial / "results.csv").read_bytes()
    assert (out / "seeds.csv").read_bytes() == (serial / "seeds.csv").read_bytes()
    assert set(_status(out).values()) == {"ran", "failed"}


def test_ray_local_writes_the_serial_results_csv_byte_for_byte(
    sweep_file: Path, serial: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    out = tmp_path / "ray"
    code, output = _sweep(sweep_file, out, "--ray", "local", "--jobs", "2")
    assert code == 1, output
    _assert_failures_reported(out, output)  # the run folders came back from the workers
    assert (out / "results.csv").read_bytes() == (serial / "results.csv").read_bytes()


def test_a_killed_parallel_sweep_resumes_serially_running_only_the_missing_cells(
    sweep_file: Path, serial: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "p2pfl.cli", "sweep", str(sweep_file), "--out", str(out)]
    process = subprocess.Popen(
        [*command, "--quiet", "--jobs", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes its workers too
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("cells/*/cell.json")):  # the first finished cell
            assert process.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no cell finished within 120 s"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finished = {p.parent.name for p in out.glob("cells/*/cell.json")}
    assert finished and len(finished) < CELLS - FAILING
    (out / "cells" / "none__mean__s4").mkdir(parents=True, exist_ok=True)  # a stray, empty
    (out / "cells" / ".partial" / "none__median__s4-x").mkdir(parents=True)  # killed mid-write
    code, output = _sweep(sweep_file, out, "--resume")
    assert code == 1, output
    assert (out / "results.csv").read_bytes() == (serial / "results.csv").read_bytes()
    assert not (out / "cells" / ".partial").exists()
    status = _status(out)
    assert {c for c, s in status.items() if s == "resumed"} == finished
    assert {c for c, s in status.items() if s == "ran"} == {
        c for c, s in _status(serial).items() if s == "ran"
    } - finished


def test_resume_of_a_partial_folder_runs_only_the_missing_cells(
    sweep_file: Path, serial: Path, tmp_path: Path
) -> None:
    """A partial results.csv (a sweep stopped early) and one cell folder gone."""
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(serial, out)
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:3]))
    shutil.rmtree(out / "cells" / "label-flip__median__f0.34__s5")
    code, output = _sweep(sweep_file, out, "--resume", "--jobs", "2")
    assert code == 1, output
    assert (out / "results.csv").read_bytes() == (serial / "results.csv").read_bytes()
    status = _status(out)
    assert [c for c, s in status.items() if s == "ran"] == ["label-flip__median__f0.34__s5"]
    assert sum(s == "failed" for s in status.values()) == FAILING  # failed cells run again


def test_seeds_axis_gives_mean_and_sample_std_across_seeds(
    sweep_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "base.toml").write_text(BASE)
    path = tmp_path / "seeds.toml"
    path.write_text(
        SWEEP.split("[[defences]]")[0].replace("seeds = [4, 5]", "")
        + ('[[defences]]\nlabel = "mean"\n')
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["sweep", str(path), "--out", str(out), "--quiet", "--seeds", "1-3"],
        env={"COLUMNS": "160"},  # the table unwrapped
    )
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["attack"], r["seed"]) for r in rows] == [
        ("none", "1"), ("none", "2"), ("none", "3"),
        ("label flip", "1"), ("label flip", "2"), ("label flip", "3"),
    ]  # fmt: skip
    with (out / "seeds.csv").open() as handle:
        stats = {row["attack"]: row for row in csv.DictReader(handle)}
    for attack in ("none", "label flip"):
        values = [float(r["honest_acc_mean"]) for r in rows if r["attack"] == attack]
        assert len(set(values)) > 1  # the seeds really differ
        entry = stats[attack]
        assert entry["seeds"] == "3" and entry["failed"] == "0"
        assert float(entry["honest_acc_mean_mean"]) == pytest.approx(
            statistics.fmean(values), abs=1e-4
        )
        assert float(entry["honest_acc_mean_std"]) == pytest.approx(
            statistics.stdev(values), abs=1e-4
        )
        assert float(entry["honest_acc_mean_ci95"]) > float(entry["honest_acc_mean_std"])
    text = " ".join(result.output.split())  # the table's title may wrap
    assert "mean ± sample std over 3 seeds" in text
    shown = re.search(r"│ none +│ +- +│ +(\d\.\d{3})±(\d\.\d{3}) +│", result.output)
    assert shown is not None, result.output
    none = stats["none"]
    assert float(shown[1]) == pytest.approx(float(none["honest_acc_mean_mean"]), abs=1e-3)
    assert float(shown[2]) == pytest.approx(float(none["honest_acc_mean_std"]), abs=1e-3)


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise ValueError("three is not allowed")
    if x == 5:
        os._exit(7)  # a worker that dies (as under the OOM killer)
    return x * x


def test_run_cells_keeps_task_order_and_isolates_raising_and_dying_tasks() -> None:
    seen: list[int] = []
    outcomes = run_cells(
        _square_or_fail, list(range(8)), jobs=2, on_done=lambda o: seen.append(o.index)
    )
    assert [o.index for o in outcomes] == list(range(8)) and sorted(seen) == list(range(8))
    assert [o.value for o in outcomes if o.ok] == [0, 1, 4, 16, 36, 49]
    assert outcomes[3].error == "ValueError: three is not allowed"
    assert "Traceback" in outcomes[3].detail
    assert outcomes[5].error is not None and outcomes[5].error.startswith("worker process died")
    serial = run_cells(_square_or_fail, [1, 2, 3], jobs=1)
    assert [o.value for o in serial] == [1, 4, None] and not serial[2].ok
    assert run_cells(_square_or_fail, [], jobs=2) == []  # nothing left to run: no pool


def test_bad_seeds_and_a_missing_ray_are_one_line_errors(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, output = _sweep(sweep_file, tmp_path / "a", "--seeds", "1-x")
    assert code == 2 and "--seeds: '1-x' is not a seed" in output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    code, output = _sweep(sweep_file, tmp_path / "b", "--ray", "auto")
    assert code == 2 and "pip install ray==2.60.0" in " ".join(output.split())
    assert "Traceback" not in output
