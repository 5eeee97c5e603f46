"""A node's checkpoints end to end (issue 14, issue 17): resuming from the older generation
when the newest is damaged, one line and exit 2 when none can be used, a finished run
that is not run again, writes off the event loop at a cadence, and a full disk (a real
tmpfs) that does not stop training."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pfl.checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    CheckpointError,
    decode_checkpoint,
    load_checkpoint,
)
from p2pfl.identity import Identity
from p2pfl.node import STATUS_NAME, Node
from p2pfl.nodecli import load_node_config
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from tests.test_checkpoint import DAMAGE

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
#: one peer training alone (min_peers = 0), as small as a node gets: fast and deterministic
NODE_TOML = """\
seed = 3
rounds = 3
num_peers = 4
[data]
dataset = "digits"
batch_size = 16
[model]
name = "mlp"
hidden = [16]
lr = 0.1
[protocol]
name = "dpsgd"
local_steps = 2
round_timeout = 1.0
[network]
min_peers = 0
discovery_timeout = 5.0
ping_interval = 0
"""


def write_toml(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    path.write_text(NODE_TOML)
    return path


def make_node(
    folder: Path, state_dir: Path, node_class: type[Node] = Node, **overrides: Any
) -> Node:
    sets = [f"state_dir={json.dumps(str(state_dir))}"]
    sets += [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    config = load_node_config(write_toml(folder), sets)
    identity = Identity.load_or_create(folder / "node.key")
    return node_class(config, MemoryTransport(MemoryNetwork(seed=0), identity.peer_id), identity)


def run(node: Node) -> dict[str, Any]:
    return asyncio.run(asyncio.wait_for(node.run(), 60))


class WrittenEachRoundNode(Node):
    """Waits for each round's checkpoint to be on disk: the writer keeps only the newest
    state when rounds outpace it, so on a busy machine the older generation could be an
    earlier round than the one before the last. Every write flushed (``sync_every`` 0):
    between two flushes the older generation is the last flushed one, not the round
    before (``tests/test_node_checkpoint_format.py``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disk.writer.sync_every = 0.0

    def _checkpoint(self) -> None:
        super()._checkpoint()
        assert self.disk.writer.wait(30)


@pytest.fixture(scope="module")
def finished_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir after 3 rounds: newest generation 3 rounds done, the older one 2."""
    folder = tmp_path_factory.mktemp("finished")
    status = run(make_node(folder, folder / "state", WrittenEachRoundNode))
    assert status["rounds_done"] == 3 and status["failure"] is None
    return folder


def copy_of(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    state = tmp_path / "state"
    assert decode_checkpoint((state / CHECKPOINT_NAME).read_bytes())["rounds_done"] == 3
    assert decode_checkpoint((state / PREVIOUS_NAME).read_bytes())["rounds_done"] == 2
    return state


class FirstStatusNode(Node):
    """Remembers what the first status.json it writes (while discovering) says."""

    first_status: dict[str, Any] | None = None

    def _write_status(self, *args: Any, **kwargs: Any) -> None:
        super()._write_status(*args, **kwargs)
        if self.first_status is None:
            self.first_status = json.loads((self.state_dir / STATUS_NAME).read_text())


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_resumes_from_the_older_one(
    finished_state: Path, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    damage, reason = DAMAGE[case]
    state = copy_of(finished_state, tmp_path)
    damage(state / CHECKPOINT_NAME)
    caplog.set_level(logging.INFO)
    node = make_node(tmp_path, state, FirstStatusNode, rounds=5)
    status = run(node)
    assert status["resumed_from"] == 2  # the older generation, not a fresh start
    assert isinstance(node, FirstStatusNode) and node.first_status is not None
    assert node.first_status["rounds_done"] == 2  # not blanked while discovering
    assert status["rounds_done"] == 5 and status["failure"] is None
    assert status["accuracy"] is not None and status["accuracy"] == status["accuracy"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(state / CHECKPOINT_NAME) in m and reason in m for m in warned), warned
    loaded = load_checkpoint(state)
    assert loaded is not None and loaded["rounds_done"] == 5


@pytest.mark.parametrize("case", ["truncated", "garbage"])
def test_both_damaged_stops_before_anything_with_one_line(
    finished_state: Path, tmp_path: Path, case: str
) -> None:
    damage, reason = DAMAGE[case]
    state = copy_of(finished_state, tmp_path)
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        damage(state / name)
    status_before = (state / STATUS_NAME).read_bytes()
    node = make_node(tmp_path, state, rounds=5)
    with pytest.raises(CheckpointError, match=reason) as caught:
        run(node)
    assert "\n" not in str(caught.value)
    assert not node.listening.is_set()  # refused before the transport started
    assert (state / STATUS_NAME).read_bytes() == status_before  # not overwritten with blanks


def test_a_finished_run_restarted_trains_no_extra_round(
    finished_state: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = copy_of(finished_state, tmp_path)
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    caplog.set_level(logging.INFO)
    node = make_node(tmp_path, state)
    status = run(node)
    assert status["state"] == "finished"
    assert status["rounds_done"] == 3 and status["round"] == 3
    assert status["accuracy"] == json.loads(before[STATUS_NAME])["accuracy"]  # unchanged
    assert node.protocol is None and not node.listening.is_set()  # nothing started
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before  # nothing written
    said = [r.getMessage() for r in caplog.records if "finished" in r.getMessage()]
    assert len(said) == 1 and "3 of 3 rounds done" in said[0], said
    assert not any(r.getMessage().startswith("round ") for r in caplog.records)


def cli(folder: Path, state: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-c", "from p2pfl.cli import main; main()", "node",
        "--config", str(folder / "node.toml"), "--key-file", str(folder / "node.key"),
        "--state-dir", str(state), "--listen", "/ip4/127.0.0.1/tcp/0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_the_command_line_finished_exits_0_and_damaged_exits_2_in_one_line(
    finished_state: Path, tmp_path: Path
) -> None:
    state = copy_of(finished_state, tmp_path)
    done = cli(tmp_path, state)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if "this run is finished" in line]
    assert len(said) == 1, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["rounds_done"] == 3
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        DAMAGE["flipped-byte"][0](state / name)
    bad = cli(tmp_path, state)
    assert bad.returncode == 2, bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, bad.stderr
    assert lines[0].startswith("error:") and str(state / CHECKPOINT_NAME) in lines[0]
    assert "checksum mismatch" in lines[0] and "weights_only" not in bad.stderr


class CountingNode(WrittenEachRoundNode):
    """Records which thread each checkpoint file write ran on (each round's written
    before the next, so that none is superseded on a busy machine)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import threading

        self.write_threads: list[tuple[str, int]] = []
        write = self.disk.writer.write_file

        def recording(state_dir: Path, data: bytes, **flush: bool) -> None:
            rounds = decode_checkpoint(data)["rounds_done"]
            self.write_threads.append((threading.current_thread().name, rounds))
            write(state_dir, data, **flush)

        self.disk.writer.write_file = recording


def test_checkpoints_are_written_off_the_loop_at_the_configured_cadence(tmp_path: Path) -> None:
    node = make_node(tmp_path, tmp_path / "state", CountingNode, rounds=7, checkpoint_every=3)
    status = run(node)
    assert status["rounds_done"] == 7
    assert isinstance(node, CountingNode)
    in_rounds = [(name.split("_")[0], rounds) for name, rounds in node.write_threads[:-1]]
    assert in_rounds == [("p2pfl-checkpoint", 3), ("p2pfl-checkpoint", 6)]
    assert node.write_threads[-1] == ("MainThread", 7)  # the final one, before run() returns
    loaded = load_checkpoint(tmp_path / "state")
    assert loaded is not None and loaded["rounds_done"] == 7
    older = decode_checkpoint((tmp_path / "state" / PREVIOUS_NAME).read_bytes())
    assert older["rounds_done"] == 6


# ------------------------------------------------------------------ a real full disk

TMPFS_BYTES = 256 * 1024


def fill(folder: Path) -> Path:
    """Take every free block of the file system holding ``folder``."""
    filler = folder / "filler"
    chunk = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for _ in range(TMPFS_BYTES // len(chunk) + 16):  # unbuffered: nothing left to flush
            try:
                os.write(fd, chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                break
        else:
            raise AssertionError("the tmpfs never filled up")
    finally:
        os.close(fd)
    return filler


class FullDiskNode(Node):
    """Fills its state dir's file system after round 2 and frees it after round 6."""

    checkpoint_during: dict[str, Any] | None = None
    #: the writer's flush cadence (None: the node's default)
    sync_every: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.sync_every is not None:
            self.disk.writer.sync_every = self.sync_every

    def _on_round(self, finished: int, model: torch.Tensor) -> None:
        if finished == 2:
            self.filler = fill(self.state_dir)
        super()._on_round(finished, model)
        if finished == 6:
            assert self.disk.writer.wait(10)
            self.checkpoint_during = load_checkpoint(self.state_dir)  # the last good one
            self.filler.unlink()


class FlushingFullDiskNode(FullDiskNode):
    """Every write a flushed generation: the full disk fails them all."""

    sync_every = 0.0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    folder = tmp_path / "state"
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
        if os.path.ismount(folder):
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_is_said_once_training_goes_on_and_checkpoints_come_back(
    tmp_path: Path, tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = make_node(tmp_path, tmpfs, FlushingFullDiskNode, rounds=10)
    status = run(node)
    assert status["rounds_done"] == 10 and status["failure"] is None and not status["errors"]
    assert isinstance(node, FullDiskNode) and node.checkpoint_during is not None
    assert node.disk.writer.health.errors_total >= 1  # the full disk was met
    assert 1 <= node.checkpoint_during["rounds_done"] <= 3  # untouched while full
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    about_checkpoint = [m for m in errors if str(tmpfs / CHECKPOINT_NAME) in m]
    assert len(about_checkpoint) == 1, errors  # once, not every round
    assert "No space left on device" in about_checkpoint[0]
    assert len([m for m in errors if STATUS_NAME in m]) <= 1, errors
    assert len(errors) <= 2, errors
    again = [r.getMessage() for r in caplog.records if "written again" in r.getMessage()]
    assert any(str(tmpfs / CHECKPOINT_NAME) in m for m in again), again
    loaded = load_checkpoint(tmpfs)
    assert loaded is not None and loaded["rounds_done"] == 10
    assert json.loads((tmpfs / STATUS_NAME).read_text())["rounds_done"] == 10
    assert not [p.name for p in tmpfs.iterdir() if p.name.startswith(".")]  # no litter


class OftenFlushingFullDiskNode(FullDiskNode):
    """A flushed generation due at every round: the full disk fails each one."""

    sync_every = 1e-6


@pytest.mark.parametrize("node_class", [FullDiskNode, OftenFlushingFullDiskNode])
def test_a_disk_that_fills_up_between_flushes_still_takes_each_rounds_live_record(
    tmp_path: Path, tmpfs: Path, caplog: pytest.LogCaptureFixture, node_class: type[Node]
) -> None:
    """At the node's cadence the rounds between two flushed generations are live records,
    whose room was reserved when the first generation was written: a disk full from
    round 2 to 6 fails the status file (said once), not the round's checkpoint. Where a
    generation falls due meanwhile and fails (said once), the round goes into a live
    record instead."""
    caplog.set_level(logging.INFO)
    node = make_node(tmp_path, tmpfs, node_class, rounds=10)
    status = run(node)
    assert status["rounds_done"] == 10 and status["failure"] is None and not status["errors"]
    assert isinstance(node, FullDiskNode) and node.checkpoint_during is not None
    assert node.disk.writer.live_health.errors_total == 0
    assert node.checkpoint_during["rounds_done"] == 7  # round 6's, written while full
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [m for m in errors if "live checkpoint" in m], errors
    # a generation falls due (every round, or on a machine slow enough for 5 s to pass):
    # said once
    assert len([m for m in errors if str(tmpfs / CHECKPOINT_NAME) in m]) <= 1, errors
    if node_class is OftenFlushingFullDiskNode:
        assert node.disk.writer.health.errors_total >= 3  # rounds 2-6' generations failed
    loaded = load_checkpoint(tmpfs)
    assert loaded is not None and loaded["rounds_done"] == 10
    assert not [p.name for p in tmpfs.iterdir() if p.name.startswith(".")]  # no litter
