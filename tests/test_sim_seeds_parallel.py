"""``p2pfl sim --seeds ... --jobs N``: the seeds of one scenario in a local process pool,
with the same tables as a serial run, and a seed that fails reported while the others complete."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app

TINY = """
name = "tiny"
seed = 1
rounds = 3
[data]
dataset = "digits"
batch_size = 16
[model]
name = "logreg"
lr = 0.5
[topology]
kind = "ring"
n = 3
[protocol]
name = "dpsgd"
local_steps = 1
[sim]
eval_every = 1
threads = 1
output_dir = "{output_dir}"
"""


SEED7_FAILS = """
from p2pfl.learning import load_dataset


def data(seed, data_dir):
    if seed == 7:
        raise RuntimeError("this test's dataset refuses seed 7")
    return load_dataset("digits", seed=seed)
"""


def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(output_dir=(tmp_path / "runs").as_posix()))
    return path


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def without_wall_clock(path: Path) -> list[dict[str, str]]:
    """A table's rows less wall-clock seconds, the one thing that differs run to run."""
    kept = [row for row in rows(path) if row.get("metric") != "wall_s"]
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in kept]


def run_sim(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["sim", *args, "--quiet"])
    return result.exit_code, result.output


def test_two_jobs_give_the_tables_of_a_serial_run(tmp_path: Path) -> None:
    scenario = str(scenario_file(tmp_path))
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    code, output = run_sim(scenario, "--seeds", "1-3", "--out", str(serial))
    assert code == 0, output
    code, output = run_sim(scenario, "--seeds", "1-3", "--jobs", "2", "--out", str(parallel))
    assert code == 0, output
    assert (parallel / "curve.csv").read_bytes() == (serial / "curve.csv").read_bytes()
    for table in ("seeds.csv", "per_seed.csv"):
        assert without_wall_clock(parallel / table) == without_wall_clock(serial / table)
    for seed in (1, 2, 3):
        ours = [{k: v for k, v in r.items() if k != "wall_time"} for r in rows(parallel / f"seed-{seed}" / "metrics.csv")]
        theirs = [{k: v for k, v in r.items() if k != "wall_time"} for r in rows(serial / f"seed-{seed}" / "metrics.csv")]
        assert ours == theirs and len(ours) == 4  # rounds 0..3
    assert len({r["final_acc_mean"] for r in rows(parallel / "per_seed.csv")}) == 3  # the seeds differ
    assert json.loads((parallel / "group.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failing_seed_is_reported_and_the_others_complete(tmp_path: Path, jobs: str) -> None:
    group = tmp_path / "group"
    # a dataset that fails inside the run for seed 7 only: a real seed failure (a negative
    # seed, used before, is now refused up front by --seeds with exit status 2)
    (tmp_path / "seed7_fails.py").write_text(SEED7_FAILS)
    code, output = run_sim(
        str(scenario_file(tmp_path)), "--seeds", "1,7,2", "--jobs", jobs, "--out", str(group),
        "--set", f'data.dataset="{(tmp_path / "seed7_fails.py").as_posix()}:data"',
    )
    assert code == 1, output
    assert "error: seed 7 failed: FactoryError" in output and "Traceback" not in output
    assert "Traceback" in (group / "seed-7" / "error.txt").read_text()
    meta = json.loads((group / "group.json").read_text())
    assert meta["status"] == "failed" and list(meta["failed"]) == ["7"]
    table = {row["metric"]: row for row in rows(group / "seeds.csv")}
    assert table["final_acc_mean"]["n"] == "2" and table["rounds"]["mean"] == "3"
    per_seed = {row["seed"]: row["status"] for row in rows(group / "per_seed.csv")}
    assert per_seed == {"7": "failed", "1": "completed", "2": "completed"}
    assert "Failed: seed 7" in (group / "seeds.md").read_text()
    for seed in (1, 2):
        assert json.loads((group / f"seed-{seed}" / "summary.json").read_text())["status"] == "completed"


def test_jobs_without_seeds_is_one_line(tmp_path: Path) -> None:
    code, output = run_sim(str(scenario_file(tmp_path)), "--jobs", "2")
    assert code == 2 and "add --seeds" in output and "Traceback" not in output


def test_ray_local_gives_the_tables_of_a_serial_run(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    scenario = str(scenario_file(tmp_path))
    serial, on_ray = tmp_path / "serial", tmp_path / "ray"
    assert run_sim(scenario, "--seeds", "1,2", "--out", str(serial))[0] == 0
    code, output = run_sim(scenario, "--seeds", "1,2", "--jobs", "2", "--ray", "local", "--out", str(on_ray))
    assert code == 0, output
    assert (on_ray / "curve.csv").read_bytes() == (serial / "curve.csv").read_bytes()
    assert without_wall_clock(on_ray / "seeds.csv") == without_wall_clock(serial / "seeds.csv")
