"""The one-call GPU check (benchmarks/gpu_check.sh) must still run when a GPU is finally
lent: its dry run on this CPU goes through the same steps (tests, the device benchmark at
two sizes) and leaves what the device tool would bring back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None, reason="the GPU check is a bash script")
def test_the_gpu_check_dry_run_runs_every_step_and_brings_back_at_most_eight_files(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_SIZES="24 40", GPU_CHECK_DATASET="digits")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3: this venv's
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "check.log").read_text()
    for step in ("tests", "small", "big-cuda", "big-cpu"):
        assert f"{step}: exit 0 after" in log, log
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files  # the device tool brings back 8 files at most
    for stem in ("device_small", "device_big_cpu"):
        assert (tmp_path / f"{stem}.csv").read_text().count("\n") >= 2, stem  # a header and rows
        assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
    steps = (tmp_path / "steps.log").read_text()
    assert "Traceback" not in steps, steps[-2000:]
