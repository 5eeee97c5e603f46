"""A single run's checkpoint: the whole simulation between two events, on disk, verified.

Written into the run folder (``checkpoint.bin``) every ``sim.checkpoint_every`` seconds of
wall time, at the moment the system's progress advances (just after that round's row, if
it is measured, reached ``metrics.csv``). ``p2pfl sim SCENARIO --out DIR --resume`` builds
the scenario again, reads the checkpoint back into it and runs on; because the snapshot is
the engine's state itself (queue, protocols, generators, arena rows at their places, see
``sim.snapshot``), the resumed run goes on exactly as the run that was never stopped, and
its ``metrics.csv`` and ``summary.json`` are those of that run but for wall-clock times.

The file: a magic line, a JSON header line (format, scenario signature, code
fingerprint, round), the snapshot, and a trailer line with the SHA-256 of everything
before it. It is written to a temporary name, synced, and renamed over the previous one:
a kill at any moment leaves the previous checkpoint or the new one, never a torn file;
a torn, foreign or edited file is refused (``CheckpointError``, one line) on reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from p2pfl.errors import P2PFLError
from sim.mixing import RowArena
from sim.scenario import Scenario
from sim.snapshot import SnapshotError, dumps_to, restore

if TYPE_CHECKING:
    from sim.runner import Simulation

log = logging.getLogger("p2pfl.sim")

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "Checkpointer",
    "RunProgress",
    "code_fingerprint",
    "read_checkpoint",
    "scenario_signature",
    "write_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.bin"
_MAGIC = b"P2PFL-SIM-CHECKPOINT\n"
_FORMAT = 1
_TRAILER = len("sha256:") + 64 + 1


class CheckpointError(P2PFLError, ValueError):
    """A checkpoint that cannot be written or resumed from; one line for the user."""


@dataclass
class RunProgress:
    """What ``run_simulation`` keeps outside the simulation: which rounds it measured, the
    last due round, and the wall seconds the run had taken when the checkpoint was made."""

    measured: set[int] = field(default_factory=set)
    last_due: int = 0
    elapsed: float = 0.0
    #: wall seconds since the evaluator was made (its rows' ``wall_time``)
    evaluator_elapsed: float = 0.0


def scenario_signature(scenario: Scenario) -> str:
    """What makes a resumed run the same run: the whole scenario but its checkpoint cadence."""
    text = scenario.model_dump_json(exclude={"sim": {"checkpoint_every"}})
    return hashlib.sha256(text.encode()).hexdigest()


_FINGERPRINT: list[str] = []


def code_fingerprint() -> str:
    """A hash of the simulator's and node library's source and of the versions of Python,
    torch, numpy and scipy: a snapshot refers to code (its closures by name and line) and
    holds those libraries' objects, so only the code that wrote it may read it."""
    if not _FINGERPRINT:
        import platform

        import numpy
        import scipy
        import torch

        versions = f"{platform.python_version()} {torch.__version__} {numpy.__version__} {scipy.__version__}"
        digest = hashlib.sha256(versions.encode())
        root = Path(__file__).resolve().parent.parent
        for package in ("p2pfl", "sim", "topologies"):
            for path in sorted((root / package).rglob("*.py")):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        _FINGERPRINT.append(digest.hexdigest())
    return _FINGERPRINT[0]


def static_objects(simulation: Simulation) -> dict[str, Any]:
    """Objects a fresh build of the same scenario has as they are, and that a run never
    changes: written as their names, taken from that build at load."""
    named: dict[str, Any] = {
        "scenario": simulation.scenario,
        "dataset": simulation.dataset,
        "trainer": simulation.trainer,
        "graph": simulation.graph,
        "evaluator.x_test": simulation.evaluator.x_test,
        "evaluator.y_test": simulation.evaluator.y_test,
        "executor.batch_trainer": simulation.engine.executor.batch_trainer,
    }
    for name, value in vars(simulation.dataset).items():
        named[f"dataset.{name}"] = value
    for name, value in vars(simulation.trainer).items():
        named[f"trainer.{name}"] = value
    if simulation.keyring is not None:
        named["keyring"] = simulation.keyring
        for name, identity in simulation.keyring.identities.items():
            named[f"identity.{name}"] = identity
    # values (numbers, strings, None) and containers are written as themselves: naming
    # the one ``None`` would name every ``None`` in the run (and pickle asks the hook that
    # names objects only of other objects than these)
    return {name: value for name, value in named.items() if not isinstance(value, _VALUES)}


_VALUES = (int, float, str, bytes, bool, type(None), tuple, frozenset, list, dict, set)


def _global_random() -> dict[str, Any]:
    """The process-wide random states. The simulator's own randomness is all in generators
    the snapshot holds, but a user's model may draw from torch's global one (dropout)."""
    import random

    import numpy
    import torch

    return {"torch": torch.get_rng_state(), "numpy": numpy.random.get_state(), "python": random.getstate()}


def _set_global_random(states: dict[str, Any]) -> None:
    import random

    import numpy
    import torch

    torch.set_rng_state(states["torch"])
    numpy.random.set_state(states["numpy"])
    random.setstate(states["python"])


def _arenas(simulation: Simulation) -> list[RowArena]:
    arena = getattr(simulation.engine.executor, "arena", None)
    return [arena] if isinstance(arena, RowArena) else []


class _HashingWriter:
    """A file that hashes what goes through it (the pickler streams into it)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self.handle.write(data)
        size = memoryview(data).nbytes
        self.written += size
        return size


def write_checkpoint(
    path: Path, simulation: Simulation, progress: RunProgress, *, round_: int
) -> int:
    """Write the checkpoint atomically (temporary file, fsync, rename, fsync of the folder);
    its size in bytes. ``SnapshotError`` if the simulation holds what cannot be kept."""
    header = {
        "format": _FORMAT,
        "scenario": scenario_signature(simulation.scenario),
        "code": code_fingerprint(),
        "round": round_,
        "rows": len(simulation.rows),
        "written_at": time.time(),
    }
    static = {id(value): name for name, value in static_objects(simulation).items()}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            writer = _HashingWriter(handle)
            writer.write(_MAGIC)
            writer.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            state = {"simulation": simulation, "progress": progress, "global_random": _global_random()}
            dumps_to(writer, state, static, _arenas(simulation))
            handle.write(b"sha256:" + writer.digest.hexdigest().encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            size = writer.written + _TRAILER
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return size


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The verified header of the checkpoint at ``path`` and where its snapshot starts.

    The whole file is hashed first, in pieces (a checkpoint of 10,000 peers is about two
    gigabytes: it is never held in memory twice)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(len(_MAGIC))
            if head != _MAGIC:
                raise CheckpointError(f"{path}: not a p2pfl sim checkpoint")
            if size < len(_MAGIC) + _TRAILER:
                raise CheckpointError(f"{path}: the checkpoint is damaged (torn: too short)")
            digest = hashlib.sha256(head)
            left = size - _TRAILER - len(_MAGIC)
            while left > 0:
                piece = handle.read(min(left, 1 << 24))
                if not piece:
                    break
                digest.update(piece)
                left -= len(piece)
            trailer = handle.read(_TRAILER)
            if left or trailer != b"sha256:" + digest.hexdigest().encode() + b"\n":
                raise CheckpointError(
                    f"{path}: the checkpoint is damaged (torn or edited: its SHA-256 does not match)"
                )
            handle.seek(len(_MAGIC))
            line = handle.readline(1 << 16)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({error.strerror or error})") from None
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found!r}, expected {_FORMAT}")
    return header, len(_MAGIC) + len(line)


def read_checkpoint(
    path: Path, scenario: Scenario, build: Callable[[], Simulation]
) -> tuple[Simulation, RunProgress]:
    """The simulation and run progress of the checkpoint at ``path``, read into a new
    build of ``scenario`` (``build()``, made only once the file is verified), whose
    unchanging parts (data set, trainer, graph, keys) it takes."""
    header, offset = read_header(path)
    if header.get("scenario") != scenario_signature(scenario):
        raise CheckpointError(
            f"{path}: the checkpoint is of another scenario (another file or --set); resume with the run's own"
        )
    if header.get("code") != code_fingerprint():
        raise CheckpointError(f"{path}: the checkpoint was written by another version of p2pfl's code")
    fresh = build()
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            state = restore(handle, static_objects(fresh))
    except Exception as error:  # noqa: BLE001 - whatever fails to load is a foreign checkpoint
        raise CheckpointError(f"{path}: the checkpoint cannot be read back ({type(error).__name__}: {error})") from None
    _set_global_random(state["global_random"])
    return state["simulation"], state["progress"]


#: the share of a run's wall time that checkpoints may take: after a checkpoint that took
#: ``t`` seconds, the next comes no sooner than ``t / CHECKPOINT_SHARE`` seconds later
#: (at 10,000 peers a checkpoint is ~1.9 GB and took 10-18 s on a loaded 2-core VM)
CHECKPOINT_SHARE = 0.05


class Checkpointer:
    """Writes the run's checkpoint at most every ``every`` wall seconds (0: never), and
    never so often that writing them takes more than ``CHECKPOINT_SHARE`` of the run.

    A simulation that holds something a snapshot cannot keep exactly (``SnapshotError``)
    is not checkpointed at all: the run goes on, says so once, and ``--resume`` later
    finds no checkpoint rather than a wrong one.
    """

    def __init__(self, path: Path, every: float) -> None:
        self.path = path
        self.every = every
        self.last = time.perf_counter()
        self.written = 0
        self.seconds = 0.0  # wall time spent writing checkpoints
        self.took = 0.0  # wall seconds the last one took
        self.size = 0  # bytes of the last one
        self.refusal: str | None = None

    def __call__(self, simulation: Simulation, round_: int, progress: RunProgress) -> None:
        if self.every <= 0 or self.refusal is not None:
            return
        if simulation.scenario.sim.device != "cpu":  # its rows live on the device
            self.refusal = "a run on sim.device = 'cuda' is not checkpointed"
            log.info("no checkpoints for this run (it cannot be resumed): %s", self.refusal)
            return
        if time.perf_counter() - self.last < max(self.every, self.took / CHECKPOINT_SHARE):
            return
        started = time.perf_counter()
        try:
            self.size = write_checkpoint(self.path, simulation, progress, round_=round_)
        except SnapshotError as error:
            self.refusal = str(error)
            log.warning("no checkpoints for this run (it cannot be resumed): %s", error)
            self.path.unlink(missing_ok=True)
            return
        except OSError as error:  # a full disk: the run goes on, the previous one stays
            log.warning("checkpoint at round %d not written (%s); the previous one stays", round_, error)
            self.last = time.perf_counter()
            return
        self.written += 1
        self.last = time.perf_counter()
        self.took = self.last - started
        self.seconds += self.took
        log.info("checkpoint at round %d: %.1f MB in %.2f s", round_, self.size / 1e6, self.last - started)

    def discard(self) -> None:
        """The run completed: its checkpoint has nothing left to resume."""
        self.path.unlink(missing_ok=True)
