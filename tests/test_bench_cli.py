"""Benchmark scripts on a machine without their dataset: one line and exit status 2
(benchmarks/bench_cli.py), in the script itself and in a parent of child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "wanted"),
    [
        # loads the dataset in process
        (["evaluation.py", "--datasets", "mnist", "--repeats", "1"], "p2pfl data fetch mnist"),
        (["papers/modest_fl.py", "--dataset", "mnist", "--seeds", "1", "--out", "out"], "p2pfl data fetch mnist"),
        # checks before its children would load it
        (["sim_scale.py", "--parts", "ratio", "--sizes", "40"], "p2pfl data fetch mnist"),
        (["sim_checkpoint.py", "--sizes", "40", "--dataset", "fashion_mnist"], "p2pfl data fetch fashion_mnist"),
        (["vs_flower.py", "--only", "ours", "--sizes", "10", "--dataset", "nope"], "'nope' is not a dataset"),
    ],
)
def test_a_missing_dataset_is_one_line_and_status_2(tmp_path: Path, script: list[str], wanted: str) -> None:
    env = {**os.environ, "P2PFL_DATA_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script[0]), *script[1:]],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and wanted in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
