"""Checkpoints (``p2pfl.checkpoint``): two generations, verified on load, written off the
caller's thread, a failing disk reported once (issue 14, issue 17's lean node round)."""

from __future__ import annotations

import errno
import logging
import pickle
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pfl.checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    CheckpointError,
    CheckpointWriter,
    Damaged,
    Layout,
    StateDir,
    decode_checkpoint,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_generation,
)

pytestmark = pytest.mark.timeout(60)

PEER = "12D3KooWPeerUnderTest"
DIM = 50
LAYOUT = Layout(peer_id=PEER, protocol="dpsgd", dim=DIM, sampler=(3, 16, 300))


def node_state(rounds_done: int, params: torch.Tensor | None = None) -> dict[str, Any]:
    """A state shaped as the node saves it."""
    if params is None:
        params = torch.linspace(-1.0, 1.0, DIM) * (rounds_done + 1)
    return {
        "protocol": {
            "protocol": "dpsgd",
            "peer_id": PEER,
            "round": rounds_done,
            "params": params,
            "rng": random.Random(rounds_done).getstate(),
            "next_ticket": rounds_done,
        },
        "sampler": {"consumed": 16 * rounds_done, "seed": 3, "batch_size": 16, "size": 300},
        "neighbours": ["a", "b"],
        "counters": {"sent": float(rounds_done)},
        "rounds_done": rounds_done,
        "accuracy": 0.5,
        "known": {"a": ["/memory/a"]},
    }


# ------------------------------------------------------------------ damage, one per case


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def flipped_byte_in_params(path: Path) -> None:
    data = bytearray(path.read_bytes())
    params = decode_checkpoint(bytes(data))["protocol"]["params"]
    at = bytes(data).find(params.numpy().tobytes())
    assert at > 0, "the parameters' bytes are stored as they are"
    data[at + 4 * 7 + 2] ^= 0x10  # one bit of the 8th parameter
    path.write_bytes(bytes(data))


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(len(path.read_bytes())))


def nan_params(path: Path) -> None:
    state = decode_checkpoint(path.read_bytes())
    state["protocol"]["params"][5] = float("nan")
    path.write_bytes(encode_checkpoint(state))  # a valid checksum: the values are the problem


def wrong_length(path: Path) -> None:
    state = decode_checkpoint(path.read_bytes())
    params = state["protocol"]["params"]
    state["protocol"]["params"] = torch.cat([params, params[:1]])  # one parameter too many
    path.write_bytes(encode_checkpoint(state))


DAMAGE = {
    "zero-byte": (zero_bytes, "empty"),
    "truncated": (truncated, "truncated"),
    "flipped-byte": (flipped_byte_in_params, "checksum mismatch"),
    "garbage": (garbage, "not a p2pfl checkpoint"),
    "nan": (nan_params, "non-finite values"),
    "wrong-length": (wrong_length, "parameters, this model has"),
}


def two_generations(state_dir: Path) -> None:
    save_checkpoint(state_dir, node_state(1))
    save_checkpoint(state_dir, node_state(2))


def test_two_generations_newest_first(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, node_state(1))
    assert not (tmp_path / PREVIOUS_NAME).exists()
    save_checkpoint(tmp_path, node_state(2))
    save_checkpoint(tmp_path, node_state(3))
    assert decode_checkpoint((tmp_path / PREVIOUS_NAME).read_bytes())["rounds_done"] == 2
    state = load_checkpoint(tmp_path, LAYOUT)
    assert state is not None and state["rounds_done"] == 3
    assert torch.equal(state["protocol"]["params"], node_state(3)["protocol"]["params"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_NAME, PREVIOUS_NAME])


def test_no_checkpoint_is_a_fresh_start(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "missing", LAYOUT) is None
    assert StateDir(tmp_path, LAYOUT).open() is None


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_falls_back_to_the_older_one(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    damage, reason = DAMAGE[case]
    two_generations(tmp_path)
    newest = tmp_path / CHECKPOINT_NAME
    damage(newest)
    with pytest.raises(Damaged, match=reason):
        decode_checkpoint(newest.read_bytes(), LAYOUT)
    caplog.set_level(logging.INFO, logger="p2pfl.checkpoint")
    state = StateDir(tmp_path, LAYOUT).open()
    assert state is not None and state["rounds_done"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(newest) in warnings[0] and reason in warnings[0]
    assert "older generation" in warnings[0] and str(tmp_path / PREVIOUS_NAME) in warnings[0]
    # set aside: the next write keeps the good one as the older generation
    assert not newest.exists() and (tmp_path / f"{CHECKPOINT_NAME}.damaged").exists()
    save_checkpoint(tmp_path, node_state(2))
    assert decode_checkpoint((tmp_path / PREVIOUS_NAME).read_bytes())["rounds_done"] == 1


@pytest.mark.parametrize("case", list(DAMAGE))
def test_both_generations_damaged_is_one_line_naming_the_files(tmp_path: Path, case: str) -> None:
    damage, reason = DAMAGE[case]
    two_generations(tmp_path)
    damage(tmp_path / CHECKPOINT_NAME)
    damage(tmp_path / PREVIOUS_NAME)
    with pytest.raises(CheckpointError) as caught:
        StateDir(tmp_path, LAYOUT).open()
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / CHECKPOINT_NAME) in message and str(tmp_path / PREVIOUS_NAME) in message
    assert reason in message and "weights_only" not in message
    assert (tmp_path / CHECKPOINT_NAME).exists()  # nothing renamed: left for the user


def test_only_a_damaged_newest_and_no_older_one_is_an_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, node_state(1))
    truncated(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path, LAYOUT)


def test_a_missing_newest_after_an_interrupted_rotation_uses_the_older(tmp_path: Path) -> None:
    two_generations(tmp_path)
    (tmp_path / CHECKPOINT_NAME).unlink()  # killed between the two renames
    state = load_checkpoint(tmp_path, LAYOUT)
    assert state is not None and state["rounds_done"] == 1


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        (Layout(peer_id="12D3KooWSomeoneElse"), "belongs to peer"),
        (Layout(protocol="gossip"), "'dpsgd' state, this node runs 'gossip'"),
        (Layout(dim=DIM * 2), f"{DIM} parameters, this model has {DIM * 2}"),
        (Layout(sampler=(4, 16, 300)), "another data share"),
    ],
)
def test_a_checkpoint_of_another_node_or_model_is_refused(
    tmp_path: Path, layout: Layout, reason: str
) -> None:
    save_checkpoint(tmp_path, node_state(1))
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(tmp_path, layout)


def test_a_state_the_protocol_cannot_take_is_refused(tmp_path: Path) -> None:
    two_generations(tmp_path)

    def fits(state: dict[str, Any]) -> None:
        if state["rounds_done"] == 2:
            raise KeyError("alive")

    state = load_checkpoint(tmp_path, LAYOUT, fits)
    assert state is not None and state["rounds_done"] == 1


class RunsCode:
    """Unpickling this would create a file: a tampered checkpoint must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_payload_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = encode_checkpoint(node_state(1))
    header_end = good.index(b"\n", good.index(b"\n") + 1)
    payload = pickle.dumps({"protocol": RunsCode(marker)})
    import hashlib
    import json

    header = json.loads(good[good.index(b"\n") + 1 : header_end])
    header.update(sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    data = b"p2pfl-checkpoint\n" + json.dumps(header).encode() + b"\n" + payload
    with pytest.raises(Damaged, match="cannot be read as tensors and plain data") as caught:
        decode_checkpoint(data)
    assert "weights_only" not in str(caught.value)
    assert not marker.exists()


def test_stale_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    two_generations(tmp_path)
    stale = [tmp_path / ".checkpoint.pt.x8f3k2", tmp_path / ".status.json.q1w2e3"]
    kept = [tmp_path / ".other", tmp_path / "notes.txt", tmp_path / "status.json"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    assert StateDir(tmp_path, LAYOUT).open() is not None
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)


# ------------------------------------------------------------------ the writer thread


class FakeDisk:
    """A ``write_file`` for the writer: records what it writes and on which thread,
    fails with ENOSPC while ``full``, and can hold a write until released."""

    def __init__(self) -> None:
        self.full = False
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.written: list[int] = []
        self.threads: list[str] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def __call__(self, state_dir: Path, data: bytes) -> None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.started.set()
            assert self.hold.wait(10)
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            write_generation(state_dir, data)
            self.written.append(decode_checkpoint(data)["rounds_done"])
            self.threads.append(threading.current_thread().name)
        finally:
            with self.lock:
                self.active -= 1


def test_writes_run_in_a_worker_thread_one_at_a_time_newest_wins(tmp_path: Path) -> None:
    disk = FakeDisk()
    writer = CheckpointWriter(tmp_path, disk)
    disk.hold.clear()
    writer.submit(node_state(1))
    assert disk.started.wait(10)  # the first write is in progress, held
    for rounds in range(2, 6):
        writer.submit(node_state(rounds))  # each replaces the one waiting
    disk.hold.set()
    assert writer.wait(10)
    assert disk.written == [1, 5]
    assert disk.max_active == 1
    assert len(disk.threads) == 2
    assert all(name.startswith("p2pfl-checkpoint") for name in disk.threads), disk.threads
    assert decode_checkpoint((tmp_path / CHECKPOINT_NAME).read_bytes())["rounds_done"] == 5


def test_the_final_write_is_not_overtaken_by_one_in_flight(tmp_path: Path) -> None:
    disk = FakeDisk()
    writer = CheckpointWriter(tmp_path, disk)
    disk.hold.clear()
    writer.submit(node_state(1))
    assert disk.started.wait(10)
    writer.submit(node_state(2))  # waiting when the final one comes
    final = threading.Thread(target=writer.write_now, args=(node_state(3),))
    final.start()
    disk.hold.set()
    final.join(10)
    assert writer.wait(10)
    assert disk.written == [1, 3]
    assert decode_checkpoint((tmp_path / CHECKPOINT_NAME).read_bytes())["rounds_done"] == 3


def test_an_unchanged_state_is_not_written_twice(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path)
    assert writer.write_now(node_state(1))
    assert writer.write_now(node_state(2))
    assert not writer.write_now(node_state(2))  # e.g. the final write after the last round
    assert decode_checkpoint((tmp_path / PREVIOUS_NAME).read_bytes())["rounds_done"] == 1


def test_a_full_disk_is_reported_once_and_writing_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pfl.checkpoint")
    disk = FakeDisk()
    writer = CheckpointWriter(tmp_path, disk)
    writer.write_now(node_state(1))
    disk.full = True
    for rounds in range(2, 7):
        writer.submit(node_state(rounds))  # never raises into the caller
        assert writer.wait(10)
    assert disk.written == [1] and writer.health.errors_total == 5
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert str(tmp_path / CHECKPOINT_NAME) in errors[0]
    assert "No space left on device" in errors[0] and "training goes on" in errors[0]
    # the older generation is intact meanwhile
    assert decode_checkpoint((tmp_path / CHECKPOINT_NAME).read_bytes())["rounds_done"] == 1
    disk.full = False
    writer.submit(node_state(7))
    writer.submit(node_state(8))
    assert writer.wait(10)
    assert disk.written[-1] == 8
    again = [r.getMessage() for r in caplog.records if "written again" in r.getMessage()]
    assert len(again) == 1 and "5 failed attempts" in again[0], again
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_a_status_file_that_cannot_be_written_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfl.checkpoint")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    state = StateDir(blocker / "state", LAYOUT)  # every write fails (ENOTDIR)
    assert not state.write_json("status.json", {"round": 1})
    assert not state.write_json("status.json", {"round": 2})
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "status.json" in errors[0], errors


def test_a_generation_never_replaces_a_file_by_renaming_over_it(tmp_path, monkeypatch):
    """ext4 flushes a file renamed over another at once (auto_da_alloc): twice the CPU
    of the whole write, every round (issue 17). Every rename lands on a free name, and
    the generations still rotate: newest, then the one before it."""
    import os

    renames: list[tuple[str, bool]] = []
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        renames.append((Path(dst).name, Path(dst).exists()))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail("a rename over a file"))
    for rounds in range(1, 5):
        write_generation(tmp_path, encode_checkpoint(node_state(rounds)), sync=rounds == 1)
    assert renames and not any(over for _, over in renames), renames
    assert decode_checkpoint((tmp_path / CHECKPOINT_NAME).read_bytes())["rounds_done"] == 4
    assert decode_checkpoint((tmp_path / PREVIOUS_NAME).read_bytes())["rounds_done"] == 3


def test_a_generation_is_written_into_a_folder_that_is_not_there_yet(tmp_path):
    """The folder is made when the first write finds none (not looked up every write)."""
    state_dir = tmp_path / "gone" / "node"
    write_generation(state_dir, encode_checkpoint(node_state(1)), sync=False)
    assert decode_checkpoint((state_dir / CHECKPOINT_NAME).read_bytes())["rounds_done"] == 1
