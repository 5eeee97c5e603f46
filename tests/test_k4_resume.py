"""A single simulation run killed with SIGKILL resumes to the results of a run never stopped.

Each run is a real ``p2pfl sim`` process. The killed one is held, by a hook around its
``metrics.csv`` recorder, right after it wrote the row of round ``KILL_AT`` (in the middle
of an event, before that advance's checkpoint): the test waits for that line on its
stdout (with a timeout), then sends SIGKILL. Its folder then holds a checkpoint from the
advance before and one row more than that checkpoint: ``--resume`` must cut that row,
measure it again, and finish with ``metrics.csv`` and ``summary.json`` equal to the
uninterrupted run's but for wall-clock times (``wall_time``, ``wall_time_s``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sim
import sim.checkpoint as checkpoint_module
from p2pfl.cli import app
from sim.checkpoint import CHECKPOINT_FILE, CheckpointError, read_header
from sim.mixing import Mixer, RowArena
from sim.snapshot import SnapshotError, dumps_to

KILL_AT = 6  # the row (round) after which the killed run is held and killed
TIMEOUT = 60.0

# the killed run: the CLI with a hook that holds the process after the row of round argv[1]
_HELD = """
import sys
from sim.metrics import RowRecorder
from p2pfl.cli import main
stop = int(sys.argv[1])
original = RowRecorder.__call__
def hooked(self, row):
    original(self, row)
    print("ROW", row["round"], flush=True)
    if row["round"] == stop:
        sys.stdin.readline()  # held here until killed
RowRecorder.__call__ = hooked
sys.argv = ["p2pfl", *sys.argv[2:]]
main()
"""

_COMMON = """
seed = 3
rounds = 10

[data]
dataset = "digits"
partition = "iid"
batch_size = 16

[model]
name = "mlp"
hidden = [16]
lr = 0.1

[sim]
eval_every = 2
threads = 1
checkpoint_every = 1e-9  # at every advance of the system's progress
"""

SCENARIOS = {
    # plain D-PSGD over a ring
    "dpsgd": _COMMON + """
[topology]
kind = "ring"
n = 10

[protocol]
name = "dpsgd"
local_steps = 2
""",
    # MoDeST (views, samples, aggregators, timers): 30% of the peers crash at round 4
    # (before the checkpoint), the dead come back at round 8 (after it)
    "modest-crash": _COMMON + """
[topology]
kind = "complete"
n = 16

[protocol]
name = "modest"
sample_size = 5
num_aggregators = 2
local_steps = 2
success_fraction = 0.6

[network]
mode = "overlay"

[[disruptions]]
kind = "crash"
fraction = 0.3
at_round = 4

[[disruptions]]  # after the resume: a scheduled disruption read back from the checkpoint
kind = "recover"
at_round = 8
""",
    # FoolsGold (a server-like aggregator) against five Sybil identities flipping labels
    "foolsgold-sybils": _COMMON + """
[topology]
kind = "star"
n = 9

[protocol]
name = "foolsgold"
clients_per_round = 8
local_steps = 2

[attack]
name = "sybil_label_flip"
params = { source = 1, target = 7 }
identities = 4
attach = 9
""",
}


@pytest.fixture(scope="module", autouse=True)
def _own_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Sign with a key of the tests' own (``sim.checkpoint``'s "Trust"), in this process
    and the killed runs it starts, never the user's ~/.config one."""
    before = os.environ.get(checkpoint_module.KEY_ENV)
    os.environ[checkpoint_module.KEY_ENV] = str(tmp_path_factory.mktemp("key") / "checkpoint.key")
    yield
    if before is None:
        os.environ.pop(checkpoint_module.KEY_ENV, None)
    else:
        os.environ[checkpoint_module.KEY_ENV] = before


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "COLUMNS": "200"}


def _sources_now() -> None:
    """Fingerprint the sources again, as a new ``p2pfl`` process would: this test process
    may have fingerprinted them before another edit of the tree (the killed run, a new
    process, fingerprints them as they are when it starts)."""
    checkpoint_module._FINGERPRINT.clear()


@dataclass
class _Result:
    returncode: int
    output: str


def _sim(*args: str) -> _Result:
    """``p2pfl sim ARGS --quiet`` in this process (the killed run alone is a process)."""
    _sources_now()
    result = CliRunner().invoke(app, ["sim", *args, "--quiet"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return _Result(result.exit_code, result.output)


def _killed_run(scenario: Path, out: Path, *extra: str, stop: int = KILL_AT) -> None:
    """Run until the row of round ``stop`` is written, then SIGKILL the process."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HELD, str(stop), "sim", str(scenario), "--out", str(out), "--quiet", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    assert process.stdout is not None
    deadline = time.monotonic() + TIMEOUT
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the run never reached the round to be killed at"
            if not selector.select(timeout=left):
                continue
            line = process.stdout.readline()
            assert line, f"the run ended early: {process.stderr.read() if process.stderr else ''}"
            if line.split() == ["ROW", str(stop)]:
                break
    finally:
        selector.close()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert process.returncode == -signal.SIGKILL


def _metrics(path: Path) -> str:
    """metrics.csv without its wall-clock column."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    wall = rows[0].index("wall_time")
    return "\n".join(",".join(cell for k, cell in enumerate(row) if k != wall) for row in rows)


def _summary(path: Path) -> dict[str, object]:
    summary = json.loads(path.read_text())
    summary.pop("wall_time_s")
    summary["final"].pop("wall_time")
    return summary


def _rounds(path: Path) -> list[int]:
    return [int(row["round"]) for row in csv.DictReader(path.open())]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_killed_run_resumes_to_the_uninterrupted_results(tmp_path: Path, name: str) -> None:
    scenario = tmp_path / f"{name}.toml"
    scenario.write_text(f'name = "{name}"\n' + SCENARIOS[name])
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = _sim(str(scenario), "--out", str(reference))
    assert done.returncode == 0, done.output
    assert not (reference / CHECKPOINT_FILE).exists()  # a completed run keeps no checkpoint

    _killed_run(scenario, killed)
    header, _ = read_header(killed / CHECKPOINT_FILE)
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"
    # the kill came after the row of KILL_AT and before that advance's checkpoint
    assert _rounds(killed / "metrics.csv")[-1] == KILL_AT
    assert header["rows"] < len(_rounds(killed / "metrics.csv"))

    resumed = _sim(str(scenario), "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.output
    assert _metrics(killed / "metrics.csv") == _metrics(reference / "metrics.csv")
    assert _rounds(killed / "metrics.csv") == list(range(0, 11, 2))
    assert _summary(killed / "summary.json") == _summary(reference / "summary.json")
    assert (killed / "config.toml").read_bytes() == (reference / "config.toml").read_bytes()
    assert not (killed / CHECKPOINT_FILE).exists()


def test_a_resumed_run_killed_again_resumes_again(tmp_path: Path) -> None:
    scenario = tmp_path / "dpsgd.toml"
    scenario.write_text('name = "dpsgd"\n' + SCENARIOS["dpsgd"])
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _killed_run(scenario, killed, stop=4)
    first = read_header(killed / CHECKPOINT_FILE)[0]
    _sources_now()
    _killed_run(scenario, killed, "--resume", stop=8)  # the resumed process, killed too
    assert read_header(killed / CHECKPOINT_FILE)[0]["round"] > first["round"]
    (killed / f".{CHECKPOINT_FILE}.1.tmp").write_bytes(b"the start of a write a kill cut short")
    assert _sim(str(scenario), "--out", str(killed), "--resume").returncode == 0
    assert _sim(str(scenario), "--out", str(reference)).returncode == 0
    assert _metrics(killed / "metrics.csv") == _metrics(reference / "metrics.csv")
    assert _summary(killed / "summary.json") == _summary(reference / "summary.json")
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_a_run_killed_as_soon_as_its_first_checkpoint_exists_resumes(tmp_path: Path) -> None:
    """The plain command, unhooked: SIGKILL the moment ``checkpoint.bin`` appears (a
    point the run chose, not the test), then resume to the uninterrupted results."""
    scenario = tmp_path / "long.toml"
    scenario.write_text('name = "long"\n' + SCENARIOS["dpsgd"].replace("rounds = 10", "rounds = 120"))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", _HELD, "-1", "sim", str(scenario), "--out", str(killed), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (killed / CHECKPOINT_FILE).exists():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.002)  # polling for the file, bounded by the deadline
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"
    done = _sim(str(scenario), "--out", str(reference))
    assert done.returncode == 0, done.output
    resumed = _sim(str(scenario), "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.output
    assert _metrics(killed / "metrics.csv") == _metrics(reference / "metrics.csv")
    assert _summary(killed / "summary.json") == _summary(reference / "summary.json")


@pytest.fixture(scope="module")
def killed_dpsgd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dpsgd run killed mid-run with its checkpoint: (scenario file, run folder)."""
    folder = tmp_path_factory.mktemp("killed")
    scenario = folder / "dpsgd.toml"
    scenario.write_text('name = "dpsgd"\n' + SCENARIOS["dpsgd"])
    _killed_run(scenario, folder / "run")
    return scenario, folder / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _refused(result: _Result, *words: str) -> None:
    assert result.returncode == 2, result.output
    message = " ".join(result.output.split())
    assert "Traceback" not in message
    for word in words:
        assert word in message, message


def test_a_damaged_checkpoint_is_refused(killed_dpsgd: tuple[Path, Path], tmp_path: Path) -> None:
    scenario, run = killed_dpsgd
    run = _copy(run, tmp_path)
    path = run / CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit flipped in the middle of the snapshot
    path.write_bytes(bytes(data))
    before = (run / "metrics.csv").read_bytes()
    _refused(_sim(str(scenario), "--out", str(run), "--resume"), "damaged")
    assert (run / "metrics.csv").read_bytes() == before  # nothing touched
    path.write_bytes(bytes(data[: len(data) // 3]))  # torn
    with pytest.raises(CheckpointError, match="damaged"):
        read_header(path)
    path.write_bytes(b"something else entirely\n" * 4)  # foreign
    with pytest.raises(CheckpointError, match="not a p2pfl sim checkpoint"):
        read_header(path)


def test_resume_refuses_another_scenario_a_finished_run_and_no_checkpoint(
    killed_dpsgd: tuple[Path, Path], tmp_path: Path
) -> None:
    scenario, run = killed_dpsgd
    run = _copy(run, tmp_path)
    _refused(_sim(str(scenario), "--out", str(run), "--resume", "--set", "model.lr=0.2"), "another scenario")
    _refused(_sim(str(scenario), "--resume"), "--resume needs --out")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(_sim(str(scenario), "--out", str(empty), "--resume"), "no checkpoint")
    # the checkpoint cadence is not part of the scenario: changing it resumes (here from
    # the notebook API, which refuses as the command does)
    _sources_now()
    with pytest.raises(CheckpointError, match="another scenario"):
        sim.resume(scenario, run, overrides={"seed": 4})
    result = sim.resume(scenario, run, overrides={"sim.checkpoint_every": 0}, plots=False)
    assert result.summary["status"] == "completed" and result.rows[-1]["round"] == 10
    assert not (run / CHECKPOINT_FILE).exists()
    _refused(_sim(str(scenario), "--out", str(run), "--resume"), "completed")


def test_what_a_snapshot_cannot_keep_exactly_is_refused() -> None:
    arena = RowArena(4, capacity=8)
    mixer = Mixer(arena)
    _, first, block = arena.take(2)
    rows = mixer.rows(0, first, block)
    with pytest.raises(SnapshotError, match="numpy array views the arena"):
        dumps_to(io.BytesIO(), {"rows": rows, "alias": arena.buffers[0][:1]}, {}, [arena])
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        with pytest.raises(SnapshotError, match="cuda"):
            dumps_to(io.BytesIO(), torch.zeros(2, device="cuda"), {}, [])


@pytest.mark.parametrize(
    ("failure", "logged"),
    [(OSError(28, "No space left on device"), "not written"), (SnapshotError("a cuda tensor"), "no checkpoints")],
)
def test_a_checkpoint_that_cannot_be_written_does_not_stop_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    failure: Exception, logged: str,
) -> None:
    calls: list[int] = []

    def failing(*args: object, **kwargs: object) -> int:
        calls.append(1)
        raise failure

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", failing)
    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "s"\n' + SCENARIOS["dpsgd"])
    with caplog.at_level("WARNING", logger="p2pfl.sim"):
        result = sim.run(scenario, out_dir=tmp_path / "run", plots=False)
    assert result.summary["status"] == "completed" and result.rows[-1]["round"] == 10
    assert calls and logged in caplog.text
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()
