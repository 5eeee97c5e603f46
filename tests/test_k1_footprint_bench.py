"""``benchmarks/node_footprint.py``'s figures that need no cluster: the median, a run lost
to a port taken meanwhile is run again (and only such a run), the real work keeps its
samples during and after a run apart, ``--mixed`` starts each peer from its own tree and
compares the two sides run by run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import node_footprint as bench


def test_median_of_odd_even_and_no_values() -> None:
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert bench.median([]) != bench.median([])  # nan


def test_a_run_whose_port_was_taken_is_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def flaky(args: Any, real: Any, trees: Any) -> list[dict[str, float]]:
        calls.append(1)
        if len(calls) == 1:
            raise SystemExit("peer 3 exited with 2:\nerror: Address already in use")
        return [{"cpu_per_round_ms": 1.0}]

    monkeypatch.setattr(bench, "_run", flaky)
    assert bench._run_retrying(argparse.Namespace(), None) == [{"cpu_per_round_ms": 1.0}]
    assert len(calls) == 2


def test_any_other_failure_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def broken(args: Any, real: Any, trees: Any) -> list[dict[str, float]]:
        calls.append(1)
        raise SystemExit("peer 0 exited with 1:\nTraceback ...")

    monkeypatch.setattr(bench, "_run", broken)
    with pytest.raises(SystemExit, match="exited with 1"):
        bench._run_retrying(argparse.Namespace(), None)
    assert len(calls) == 1


def test_a_port_taken_every_time_ends_the_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    def taken(args: Any, real: Any, trees: Any) -> list[dict[str, float]]:
        raise SystemExit("error: Address already in use")

    monkeypatch.setattr(bench, "_run", taken)
    with pytest.raises(SystemExit, match="Address already in use"):
        bench._run_retrying(argparse.Namespace(), None, attempts=2)


def test_real_work_keeps_samples_during_and_after_apart() -> None:
    args = argparse.Namespace(config=str(bench.ROOT / "examples/node/node.toml"), peers=5, set=[])
    real = bench.RealWork(args)
    real.sample(rounds=2)
    real.sample_after(count=3)
    assert len(real.samples) == 1 and len(real.after) == 3
    assert real.median() > 0 and real.median_after() > 0


def test_a_mixed_cluster_starts_each_peer_from_its_side(tmp_path: Path) -> None:
    before = bench.Side(tmp_path / "before", "/opt/other/bin/python")
    after = bench.Side(tmp_path / "after")
    cluster = bench.MixedCluster(
        tmp_path, tmp_path / "node.toml", 3, sides={0: after, 1: before, 2: after}
    )
    assert cluster.popen_options(1) == {"cwd": before.tree, "env": {"PYTHONPATH": str(before.tree)}}
    assert cluster.popen_options(2) == {"cwd": after.tree, "env": {"PYTHONPATH": str(after.tree)}}
    assert cluster.interpreter(1) == "/opt/other/bin/python"
    assert cluster.interpreter(2) == sys.executable
    assert before.describe(True) == f"{before.tree} on /opt/other/bin/python"
    assert after.describe(True) == f"{after.tree} on {sys.executable}"
    assert after.describe(False) == str(after.tree)


def test_an_interpreter_without_the_dependencies_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(compare=None, before_python=str(tmp_path / "no-python"))
    with pytest.raises(SystemExit) as stopped:
        bench._before_side(args)
    assert stopped.value.code == 2
    out = capsys.readouterr().err.strip()
    assert out.count("\n") == 0 and out.startswith(
        f"--before-python: {tmp_path / 'no-python'} cannot"
    )
    same = argparse.Namespace(compare=str(bench.ROOT), before_python=sys.executable)
    with pytest.raises(SystemExit) as stopped:
        bench._before_side(same)  # the two sides could not be told apart
    assert stopped.value.code == 2
    assert "nothing to compare" in capsys.readouterr().err
    # another interpreter that has the dependencies (here: this one, behind a wrapper)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    other = argparse.Namespace(compare=None, before_python=str(wrapper))
    assert bench._before_side(other) == bench.Side(bench.ROOT, str(wrapper))


def test_mixed_runs_are_compared_run_by_run() -> None:
    real = bench.RealWork.__new__(bench.RealWork)  # no samples needed for the verdict
    runs = [
        bench.Measured(which, cpu, {}, real, (0.0, 0.0))
        for which, cpu in [("before", 8.0), ("after", 7.9), ("before", 6.5), ("after", 6.4),
                           ("before", 9.0), ("after", 8.7)]
    ]  # fmt: skip
    verdict = bench.pair_verdict(runs, "run")
    assert "run by run (ms per round): -0.10, -0.10, -0.30" in verdict
    assert "after lower in 3 of 3 runs (sign test, two-sided: p = 0.25)" in verdict


def test_a_run_too_short_to_measure_is_an_error_not_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """status.json is written at most once a second: a run of a fraction of a second
    showed one reading, and printed 0.00 ms per round."""
    watch = bench.Watch(process=None, finished=1.0)
    watch.cpu_at, watch.threads_at = {20: 3.0}, {20: {"main (asyncio)": 1.0}}
    args = argparse.Namespace(warmup=2, rounds=20)
    with pytest.raises(SystemExit) as stopped:
        bench.summarize(0, watch, args)
    assert stopped.value.code == 2
    assert "--rounds 20: peer 0 reported rounds done only 1 time(s) (20)" in capsys.readouterr().err
    watch.cpu_at[80], watch.threads_at[80] = 3.6, {"main (asyncio)": 1.3}
    row = bench.summarize(0, watch, args)
    assert row["cpu_per_round_ms"] == pytest.approx(10.0)  # 0.6 s over 60 rounds
    assert row["threads"]["main (asyncio)"] == pytest.approx(5.0)


def test_threads_are_read_up_to_the_last_reading_that_has_them_all() -> None:
    """The last reading of a peer can fall in its shutdown, after it joined its worker
    threads: their figures were then printed as 0.0 ms a round (the bootstrap peer, run
    after run). They come from the last reading with every thread still there."""
    watch = bench.Watch(process=None, finished=1.0)
    watch.cpu_at = {10: 1.0, 50: 1.4, 60: 1.5}
    watch.threads_at = {
        10: {"main (asyncio)": 0.5, "p2pfl-trio": 0.2},
        50: {"main (asyncio)": 0.7, "p2pfl-trio": 0.4},
        60: {"main (asyncio)": 0.75},  # the trio thread has ended
    }
    row = bench.summarize(0, watch, argparse.Namespace(warmup=2, rounds=60))
    assert row["cpu_per_round_ms"] == pytest.approx(10.0)  # the process: to the last reading
    assert row["threads"] == pytest.approx({"main (asyncio)": 5.0, "p2pfl-trio": 5.0})
