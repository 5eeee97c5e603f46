"""benchmarks/vs_flower.py and benchmarks/sweep_timing.py, run from their own pieces at a tiny
size so that the scripts cannot rot: our side (``p2pfl sim`` in a child process, measured
whole) runs FedAvg batched with no round closed by its timer; the Flower side (skipped
without the optional ``flwr``) reaches the same accuracy from the same task; a sweep run
serially and with ``--jobs 2`` is timed and gives identical results files."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

from tests.sweep_kit import tiny_base

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _import(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def vs_flower():
    return _import("vs_flower")


@pytest.fixture(scope="module")
def tiny(vs_flower):
    """Three clients on digits, two rounds: the task, and the steps of one local epoch."""
    task = vs_flower.Task(n=3, rounds=2, dataset="digits")
    return task, vs_flower.epoch_steps(vs_flower.train_size(task), task.shares, task.batch_size)


@pytest.fixture(scope="module")
def ours(vs_flower, tiny, tmp_path_factory):
    """One measured run of our side on the tiny task (shared: a child process is seconds)."""
    task, steps = tiny
    return vs_flower.run_once(task, "ours", steps, tmp_path_factory.mktemp("ours"), repeat=0, cpus=1, timeout=120)


def test_one_local_epoch_of_steps(vs_flower):
    # MNIST's 60,000 training images over N clients and the server's share
    assert vs_flower.epoch_steps(60_000, 11, 32) == 171  # 5,455 images: 171 batches of 32
    assert vs_flower.epoch_steps(60_000, 101, 32) == 19
    assert vs_flower.epoch_steps(60_000, 1001, 32) == 2  # 60 images: 2 batches
    assert vs_flower.epoch_steps(10, 20, 32) == 1


def test_scenario_is_full_participation_fedavg_without_timer(vs_flower, tiny):
    from sim.scenario import scenario_from_dict

    task, steps = tiny
    import tomllib

    scenario = scenario_from_dict(tomllib.loads(vs_flower.scenario_text(task, steps)))
    assert scenario.protocol.name == "fedavg" and scenario.topology.kind == "star"
    assert scenario.topology.n == task.n + 1 and scenario.protocol.clients_per_round == task.n
    assert scenario.protocol.local_steps == steps and scenario.protocol.round_timeout >= 1e5


def test_our_side_runs_batched_measured_whole(vs_flower, tiny, ours):
    task, _ = tiny
    run = ours
    usage, result = run.usage, run.result
    assert usage.returncode == 0
    assert usage.wall_s > 0 and 0 < usage.cpu_s and usage.peak_rss_mb > 50 and usage.processes >= 1
    assert usage.left_behind == 0
    assert 0 < result["acc_final"] <= 1 and 0 < result["acc_start"] <= 1
    assert result["acc_final"] > result["acc_start"]  # two rounds of FedAvg learn something
    assert result["rounds_closed_by_timer"] == 0 and vs_flower.check_ours(run) == []
    # every client trains every round, fewer calls than jobs when batched
    assert result["training_jobs"] == task.n * task.rounds
    assert result["training_calls"] <= result["training_jobs"]


def test_a_run_closed_by_its_timer_is_reported(vs_flower):
    usage = vs_flower.Usage(1.0, 1.0, 100.0, 1, 0, 0)
    run = vs_flower.Run(10, "ours", 0, usage, {"rounds_closed_by_timer": 0.75, "warnings": ["75% of the rounds"]})
    problems = vs_flower.check_ours(run)
    assert len(problems) == 2 and "75%" in problems[0]


def test_summary_ratios_csv_and_plot(vs_flower, tmp_path):
    def run(side: str, repeat: int, wall: float, acc: float):
        usage = vs_flower.Usage(wall, wall / 2, 100.0 if side == "ours" else 400.0, 1, 0, 0)
        return vs_flower.Run(10, side, repeat, usage, {"acc_final": acc})

    runs = [run("ours", 0, 2.0, 0.9), run("flower", 0, 30.0, 0.9), run("ours", 1, 4.0, 0.9),
            run("flower", 1, 50.0, 0.9), run("ours", 2, 3.0, 0.9), run("flower", 2, 40.0, 0.9)]
    (row,) = vs_flower.summarize(runs, [10])
    assert row["ours_wall_s"] == 3.0 and row["flower_wall_s"] == 40.0  # medians
    assert math.isclose(row["ratio_wall_s"], 40.0 / 3.0) and math.isclose(row["ratio_peak_rss_mb"], 4.0)
    vs_flower.write_csv([row], tmp_path / "summary.csv")
    with (tmp_path / "summary.csv").open() as handle:
        assert next(csv.DictReader(handle))["ratio_cpu_s"] == f"{40.0 / 3.0:.4g}"
    vs_flower.plot([row], tmp_path / "vs_flower.png")
    assert (tmp_path / "vs_flower.png").stat().st_size > 1000


def test_bad_sizes_are_one_line_errors(vs_flower, capsys):
    with pytest.raises(SystemExit) as exit_:
        vs_flower.main(["--sizes", "ten"])
    assert exit_.value.code == 2 and "--sizes" in capsys.readouterr().err


@pytest.mark.slow  # a private Ray instance: about 15 s on an idle 2-core box
def test_flower_side_reaches_our_accuracy(vs_flower, tiny, ours, tmp_path):
    pytest.importorskip("flwr", reason="the Flower side needs the optional extra 'flower'")
    task, steps = tiny
    flower = vs_flower.run_once(task, "flower", steps, tmp_path, repeat=0, cpus=1, timeout=180)
    assert flower.usage.returncode == 0 and flower.usage.processes > 1  # Ray's daemons and workers
    assert flower.usage.left_behind == 0
    # the same shares, start model, minibatches and steps: the same global model, up to
    # float round-off in the order of the sums (at most one test image either way)
    assert flower.result["acc_start"] == pytest.approx(ours.result["acc_start"], abs=1e-6)
    assert flower.result["acc_final"] == pytest.approx(ours.result["acc_final"], abs=0.006)


# ------------------------------------------------------------------ sweep timing

BASE = tiny_base(step_time=None)

SWEEP = """
name = "grid"
base = "base.toml"
fractions = [0.34]
cell_plots = false

[[attacks]]
label = "label flip"
name = "label_flip"

[[defences]]
label = "median"
set = { "protocol.aggregator" = "median" }
"""


@pytest.mark.slow  # two small sweeps, one through a process pool
def test_sweep_timing_serial_and_parallel_agree(tmp_path, capsys):
    sweep_timing = _import("sweep_timing")
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "sweep.toml").write_text(SWEEP)
    out = tmp_path / "out"
    status = sweep_timing.main(["--sweep", str(tmp_path / "sweep.toml"), "--seeds", "1,2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "results identical" in printed
    with (out / "timing.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["jobs"] for row in rows] == ["1", "2"]
    assert rows[0]["md5_results.csv"] == rows[1]["md5_results.csv"] != "missing"
    assert all(float(row["wall_s"]) > 0 and float(row["cpu_s"]) > 0 for row in rows)
    assert (out / "timing.png").stat().st_size > 0  # the plot beside the CSV


def test_sweep_timing_bad_file_is_one_line_error(tmp_path, capsys):
    sweep_timing = _import("sweep_timing")
    assert sweep_timing.main(["--sweep", str(tmp_path / "nope.toml")]) == 2
    assert "no such sweep file" in capsys.readouterr().err
