"""``benchmarks/node_footprint.py``'s figures that need no cluster: the median, a run lost
to a port taken meanwhile is run again (and only such a run), the real work keeps its
samples during and after a run apart."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from benchmarks import node_footprint as bench


def test_median_of_odd_even_and_no_values() -> None:
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert bench.median([]) != bench.median([])  # nan


def test_a_run_whose_port_was_taken_is_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def flaky(args: Any, real: Any) -> list[dict[str, float]]:
        calls.append(1)
        if len(calls) == 1:
            raise SystemExit("peer 3 exited with 2:\nerror: Address already in use")
        return [{"cpu_per_round_ms": 1.0}]

    monkeypatch.setattr(bench, "_run", flaky)
    assert bench._run_retrying(argparse.Namespace(), None) == [{"cpu_per_round_ms": 1.0}]
    assert len(calls) == 2


def test_any_other_failure_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def broken(args: Any, real: Any) -> list[dict[str, float]]:
        calls.append(1)
        raise SystemExit("peer 0 exited with 1:\nTraceback ...")

    monkeypatch.setattr(bench, "_run", broken)
    with pytest.raises(SystemExit, match="exited with 1"):
        bench._run_retrying(argparse.Namespace(), None)
    assert len(calls) == 1


def test_a_port_taken_every_time_ends_the_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    def taken(args: Any, real: Any) -> list[dict[str, float]]:
        raise SystemExit("error: Address already in use")

    monkeypatch.setattr(bench, "_run", taken)
    with pytest.raises(SystemExit, match="Address already in use"):
        bench._run_retrying(argparse.Namespace(), None, attempts=2)


def test_real_work_keeps_samples_during_and_after_apart() -> None:
    args = argparse.Namespace(
        config=str(bench.ROOT / "examples/node/node.toml"), peers=5, set=[]
    )
    real = bench.RealWork(args)
    real.sample(rounds=2)
    real.sample_after(count=3)
    assert len(real.samples) == 1 and len(real.after) == 3
    assert real.median() > 0 and real.median_after() > 0
