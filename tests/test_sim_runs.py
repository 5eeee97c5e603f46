"""Runs are never lost: rows on disk as measured, Ctrl-C keeps the folder, folders never
collide, the config records every override; ``p2pfl sim --seeds`` writes a group."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from sim.metrics import RowRecorder
from sim.rundir import Provenance, claim_run_dir, overrides_label
from sim.runner import build_simulation, default_run_dir, record_run
from sim.scenario import load_scenario, scenario_from_dict

SMALL = """
name = "tiny"
seed = 1
rounds = {rounds}
[data]
dataset = "digits"
batch_size = 16
[model]
name = "logreg"
lr = 0.5
[topology]
kind = "ring"
n = 4
[protocol]
name = "dpsgd"
local_steps = 2
[sim]
eval_every = {every}
threads = 1
output_dir = "{output_dir}"
"""


def scenario_file(tmp_path: Path, *, rounds: int = 4, every: int = 2) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(SMALL.format(rounds=rounds, every=every, output_dir=(tmp_path / "runs").as_posix()))
    return path


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pfl.cli", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigint_mid_run_leaves_the_folder_with_the_rows_so_far(tmp_path: Path) -> None:
    scenario = scenario_file(tmp_path, rounds=1_000_000, every=1)
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli("sim", str(scenario), "--out", str(out), "--quiet"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )
    try:
        metrics = out / "metrics.csv"
        deadline = time.monotonic() + 60
        seen: list[dict[str, str]] = []
        while time.monotonic() < deadline and process.poll() is None:
            seen = csv_rows(metrics) if metrics.exists() else []
            if len(seen) >= 3:  # rows reach the file while the run goes on
                break
            time.sleep(0.02)
        assert len(seen) >= 3, "no rows appeared in metrics.csv within 60 s"
        assert json.loads((out / "summary.json").read_text())["status"] == "running"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    rows = csv_rows(out / "metrics.csv")
    assert rows[: len(seen)] == seen  # nothing measured before the signal was lost
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["final"]["round"] == int(rows[-1]["round"])
    assert summary["rounds_completed"] < 1_000_000
    assert load_scenario(out / "config.toml").rounds == 1_000_000  # the config is there, runnable
    assert (out / "accuracy_vs_rounds.png").stat().st_size > 0


def test_interrupt_in_process_marks_the_folder_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    simulation = build_simulation(load_scenario(scenario_file(tmp_path, rounds=8, every=1)))
    measure = simulation.evaluator.measure
    calls = []

    def interrupted_third_time(engine, round_):  # Ctrl-C arriving while the third row is measured
        calls.append(round_)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return measure(engine, round_)

    monkeypatch.setattr(simulation.evaluator, "measure", interrupted_third_time)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        record_run(simulation, run_dir, provenance=Provenance("x.toml", ("rounds=8",)))
    assert [r["round"] for r in csv_rows(run_dir / "metrics.csv")] == ["0", "1"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["overrides"] == ["rounds=8"] and summary["wall_time_s"] > 0


def test_rows_are_on_disk_as_they_are_measured(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    recorder = RowRecorder(path)
    recorder({"round": 0, "acc_mean": 0.1})
    assert [r["acc_mean"] for r in csv_rows(path)] == ["0.1"]
    recorder({"round": 5, "acc_mean": 0.5})
    assert [r["round"] for r in csv_rows(path)] == ["0", "5"]
    recorder({"round": 10, "acc_mean": 0.7, "components": 2})  # a new column: header widened
    rows = csv_rows(path)
    assert [r["components"] for r in rows] == ["", "", "2"]
    assert rows[0]["acc_mean"] == "0.1"


def test_runs_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    frozen = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    folders: list[Path] = []
    lock = threading.Lock()
    start = threading.Barrier(8, timeout=10)

    def claim() -> None:
        start.wait()
        folder = claim_run_dir(tmp_path, "same", tag="s1", overrides=["rounds=5"], clock=lambda: frozen)
        with lock:
            folders.append(folder)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(folders) == 8 and len(set(folders)) == 8
    assert all(f.is_dir() and f.name.startswith("same-s1-rounds=5-20260101-120000") for f in folders)


def test_two_runs_started_together_get_two_folders(tmp_path: Path) -> None:
    """Two runs of one scenario at once, each taking its default folder (in threads: a
    subprocess each would spend its time importing torch; plots off: pyplot is not
    thread-safe)."""
    scenario = load_scenario(scenario_file(tmp_path))
    simulations = [build_simulation(scenario) for _ in range(2)]
    start = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def run(simulation) -> None:
        try:
            start.wait()
            record_run(simulation, default_run_dir(scenario), plots=False)
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(s,)) for s in simulations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
        assert [r["round"] for r in csv_rows(folder / "metrics.csv")] == ["0", "2", "4"]


def test_folder_name_and_config_record_every_override(tmp_path: Path) -> None:
    scenario = scenario_file(tmp_path)
    overrides = ["rounds=2", "protocol.local_steps=3", "sim.eval_every=1"]
    args = ["sim", str(scenario), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [folder] = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("tiny-s1-rounds=2+local_steps=3+eval_every=1-")
    config_text = (folder / "config.toml").read_text()
    for item in overrides:
        assert f"# --set {item}\n" in config_text
    assert f"# scenario file: {scenario}" in config_text
    resolved = load_scenario(folder / "config.toml")  # every override applied, defaults filled
    assert (resolved.rounds, resolved.protocol.local_steps, resolved.sim.eval_every) == (2, 3, 1)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["overrides"] == overrides and summary["scenario_file"] == str(scenario)


def test_long_overrides_are_cut_but_never_shared() -> None:
    one = overrides_label([f"topology.params.key{i}={i}" for i in range(20)])
    two = overrides_label([f"topology.params.key{i}={i}" for i in range(21)])
    assert len(one) <= 48 and len(two) <= 48 and one != two
    assert overrides_label(["seed=3", "sim.output_dir=x"]) == ""
    assert overrides_label(["name=a b/c"]) == "name=a-b-c"


def test_out_that_holds_a_run_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.csv").write_text("round\n0\n")
    result = CliRunner().invoke(app, ["sim", str(scenario_file(tmp_path)), "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "already holds a run" in result.output and "Traceback" not in result.output
    assert (out / "metrics.csv").read_text() == "round\n0\n"


def test_three_seeds_give_a_table_with_mean_and_spread(tmp_path: Path) -> None:
    scenario = scenario_file(tmp_path)
    result = CliRunner().invoke(app, ["sim", str(scenario), "--seeds", "1,2,3", "--quiet"])
    assert result.exit_code == 0, result.output
    [group] = (tmp_path / "runs").iterdir()
    assert group.name.startswith("tiny-seeds1-2-3-")
    finals = []
    for seed in (1, 2, 3):
        run_dir = group / f"seed-{seed}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["seed"] == seed and summary["status"] == "completed"
        assert load_scenario(run_dir / "config.toml").seed == seed
        finals.append(float(csv_rows(run_dir / "metrics.csv")[-1]["acc_mean"]))
    assert len(set(finals)) > 1  # the seeds really differ
    table = {row["metric"]: row for row in csv_rows(group / "seeds.csv")}
    final = table["final_acc_mean"]
    assert final["n"] == "3"
    assert float(final["mean"]) == pytest.approx(statistics.mean(finals), rel=1e-6)
    assert float(final["std"]) == pytest.approx(statistics.stdev(finals), rel=1e-6)
    half = 4.302652729911275 * statistics.stdev(finals) / 3**0.5  # t(0.975, 2 dof)
    assert float(final["ci95_low"]) == pytest.approx(statistics.mean(finals) - half, rel=1e-5)
    markdown = (group / "seeds.md").read_text()
    assert "| final_acc_mean | 3 |" in markdown and "sample standard deviation" in markdown
    assert (group / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((group / "group.json").read_text())["status"] == "completed"
    assert "final_acc_mean" in result.output
    report = CliRunner().invoke(app, ["report", str(group)])
    assert report.exit_code == 0 and "| final_acc_mean | 3 |" in report.output


def test_bad_seeds_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sim", str(scenario_file(tmp_path)), "--seeds", "1,x"])
    assert result.exit_code == 2
    assert "--seeds: 'x' is not a seed" in result.output and "Traceback" not in result.output


def test_scenario_dict_config_round_trip_keeps_defaults(tmp_path: Path) -> None:
    """The resolved config of a run from a dict (no file) also runs again as is."""
    simulation = build_simulation(scenario_from_dict({"rounds": 2, "topology": {"kind": "ring", "n": 4},
                                                      "model": {"name": "logreg"}, "sim": {"eval_every": 1}}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record_run(simulation, run_dir)
    assert "# no overrides" in (run_dir / "config.toml").read_text()
    assert load_scenario(run_dir / "config.toml") == simulation.scenario
