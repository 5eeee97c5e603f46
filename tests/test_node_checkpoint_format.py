"""The lean node round's checkpoint (issue 17): format 3 (a JSON structure line and the
tensors' raw bytes instead of ``torch.save``; long integer sequences with the tensors),
read back exactly and refused when forged; format 2 and 1 files still read; the flush
cadence, whose invariant is that both generations were flushed to disk (file and rename),
so that a power cut never leaves only torn checkpoints; and the live records written
between generations on the caller's thread, from which a killed node resumes its last
round."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import p2pfl.checkpoint as checkpoint
from p2pfl.checkpoint import (
    CHECKPOINT_NAME,
    LIVE_NAMES,
    MAGIC,
    PREVIOUS_NAME,
    CheckpointWriter,
    Damaged,
    StateDir,
    decode_checkpoint,
    encode_checkpoint,
)
from tests.test_checkpoint import LAYOUT, node_state

pytestmark = pytest.mark.timeout(60)


def header_of(data: bytes) -> dict[str, Any]:
    end = data.index(b"\n", len(MAGIC))
    return json.loads(data[len(MAGIC) : end])


def with_payload(data: bytes, payload: bytes) -> bytes:
    """``data``'s header with a forged payload and a matching checksum."""
    header = header_of(data)
    header.update(sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    return MAGIC + json.dumps(header).encode() + b"\n" + payload


def test_format_3_reads_back_exactly_what_was_written() -> None:
    state = node_state(4)
    state["protocol"]["extra"] = {
        "mask": torch.tensor([True, False, True]),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "half": torch.linspace(0, 1, 5, dtype=torch.float16),
        "array": np.arange(4, dtype=np.float64),
        "nested": [(1, 2.5, None), ("x", [3, (4,)])],
        "empty": torch.zeros(0),
        # integer sequences: long ones travel as int64 bytes, unless a value needs more
        "ints": list(range(-40, 60)),
        "big": tuple([2**70] * 70),
        "flags": [True] * 70,  # bools are not ints here: JSON keeps them bools
        "short": (1, 2, 3),
    }
    state["accuracy"] = float("nan")
    data = encode_checkpoint(state)
    assert header_of(data)["format"] == 3
    back = decode_checkpoint(data, LAYOUT)
    assert back["protocol"]["rng"] == state["protocol"]["rng"]  # tuples stay tuples
    assert isinstance(back["protocol"]["rng"], tuple)
    assert torch.equal(back["protocol"]["params"], state["protocol"]["params"])
    extra, sent = back["protocol"]["extra"], state["protocol"]["extra"]
    for key in ("mask", "counts", "half", "empty"):
        assert extra[key].dtype == sent[key].dtype and torch.equal(extra[key], sent[key]), key
    assert extra["array"].dtype == np.float64 and np.array_equal(extra["array"], sent["array"])
    assert extra["nested"] == sent["nested"]
    for key in ("ints", "big", "flags", "short"):
        assert extra[key] == sent[key] and type(extra[key]) is type(sent[key]), key
        assert [type(v) for v in extra[key]] == [type(v) for v in sent[key]], key
    structure = data.split(b"\n")[2]  # magic, header, the payload's structure line
    assert structure.count(b"\\u0000ints") == 2  # the generator's state and "ints"
    assert back["accuracy"] != back["accuracy"]  # NaN
    assert {k: back[k] for k in ("sampler", "neighbours", "counters", "known", "rounds_done")} == {
        k: state[k] for k in ("sampler", "neighbours", "counters", "known", "rounds_done")
    }
    back["protocol"]["params"][0] = 7.0  # a private, writable copy
    assert encode_checkpoint(state) == data  # same state, same bytes (the writer dedupes)


def test_a_state_format_3_cannot_hold_is_written_as_format_1_and_read() -> None:
    state = node_state(2)
    state["counters"] = {3: 1.0}  # an int key: JSON would turn it into "3"
    data = encode_checkpoint(state)
    assert header_of(data)["format"] == 1
    assert decode_checkpoint(data, LAYOUT)["counters"] == {3: 1.0}


def test_a_format_2_file_of_an_older_version_is_still_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Format 2 is format 3 without integer sequences (the generator's state as JSON)."""
    state = node_state(5)
    with monkeypatch.context() as old:
        old.setattr(checkpoint, "FORMAT", 2)
        old.setattr(checkpoint, "INTS_FROM", 10**9)
        data = encode_checkpoint(state)
    assert header_of(data)["format"] == 2 and b"\\u0000ints" not in data
    back = decode_checkpoint(data, LAYOUT)
    assert back["protocol"]["rng"] == state["protocol"]["rng"]
    assert isinstance(back["protocol"]["rng"], tuple)
    # and an integer sequence in a format 2 file is a forgery: refused
    forged_file = encode_checkpoint(state).replace(b'"format": 3', b'"format": 2')
    with pytest.raises(Damaged, match="cannot be read as tensors and plain data"):
        decode_checkpoint(forged_file, LAYOUT)


def test_a_format_1_file_of_an_older_version_is_still_read() -> None:
    state = node_state(3)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = with_payload(encode_checkpoint(state), buffer.getvalue())
    data = data.replace(b'"format": 3', b'"format": 1')
    back = decode_checkpoint(data, LAYOUT)
    assert back["rounds_done"] == 3 and torch.equal(
        back["protocol"]["params"], state["protocol"]["params"]
    )


def forged(structure: Any, blob: bytes = b"") -> bytes:
    return json.dumps(structure).encode() + b"\n" + blob


@pytest.mark.parametrize(
    "payload",
    [
        forged({"protocol": {"\u0000tensor": ["float32", [4]]}}, b"\0" * 8),  # bytes missing
        forged({"protocol": {"\u0000tensor": ["float32", [1]]}}, b"\0" * 8),  # bytes left over
        forged({"protocol": {"\u0000tensor": ["object", [1]]}}, b"\0" * 8),  # not a dtype
        forged({"protocol": {"\u0000tensor": ["float32", [-1]]}}),
        forged({"protocol": {"\u0000pickle": "x"}}),  # an unknown tag
        forged({"protocol": {"\u0000tuple": 5}}),
        forged({"protocol": {"\u0000ints": ["tuple", 4]}}, b"\0" * 8),  # bytes missing
        forged({"protocol": {"\u0000ints": ["set", 1]}}, b"\0" * 8),  # not a sequence
        forged({"protocol": {"\u0000ints": ["list", -1]}}),
        forged({"protocol": {"\u0000ints": ["list", 1.0]}}, b"\0" * 8),
        b"no structure line at all",
        b"{not json\n",
    ],
)
def test_a_forged_format_3_payload_is_refused_in_one_line(payload: bytes) -> None:
    data = with_payload(encode_checkpoint(node_state(1)), payload)
    with pytest.raises(Damaged) as caught:
        decode_checkpoint(data, LAYOUT)
    message = str(caught.value)
    assert "\n" not in message
    assert "cannot be read as tensors and plain data" in message or "no " in message, message


# ------------------------------------------------------------------ the flush cadence


class Disk:
    """Watches fsync: which inodes were flushed (the rest may be torn by a power cut)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        #: (inode, mtime) of each file flushed: inode numbers alone are reused
        self.flushed: set[tuple[int, int]] = set()
        self.calls = 0
        real = os.fsync

        def fsync(fd: int) -> None:
            self.calls += 1
            stat = os.fstat(fd)
            self.flushed.add((stat.st_ino, stat.st_mtime_ns))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        #: once set, every rename into it is followed by a check of what would survive
        self.watched: Path | None = None
        self.violations: list[str] = []
        rename = os.replace

        def replace(src: Any, dst: Any) -> None:
            rename(src, dst)
            if self.watched is not None and not self.survivors(self.watched):
                self.violations.append(f"{Path(src).name} -> {Path(dst).name}")

        monkeypatch.setattr(os, "replace", replace)
        self.now = 1000.0

    def clock(self) -> float:
        """The writers' clock in these tests: moved by hand."""
        return self.now

    def survivors(self, state_dir: Path) -> list[int]:
        """rounds_done of each generation a power cut now would leave whole."""
        whole = []
        for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
            path = state_dir / name
            if path.exists() and (path.stat().st_ino, path.stat().st_mtime_ns) in self.flushed:
                whole.append(decode_checkpoint(path.read_bytes())["rounds_done"])
        return whole


def live_rounds(state_dir: Path) -> list[int | None]:
    """rounds_done of each live record (None: missing or not whole)."""
    rounds: list[int | None] = []
    for name in LIVE_NAMES:
        try:
            data = (state_dir / name).read_bytes()
            rounds.append(checkpoint._decode(data, None, live=True)[0]["rounds_done"])
        except (OSError, Damaged):
            rounds.append(None)
    return rounds


def loaded_rounds(state_dir: Path) -> int:
    state = StateDir(state_dir, LAYOUT).open()
    assert state is not None
    return int(state["rounds_done"])


def flushed_then_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Disk, CheckpointWriter, list[str]]:
    """A writer after a flushed generation of round 1 and live records of rounds 2-5 (within
    5 s of the flush); the names of the threads the live records were written on."""
    disk = Disk(monkeypatch)
    writer = CheckpointWriter(tmp_path, sync_every=5.0, clock=disk.clock)
    threads: list[str] = []
    real = os.pwritev

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        threads.append(threading.current_thread().name)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    writer.submit(node_state(1))  # the first write of a process: a flushed generation
    assert writer.wait(10)
    for rounds in range(2, 6):
        disk.now += 0.5
        writer.submit(node_state(rounds))
        assert writer.wait(10)
    return disk, writer, threads


def test_between_flushes_each_round_is_a_live_record_written_on_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk, writer, threads = flushed_then_live(tmp_path, monkeypatch)
    assert threads == [threading.current_thread().name] * 4  # no hand-off to the worker
    assert decode_checkpoint((tmp_path / CHECKPOINT_NAME).read_bytes())["rounds_done"] == 1
    assert not (tmp_path / PREVIOUS_NAME).exists()
    assert disk.survivors(tmp_path) == [1]  # the generations: flushed ones only
    assert sorted(r for r in live_rounds(tmp_path) if r is not None) == [4, 5]
    assert loaded_rounds(tmp_path) == 5  # a killed process resumes its last round
    calls = disk.calls
    disk.now += 5.0  # due: a flushed generation, in the worker
    writer.submit(node_state(6))
    assert writer.wait(10)
    assert disk.calls > calls and len(threads) == 4
    assert disk.survivors(tmp_path) == [6, 1]
    assert loaded_rounds(tmp_path) == 6  # the live records follow round 1: stale now
    disk.now += 0.5
    writer.submit(node_state(7))  # live again, after generation 6
    assert writer.wait(10)
    assert loaded_rounds(tmp_path) == 7 and len(threads) == 5


def test_a_live_record_torn_by_a_kill_leaves_the_other_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed_then_live(tmp_path, monkeypatch)
    newest = tmp_path / LIVE_NAMES[live_rounds(tmp_path).index(5)]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # half written
    assert loaded_rounds(tmp_path) == 4
    for name in LIVE_NAMES:  # both torn (a power cut): the flushed generation
        (tmp_path / name).write_bytes(b"p2pfl-checkpoint\n{")
    assert loaded_rounds(tmp_path) == 1


def test_a_live_record_is_taken_only_after_the_generation_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk, writer, _ = flushed_then_live(tmp_path, monkeypatch)
    kept = tmp_path / "kept.pt"
    shutil.copy(tmp_path / CHECKPOINT_NAME, kept)  # generation 1
    disk.now += 5.0
    writer.submit(node_state(6))  # generation 6; the live records (4, 5) follow 1
    assert writer.wait(10)
    disk.now += 0.5
    writer.submit(node_state(7))  # live, after 6
    assert writer.wait(10)
    assert sorted(r for r in live_rounds(tmp_path) if r is not None) == [5, 7]
    # the newest generation damaged: the older one (1), then the live record after it (5)
    damaged = bytearray((tmp_path / CHECKPOINT_NAME).read_bytes())
    damaged[-3] ^= 0xFF
    (tmp_path / CHECKPOINT_NAME).write_bytes(bytes(damaged))
    with caplog.at_level("INFO", logger="p2pfl.checkpoint"):
        assert loaded_rounds(tmp_path) == 5
    assert any("resuming from the older generation" in r.getMessage() for r in caplog.records)
    # a generation put back by hand (round 1 as the only one, after the records of 6 and
    # of 1 were written): the records after it are taken, no other
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME, CHECKPOINT_NAME + ".damaged"):
        (tmp_path / name).unlink(missing_ok=True)
    other = encode_checkpoint(node_state(3))  # a generation no record was written after
    (tmp_path / CHECKPOINT_NAME).write_bytes(other)
    assert loaded_rounds(tmp_path) == 3
    shutil.copy(kept, tmp_path / CHECKPOINT_NAME)
    assert loaded_rounds(tmp_path) == 5


def test_a_state_too_large_to_copy_on_the_callers_thread_goes_live_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint, "INLINE_BYTES", 1000)  # the digits-sized state is above it
    _, _, threads = flushed_then_live(tmp_path, monkeypatch)
    assert len(threads) == 4 and all(t.startswith("p2pfl-checkpoint") for t in threads), threads
    assert loaded_rounds(tmp_path) == 5


def test_a_live_record_over_a_longer_one_reads_back_without_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk, writer, _ = flushed_then_live(tmp_path, monkeypatch)
    big = node_state(6)
    big["counters"] = {f"counter{i}": float(i) for i in range(200)}  # a longer structure line
    for rounds in (6, 7):
        disk.now += 0.5
        writer.submit(big if rounds == 6 else node_state(rounds))
        assert writer.wait(10)
    disk.now += 0.5
    writer.submit(node_state(8))  # into the slot that held the large record of round 6
    assert writer.wait(10)
    assert sorted(r for r in live_rounds(tmp_path) if r is not None) == [7, 8]
    assert loaded_rounds(tmp_path) == 8


def test_a_power_cut_at_any_write_leaves_a_flushed_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(monkeypatch)
    rng = random.Random(17)
    writer = CheckpointWriter(tmp_path, sync_every=2.0, clock=disk.clock)
    newest_flushed = 0
    for rounds in range(1, 80):
        disk.now += rng.choice([0.05, 0.3, 1.0, 2.5])
        if rng.random() < 0.1:
            assert writer.write_now(node_state(rounds))
        else:
            writer.submit(node_state(rounds))
            assert writer.wait(10)
        survivors = disk.survivors(tmp_path)
        assert survivors, f"after round {rounds} only unflushed generations are left"
        disk.watched = tmp_path  # from now on, also between the two renames of a write
        assert not disk.violations, f"round {rounds}: a power cut after {disk.violations}"
        newest_flushed = max(survivors)
        # a power cut loses at most the rounds written since the last flush (2 s)
        assert writer._synced_at is not None
        assert disk.now - writer._synced_at < 2.0 + 1e-9
    assert newest_flushed >= 70


def test_the_node_default_flushes_at_a_cadence_and_a_bare_writer_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(monkeypatch)
    bare = CheckpointWriter(tmp_path / "bare")
    for rounds in range(1, 4):
        bare.submit(node_state(rounds))
        assert bare.wait(10)
    assert disk.survivors(tmp_path / "bare") == [3, 2]
    assert StateDir(tmp_path / "node").writer.sync_every == checkpoint.SYNC_EVERY_S > 0


def test_the_final_write_of_an_unchanged_state_still_flushes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(monkeypatch)
    writer = CheckpointWriter(tmp_path, sync_every=60.0, clock=disk.clock)
    writer.submit(node_state(1))  # the first write of a process: flushed
    assert writer.wait(10)
    writer.submit(node_state(2))  # a live record
    assert writer.wait(10)
    assert disk.survivors(tmp_path) == [1]
    assert writer.write_now(node_state(2))  # at shutdown: the same state, now flushed
    assert disk.survivors(tmp_path) == [2, 1]
    assert not writer.write_now(node_state(2))  # and not written a third time
    assert disk.survivors(tmp_path) == [2, 1]
