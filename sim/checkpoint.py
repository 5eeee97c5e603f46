"""A single run's checkpoint: the whole simulation between two events, on disk, verified.

Written into the run folder (``checkpoint.bin``) every ``sim.checkpoint_every`` seconds of
wall time, at the moment the system's progress advances (just after that round's row, if
it is measured, reached ``metrics.csv``). ``p2pfl sim SCENARIO --out DIR --resume`` builds
the scenario again, reads the checkpoint back into it and runs on; because the snapshot is
the engine's state itself (queue, protocols, generators, arena rows at their places, see
``sim.snapshot``), the resumed run goes on exactly as the run that was never stopped, and
its ``metrics.csv`` and ``summary.json`` are those of that run but for wall-clock times.

The file: a magic line, a JSON header line (format, scenario signature, code and build
fingerprints, round), the snapshot, and a trailer line with an HMAC-SHA256 of everything
before it. It is written to a temporary name, synced, and renamed over the previous one:
a kill at any moment leaves the previous checkpoint or the new one, never a torn file;
a torn, foreign or edited file is refused (``CheckpointError``, one line) on reading.

Trust: the snapshot is a pickle, and reading a pickle runs whatever code its writer put
in it. A checksum stored in the same file proves nothing about who wrote it (anyone can
write a file and its SHA-256), and neither do the fingerprints in its header. So the
trailer is keyed: an HMAC under a secret of this user account (``checkpoint_key``,
``~/.config/p2pfl/checkpoint.key``, made on first use, mode 0600), checked before a
byte of the snapshot is read. A checkpoint from anyone else, a run folder received or
downloaded included, is refused; resuming on another machine means copying that key,
which trusts every checkpoint its holders write: loading a checkpoint is running code
from its author.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from p2pfl.checkpoint import fsync_dir
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
    "build_fingerprint",
    "checkpoint_key",
    "code_fingerprint",
    "read_checkpoint",
    "scenario_signature",
    "write_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.bin"
_MAGIC = b"P2PFL-SIM-CHECKPOINT\n"
_FORMAT = 2
_TAG = b"hmac-sha256:"
_TRAILER = len(_TAG) + 64 + 1
#: where the key that signs this account's checkpoints lives (``checkpoint_key``)
KEY_ENV = "P2PFL_CHECKPOINT_KEY"


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


def _factory_files(scenario: Scenario) -> list[Path]:
    """The source files of the user's factories the scenario names (``module:factory``,
    ``path/file.py:factory``: ``p2pfl.plugins``): code outside p2pfl that the fresh build
    runs and that the snapshot's functions may come from."""
    import sys

    found: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, str) and ":" in value:
            source = value.rpartition(":")[0]
            if source.endswith(".py") or "/" in source or "\\" in source:
                file: Path | None = Path(source).expanduser().resolve()
            else:
                file_name = getattr(sys.modules.get(source), "__file__", None)
                file = Path(file_name) if isinstance(file_name, str) else None
            if file is not None and file.is_file() and file not in found:
                found.append(file)

    walk(scenario.model_dump(mode="json"))
    return found


def build_fingerprint(simulation: Simulation) -> str:
    """A hash of what a resumed run takes from its fresh build rather than from the
    checkpoint (``static_objects``): the data set's arrays, the user's factory sources and
    the graph's edges.
    Another file behind the same ``data.dataset`` name, a re-downloaded data set or an
    edited model factory would otherwise go on silently with other data or code."""
    digest = hashlib.sha256()
    dataset = simulation.dataset
    for name in ("x_train", "y_train", "x_test", "y_test", "sources"):
        value = getattr(dataset, name, None)
        if value is None:
            digest.update(f"{name}:none;".encode())
            continue
        array = value.detach().cpu().contiguous().numpy() if hasattr(value, "detach") else value
        array = array if array.flags.c_contiguous else array.copy()
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    for file in _factory_files(simulation.scenario):
        digest.update(str(file).encode() + b"\0" + file.read_bytes())
    # the graph is built again too (networkx's generators may change between versions)
    edges = sorted(tuple(sorted((repr(u), repr(v)))) for u, v in simulation.graph.edges())
    digest.update(repr(edges).encode())
    return digest.hexdigest()


def _key_path() -> Path:
    configured = os.environ.get(KEY_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".config" / "p2pfl" / "checkpoint.key"


def checkpoint_key(*, create: bool) -> bytes:
    """This user account's secret that signs and checks checkpoints (see the module's
    "Trust"). Made on first use (``create``), 32 random bytes, readable by its owner only;
    ``CheckpointError`` if it is missing when reading, or readable by others."""
    import secrets

    path = _key_path()
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, secrets.token_hex(32).encode() + b"\n")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)  # atomic, and never over a key another process made
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    try:
        status = path.stat()
        text = path.read_text().strip()
    except OSError as error:
        raise CheckpointError(
            f"{path}: no checkpoint key ({error.strerror or error}); only checkpoints this user "
            f"account wrote are read (${KEY_ENV} names another key file)"
        ) from None
    if status.st_mode & 0o077 or (hasattr(os, "getuid") and status.st_uid != os.getuid()):
        raise CheckpointError(f"{path}: the checkpoint key must belong to you and be readable by you only (chmod 600)")
    if len(text) != 64:
        raise CheckpointError(f"{path}: not a checkpoint key (expected 64 hex digits)")
    return text.encode()


def _signer(key: bytes) -> Any:
    return hmac.new(key, digestmod=hashlib.sha256)


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


def _process_counters() -> dict[str, int]:
    """Process-wide counters the run's objects hold values of: MoDeST's view versions are
    unique across a process (its sample-order caches are keyed on them), so a resumed
    process must not hand out again versions the restored views already hold."""
    from p2pfl.protocols.modest import view

    return {"modest.view.versions": next(view._VERSIONS)}


def _set_process_counters(counters: dict[str, int]) -> None:
    from p2pfl.protocols.modest import view

    start = max(counters.get("modest.view.versions", 1), next(view._VERSIONS))
    view._VERSIONS = itertools.count(start)


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
    """A file that signs what goes through it (the pickler streams into it)."""

    def __init__(self, handle: BinaryIO, key: bytes) -> None:
        self.handle = handle
        self.digest = _signer(key)
        self.written = 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self.handle.write(data)
        size = memoryview(data).nbytes
        self.written += size
        return size


def write_checkpoint(
    path: Path, simulation: Simulation, progress: RunProgress, *, round_: int, build: str | None = None
) -> int:
    """Write the checkpoint atomically (temporary file, fsync, rename, fsync of the folder);
    its size in bytes. ``SnapshotError`` if the simulation holds what cannot be kept.
    ``build``: ``build_fingerprint(simulation)`` if known (it is the same all run long)."""
    key = checkpoint_key(create=True)
    header = {
        "format": _FORMAT,
        "scenario": scenario_signature(simulation.scenario),
        "code": code_fingerprint(),
        "build": build if build is not None else build_fingerprint(simulation),
        "round": round_,
        "rows": len(simulation.rows),
        "written_at": time.time(),
    }
    static = {id(value): name for name, value in static_objects(simulation).items()}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            writer = _HashingWriter(handle, key)
            writer.write(_MAGIC)
            writer.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            state = {
                "simulation": simulation,
                "progress": progress,
                "global_random": _global_random(),
                "counters": _process_counters(),
            }
            dumps_to(writer, state, static, _arenas(simulation))
            handle.write(_TAG + writer.digest.hexdigest().encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            size = writer.written + _TRAILER
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return size


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The verified header of the checkpoint at ``path`` and where its snapshot starts.

    The whole file's HMAC (this account's key) is checked first, in pieces (a checkpoint
    of 10,000 peers is about two gigabytes: it is never held in memory twice)."""
    key = checkpoint_key(create=False) if path.is_file() and _starts_with_magic(path) else b""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(len(_MAGIC))
            if head != _MAGIC:
                raise CheckpointError(f"{path}: not a p2pfl sim checkpoint")
            if size < len(_MAGIC) + _TRAILER:
                raise CheckpointError(f"{path}: the checkpoint is damaged (torn: too short)")
            digest = _signer(key)
            digest.update(head)
            left = size - _TRAILER - len(_MAGIC)
            while left > 0:
                piece = handle.read(min(left, 1 << 24))
                if not piece:
                    break
                digest.update(piece)
                left -= len(piece)
            trailer = handle.read(_TRAILER)
            expected = _TAG + digest.hexdigest().encode() + b"\n"
            if left or not hmac.compare_digest(trailer, expected):
                raise CheckpointError(
                    f"{path}: the checkpoint is damaged or not this account's (torn, edited, or "
                    f"signed by another key than {_key_path()}: its HMAC does not match); it is "
                    "not read, since loading a checkpoint runs code its writer chose"
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


def _starts_with_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


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
    if header.get("build") != build_fingerprint(fresh):
        raise CheckpointError(
            f"{path}: the checkpoint was made with other data or other factory code (data.dataset, "
            "model.name): its data set's arrays or the factory's source differ now"
        )
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            state = restore(handle, static_objects(fresh))
    except Exception as error:  # noqa: BLE001 - whatever fails to load is a foreign checkpoint
        raise CheckpointError(f"{path}: the checkpoint cannot be read back ({type(error).__name__}: {error})") from None
    _set_global_random(state["global_random"])
    _set_process_counters(state["counters"])
    return state["simulation"], state["progress"]


#: the share of a run's wall time that checkpoints may take: after a checkpoint that took
#: ``t`` seconds, the next comes no sooner than ``t / CHECKPOINT_SHARE`` seconds later
#: (at 10,000 peers a checkpoint is ~1.9 GB and took 10-18 s on a loaded 2-core VM)
CHECKPOINT_SHARE = 0.05
#: room left free on the disk beyond a checkpoint's size (``Checkpointer._room``)
DISK_MARGIN = 64 << 20


class Checkpointer:
    """Writes the run's checkpoint at most every ``every`` wall seconds (0: never), and
    never so often that writing them takes more than ``CHECKPOINT_SHARE`` of the run.

    A simulation that holds something a snapshot cannot keep exactly (``SnapshotError``)
    is not checkpointed at all: the run goes on, says so once, and ``--resume`` later
    finds no checkpoint rather than a wrong one. A checkpoint is a by-product: nothing
    that fails in writing one (a full disk, no key, the unforeseen) stops the run.
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
        self._build: str | None = None  # build_fingerprint: the same all run long
        self._short = False  # said that the disk is short of room (once until it has room)

    def __call__(self, simulation: Simulation, round_: int, progress: RunProgress) -> None:
        if self.every <= 0 or self.refusal is not None:
            return
        if simulation.scenario.sim.device != "cpu":  # its rows live on the device
            self.refusal = "a run on sim.device = 'cuda' is not checkpointed"
            log.info("no checkpoints for this run (it cannot be resumed): %s", self.refusal)
            return
        if time.perf_counter() - self.last < max(self.every, self.took / CHECKPOINT_SHARE):
            return
        if not self._room():
            self.last = time.perf_counter()
            return
        started = time.perf_counter()
        try:
            if self._build is None:
                self._build = build_fingerprint(simulation)
            self.size = write_checkpoint(self.path, simulation, progress, round_=round_, build=self._build)
        except OSError as error:  # a full disk: the run goes on, the previous one stays
            log.warning("checkpoint at round %d not written (%s); the previous one stays", round_, error)
            self.last = time.perf_counter()
            # a write that fails late (the disk filled up) costs as much as one that
            # succeeds: the next try keeps to the same share of the run
            self.took = self.last - started
            self.seconds += self.took
            return
        except SnapshotError as error:
            self.refusal = str(error)
            log.warning("no checkpoints for this run (it cannot be resumed): %s", error)
            self.path.unlink(missing_ok=True)
            return
        except Exception as error:  # noqa: BLE001 - no key, the unforeseen: never the run's end
            self.refusal = f"{type(error).__name__}: {error}"
            log.warning("no more checkpoints for this run (the last one stays): %s", self.refusal)
            return
        self.written += 1
        self.last = time.perf_counter()
        self.took = self.last - started
        self.seconds += self.took
        log.info("checkpoint at round %d: %.1f MB in %.2f s", round_, self.size / 1e6, self.last - started)

    def _room(self) -> bool:
        """Whether the disk has room for one more checkpoint beside the last one (the new
        one is written in full before it replaces the old). A write that would fill the
        disk is not started: filling it, even for the moment before the temporary file is
        removed, fails whatever else writes there (this run's metrics.csv, other runs)."""
        if not self.size:
            return True  # the first one: its size is not known yet
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return True
        needed = int(self.size * 1.1) + DISK_MARGIN
        if free >= needed:
            self._short = False
            return True
        if not self._short:
            log.warning(
                "checkpoint not written: %.0f MB free in %s, a checkpoint needs about %.0f MB "
                "(the previous one stays)", free / 1e6, self.path.parent, needed / 1e6,
            )
            self._short = True
        return False

    def discard(self) -> None:
        """The run completed: its checkpoint has nothing left to resume."""
        self.path.unlink(missing_ok=True)
