"""Review of single-run resume (helper v6): what a checkpoint must refuse, what a resumed
process must not reuse, and what must never stop a run.

- a forged checkpoint (anyone can write a file with its own SHA-256 and the right
  fingerprints) is refused before a byte of its pickle is read: loading it would run the
  forger's code (``sim.checkpoint``'s "Trust": the trailer is an HMAC under this
  account's key);
- other data or other factory code behind the same scenario is refused (the data set and
  the user's factories come from the fresh build, not from the checkpoint);
- MoDeST's view versions, unique across a process, continue past those the restored
  views hold (a new process started its counter at 1 again: a view could take a version
  its peer's sample-order cache holds for another membership);
- a checkpoint whose write fails unforeseen does not end the run, and a write that fails
  late (a full disk) is retried no more often than the 5% share allows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sim
import sim.checkpoint as checkpoint_module
from p2pfl.learning.datasets import clear_dataset_cache
from p2pfl.protocols.modest import view as view_module
from sim.checkpoint import (
    KEY_ENV,
    Checkpointer,
    CheckpointError,
    RunProgress,
    build_fingerprint,
    code_fingerprint,
    read_checkpoint,
    read_header,
    scenario_signature,
    write_checkpoint,
)
from sim.runner import build_simulation, run_simulation
from sim.scenario import Scenario, scenario_from_dict

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test signs with a key of its own (never the user's ~/.config one)."""
    key = tmp_path / "keys" / "checkpoint.key"
    monkeypatch.setenv(KEY_ENV, str(key))
    yield key


def _scenario(**changes: Any) -> Scenario:
    raw: dict[str, Any] = {
        "name": "v6",
        "seed": 5,
        "rounds": 4,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [8], "lr": 0.1},
        "topology": {"kind": "ring", "n": 6},
        "protocol": {"name": "dpsgd", "local_steps": 1},
        "sim": {"eval_every": 2, "threads": 1},
    }
    raw.update(changes)
    return scenario_from_dict(raw)


def _checkpoint(scenario: Scenario, path: Path) -> None:
    simulation = build_simulation(scenario)
    write_checkpoint(path, simulation, RunProgress(), round_=0)


# -- trust -----------------------------------------------------------------------------------


class _Payload:
    """What a forger puts in a checkpoint: loading it writes a file (here, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "the forger's code ran"))


def _forge(path: Path, scenario: Scenario, marker: Path, trailer: Any) -> None:
    """A checkpoint written without this account's key: a header with every fingerprint
    the reader compares (all computable from the scenario and the code), a pickle that
    runs code, and a trailer over the file made by ``trailer``."""
    header = {
        "format": checkpoint_module._FORMAT,
        "scenario": scenario_signature(scenario),
        "code": code_fingerprint(),
        "build": build_fingerprint(build_simulation(scenario)),
        "round": 1,
        "rows": 1,
        "written_at": 0.0,
    }
    body = checkpoint_module._MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
    body += pickle.dumps({"simulation": _Payload(marker)}, protocol=5)
    path.write_bytes(body + trailer(body))


@pytest.mark.parametrize("trailer", ["sha256", "hmac-other-key"])
def test_a_forged_checkpoint_runs_no_code(tmp_path: Path, trailer: str) -> None:
    scenario = _scenario()
    path, marker = tmp_path / "checkpoint.bin", tmp_path / "owned"
    _checkpoint(scenario, tmp_path / "own.bin")  # this account's key exists

    def sha256(body: bytes) -> bytes:  # what a checksum in the file itself can prove
        return b"sha256:" + hashlib.sha256(body).hexdigest().encode() + b"\n"

    def other_key(body: bytes) -> bytes:
        import hmac

        return b"hmac-sha256:" + hmac.new(b"0" * 64, body, "sha256").hexdigest().encode() + b"\n"

    _forge(path, scenario, marker, sha256 if trailer == "sha256" else other_key)
    with pytest.raises(CheckpointError, match="not this account's"):
        read_checkpoint(path, scenario, lambda: build_simulation(scenario))
    assert not marker.exists()


def test_a_checkpoint_of_another_account_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = _scenario()
    path = tmp_path / "checkpoint.bin"
    _checkpoint(scenario, path)
    read_header(path)  # its writer's key reads it
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "another" / "checkpoint.key"))
    _checkpoint(scenario, tmp_path / "theirs.bin")  # another account, its own key
    with pytest.raises(CheckpointError, match="not this account's"):
        read_header(path)


def test_a_key_others_can_read_is_refused(tmp_path: Path, _own_key: Path) -> None:
    scenario = _scenario()
    path = tmp_path / "checkpoint.bin"
    _checkpoint(scenario, path)
    assert _own_key.stat().st_mode & 0o777 == 0o600
    _own_key.chmod(0o644)
    with pytest.raises(CheckpointError, match="chmod 600"):
        read_header(path)


# -- what the fresh build brings -------------------------------------------------------------

_FACTORY = """
import numpy as np
from pathlib import Path

SCALE = {scale}

def load(seed, data_dir):
    with np.load(Path(data_dir) / "data.npz") as arrays:
        return {{k: arrays[k] * (SCALE if k.startswith("x") else 1) for k in arrays.files}}
"""


def _write_data(folder: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(
        folder / "data.npz",
        x_train=rng.normal(size=(60, 4)).astype(np.float32), y_train=rng.integers(0, 3, 60),
        x_test=rng.normal(size=(30, 4)).astype(np.float32), y_test=rng.integers(0, 3, 30),
    )  # fmt: skip


@pytest.mark.parametrize("change", ["data file", "factory code"])
def test_other_data_or_factory_code_behind_the_same_scenario_is_refused(tmp_path: Path, change: str) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    factory = folder / "data.py"
    factory.write_text(_FACTORY.format(scale=1.0))
    _write_data(folder, 1)
    scenario = _scenario(data={"dataset": f"{factory}:load", "data_dir": str(folder), "batch_size": 8})
    path = tmp_path / "checkpoint.bin"
    clear_dataset_cache()
    try:
        _checkpoint(scenario, path)
        restored, _ = read_checkpoint(path, scenario, lambda: build_simulation(scenario))  # unchanged: read
        assert restored.scenario == scenario
        if change == "data file":
            _write_data(folder, 2)
        else:
            factory.write_text(_FACTORY.format(scale=2.0))
        clear_dataset_cache()  # as a new process would load it
        with pytest.raises(CheckpointError, match="other data or other factory code"):
            read_checkpoint(path, scenario, lambda: build_simulation(scenario))
    finally:
        clear_dataset_cache()


# -- process-wide state ------------------------------------------------------------------------


def test_modest_view_versions_continue_past_the_restored_ones(tmp_path: Path) -> None:
    scenario = _scenario(
        topology={"kind": "complete", "n": 8},
        protocol={"name": "modest", "sample_size": 4, "num_aggregators": 1, "local_steps": 1},
        network={"mode": "overlay"},
        rounds=6,
        disruptions=[{"kind": "join", "peers": [6, 7], "at_round": 1}],  # membership changes
    )
    path = tmp_path / "checkpoint.bin"
    simulation = build_simulation(scenario)

    def at_round_three(simulation: Any, round_: int, state: RunProgress) -> None:
        if round_ == 3 and not path.exists():
            write_checkpoint(path, simulation, state, round_=round_)

    run_simulation(simulation, show_progress=False, on_checkpoint=at_round_three)
    assert path.exists()
    view_module._VERSIONS = itertools.count(1)  # a new process: the module imported afresh
    restored, _ = read_checkpoint(path, scenario, lambda: build_simulation(scenario))
    held = set()
    for protocol in restored.engine.protocols:
        inner: Any = getattr(protocol, "inner", protocol)
        held.add(inner.view.version)
        held.update(version for version, _ in inner._orders.values())
    fresh = next(view_module._VERSIONS)
    assert fresh > max(held), (fresh, max(held))


# -- what must not stop a run -------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def test_a_failed_write_counts_toward_the_share_and_the_unforeseen_stops_only_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(checkpoint_module, "time", clock)
    calls: list[str] = []

    def full_disk(*args: object, **kwargs: object) -> int:
        calls.append("disk")
        clock.now += 10.0  # a 1.9 GB write that filled the disk near its end
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", full_disk)
    monkeypatch.setattr(checkpoint_module, "build_fingerprint", lambda simulation: "build")
    checkpointer = Checkpointer(tmp_path / "checkpoint.bin", every=1.0)
    fake: Any = type("Fake", (), {"scenario": _scenario()})()
    clock.now = 2.0
    checkpointer(fake, 1, RunProgress())
    clock.now += 5.0
    checkpointer(fake, 2, RunProgress())  # 5 s after a 10 s failure: not again yet (5%: 200 s)
    assert calls == ["disk"]
    clock.now += 200.0
    checkpointer(fake, 3, RunProgress())
    assert calls == ["disk", "disk"]

    def broken(*args: object, **kwargs: object) -> int:
        calls.append("broken")
        raise RecursionError("maximum recursion depth exceeded while pickling an object")

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", broken)
    clock.now += 1000.0
    checkpointer(fake, 4, RunProgress())  # must not raise: the run goes on
    clock.now += 1000.0
    checkpointer(fake, 5, RunProgress())
    assert calls[-1:] == ["broken"] and calls.count("broken") == 1
    assert checkpointer.refusal is not None and "RecursionError" in checkpointer.refusal


def test_a_run_whose_checkpoint_fails_unforeseen_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> int:
        raise RuntimeError("an unforeseen failure while pickling")

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", broken)
    scenario = _scenario(sim={"eval_every": 2, "threads": 1, "checkpoint_every": 1e-9})
    result = sim.run(scenario, out_dir=tmp_path / "run", plots=False)
    assert result.summary["status"] == "completed" and result.rows[-1]["round"] == 4


def test_a_checkpoint_that_would_fill_the_disk_is_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The new checkpoint is written whole beside the old one: with less room than that,
    the write would fill the disk (failing whatever else writes there) before it failed."""
    clock = _Clock()
    monkeypatch.setattr(checkpoint_module, "time", clock)
    written: list[int] = []

    def write(*args: object, **kwargs: object) -> int:
        written.append(1)
        return 2_000_000_000

    free = [10**12]
    usage = type("Usage", (), {})

    def disk_usage(path: object) -> Any:
        result = usage()
        result.free = free[0]
        return result

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", write)
    monkeypatch.setattr(checkpoint_module, "build_fingerprint", lambda simulation: "build")
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", disk_usage)
    checkpointer = Checkpointer(tmp_path / "checkpoint.bin", every=1.0)
    fake: Any = type("Fake", (), {"scenario": _scenario()})()
    clock.now = 2.0
    checkpointer(fake, 1, RunProgress())
    assert written == [1] and checkpointer.size == 2_000_000_000
    free[0] = 1_500_000_000  # less than one more checkpoint
    with caplog.at_level("WARNING", logger="p2pfl.sim"):
        for round_ in (2, 3):
            clock.now += 100.0
            checkpointer(fake, round_, RunProgress())
    assert written == [1] and caplog.text.count("checkpoint not written") == 1
    free[0] = 10**12
    clock.now += 100.0
    checkpointer(fake, 4, RunProgress())
    assert written == [1, 1]
