"""Checkpoints of a node's state that cannot be lost, written off the event loop.

Why each part is there:

- **Two generations.** ``checkpoint.pt`` is the newest, ``checkpoint.prev.pt`` the one
  before it. A write goes to a temporary file in the same directory, is flushed to disk,
  and only then does the newest become the older and the new file the newest (two
  renames). A crash at any moment leaves at least one complete checkpoint; a newest one
  damaged at rest (a torn disk, a flipped bit, an editor) still leaves the older one.
- **Verified on load.** The file starts with a header line and a JSON line (format,
  SHA-256 and size of the payload, peer id, protocol, parameter count, rounds done); the
  payload is ``torch.save`` data read back with ``weights_only=True`` (tensors and plain
  data only: a tampered file cannot run code). A checkpoint is taken only if the checksum
  matches, every tensor is finite, and it fits this node: same peer id, same protocol,
  a parameter vector of the right length, the same data share. A damaged newest
  generation is reported at WARNING, naming the file and why, and the older one is used;
  if no generation can be used, :class:`CheckpointError` says so in one line (the CLI
  exits with status 2), rather than a traceback or a training thread that hangs.
- **Off the event loop.** Serialising, hashing and fsync-ing run in a worker thread
  (:class:`CheckpointWriter`): one write at a time, the newest state wins (a state
  superseded before its turn is never written), the final one at shutdown written
  synchronously.
- **A full disk does not stop training.** A write that fails (``ENOSPC`` or any other
  ``OSError``) is logged at ERROR once -- not every round -- and tried again with the
  next state; when a write succeeds again that is logged once too. ``status.json``'s
  failures are reported the same way (:meth:`StateDir.write_json`: written atomically
  on the loop, not fsync'd -- a report rewritten every round, not the state).
- **No litter.** Temporary files left by a process killed mid-write
  (``.checkpoint.pt.*``, ``.status.json.*``) are removed at start.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl.config import ConfigError
from p2pfl.errors import P2PFLError
from p2pfl.threadname import name_os_thread

__all__ = [
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "CheckpointError",
    "CheckpointWriter",
    "Damaged",
    "Layout",
    "StateDir",
    "clean_stale_temps",
    "decode_checkpoint",
    "encode_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "write_generation",
    "write_atomic",
    "write_json_atomic",
]

log = logging.getLogger("p2pfl.checkpoint")

CHECKPOINT_NAME = "checkpoint.pt"
#: the generation before the newest: what a node resumes from if the newest is damaged
PREVIOUS_NAME = "checkpoint.prev.pt"
#: the first line of every checkpoint file (the format's version is in the JSON line)
MAGIC = b"p2pfl-checkpoint\n"
FORMAT = 1
#: a header line longer than this is not ours (read no further into a garbage file)
MAX_HEADER = 4096
#: a damaged newest checkpoint is renamed with this suffix, out of the rotation
DAMAGED_SUFFIX = ".damaged"
#: prefixes of the temporary files of an interrupted write (``tempfile.mkstemp`` names)
STALE_PREFIXES = (f".{CHECKPOINT_NAME}.", f".{PREVIOUS_NAME}.", ".status.json.")


class CheckpointError(ConfigError):
    """No usable checkpoint in a state directory that has one: the node cannot resume.

    A state directory is the node's input as much as its configuration is, so this is a
    :class:`~p2pfl.config.ConfigError`: one line naming the file(s), exit status 2.
    """


class Damaged(P2PFLError):
    """One checkpoint file cannot be used; the message says why, in a few words."""


@dataclass(frozen=True)
class Layout:
    """What a checkpoint must fit to be this node's: ``None`` fields are not checked."""

    peer_id: str | None = None
    protocol: str | None = None
    #: elements of the protocol's parameter vector
    dim: int | None = None
    #: the sampler's ``(seed, batch_size, size)``: the same data share
    sampler: tuple[int, int, int] | None = None


# -- the file format ----------------------------------------------------------------------
def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """``state`` as a checkpoint file's bytes: magic line, JSON header line, payload."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    protocol = state.get("protocol") or {}
    params = protocol.get("params")
    header = {
        "format": FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "peer_id": protocol.get("peer_id"),
        "protocol": protocol.get("protocol"),
        "dim": int(params.numel()) if isinstance(params, torch.Tensor) else None,
        "rounds_done": state.get("rounds_done"),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode_checkpoint(data: bytes, layout: Layout | None = None) -> dict[str, Any]:
    """The state in a checkpoint file's bytes; :class:`Damaged` if it cannot be used."""
    if not data:
        raise Damaged("the file is empty (0 bytes)")
    if not data.startswith(MAGIC):
        raise Damaged("not a p2pfl checkpoint (no checkpoint header)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise Damaged("its header is cut off or not a checkpoint header")
    try:
        header = json.loads(data[len(MAGIC) : end])
    except ValueError:
        raise Damaged("its header is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise Damaged(f"unknown checkpoint format (expected format {FORMAT})")
    payload = data[end + 1 :]
    size = header.get("size")
    if len(payload) != size:
        raise Damaged(
            f"truncated or padded: {len(payload)} bytes of payload, the header says {size}"
        )
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise Damaged("checksum mismatch: the file was altered or torn")
    try:
        # weights_only: tensors and plain data, never objects that run code on load
        with warnings.catch_warnings():  # torch warns about odd pickles: the reason says it
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as error:  # torch's own message advises weights_only=False: never
        raise Damaged(
            f"its contents cannot be read as tensors and plain data ({type(error).__name__})"
        ) from None
    _check_state(state, layout or Layout())
    return state


def _check_state(state: Any, layout: Layout) -> None:
    """The parts a node relies on are there, finite, and fit ``layout``."""
    if not isinstance(state, dict):
        raise Damaged("its contents are not a node state")
    for key in ("protocol", "sampler", "neighbours", "rounds_done"):
        if key not in state:
            raise Damaged(f"no {key!r} in it")
    protocol = state["protocol"]
    if not isinstance(protocol, dict) or not isinstance(protocol.get("params"), torch.Tensor):
        raise Damaged("no parameter vector in it")
    rounds_done = state["rounds_done"]
    if not isinstance(rounds_done, int) or rounds_done < 0:
        raise Damaged(f"rounds_done is {rounds_done!r}, not a count")
    params: torch.Tensor = protocol["params"]
    if not params.is_floating_point() or params.dim() != 1:
        raise Damaged(f"the parameters are a {params.dtype} tensor of shape {tuple(params.shape)}")
    if layout.dim is not None and params.numel() != layout.dim:
        raise Damaged(f"{params.numel()} parameters, this model has {layout.dim}")
    if layout.peer_id is not None and protocol.get("peer_id") != layout.peer_id:
        raise Damaged(
            f"it belongs to peer {protocol.get('peer_id')}, this node is {layout.peer_id}"
        )
    if layout.protocol is not None and protocol.get("protocol") != layout.protocol:
        raise Damaged(
            f"it is a {protocol.get('protocol')!r} state, this node runs {layout.protocol!r}"
        )
    if layout.sampler is not None:
        sampler = state["sampler"]
        saved = (
            tuple(sampler.get(k) for k in ("seed", "batch_size", "size"))
            if isinstance(sampler, dict)
            else None
        )
        if saved != layout.sampler:
            raise Damaged(
                f"another data share or batch size: (seed, batch_size, size)={saved}, this node has {layout.sampler}"
            )
    where = _first_non_finite(state)
    if where is not None:
        raise Damaged(f"non-finite values (NaN or infinity) in {where}")


def _first_non_finite(value: Any, where: str = "") -> str | None:
    """The path of the first floating tensor holding NaN or infinity, if any."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return where or "the state"
        return None
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


#: leaves shared, not copied, by :func:`snapshot` (immutable)
_ATOMS = frozenset({int, float, str, bool, bytes, type(None)})


def snapshot(value: Any) -> Any:
    """A copy of a state that the event loop may go on mutating while a worker thread
    writes it: containers copied, tensors and arrays cloned, immutable leaves shared."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if (kind is tuple or kind is list) and _ATOMS.issuperset(map(type, value)):
        return value if kind is tuple else list(value)  # plain data (e.g. an RNG state)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snapshot(item) for item in value]
    if isinstance(value, tuple):
        return tuple(snapshot(item) for item in value)
    if isinstance(value, set | frozenset):
        return type(value)(value)
    return value


# -- writing --------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (not every file system can: then it is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` whole or not at all (temporary file, rename): a reader
    never sees half a file. ``sync``: on disk before the rename, so that a power cut
    cannot leave an empty file either (an fsync: about half a millisecond of CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_generation(state_dir: Path, data: bytes) -> Path:
    """Write a checkpoint file's bytes as the newest generation; the newest so far
    becomes the older one.

    The new file is complete on disk before either rename, so a crash between them
    leaves the older generation only, which the loader then uses.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    newest, previous = state_dir / CHECKPOINT_NAME, state_dir / PREVIOUS_NAME
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{CHECKPOINT_NAME}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if newest.exists():
            os.replace(newest, previous)
        os.replace(tmp, newest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(state_dir)
    return newest


def save_checkpoint(state_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as the newest generation, on this thread."""
    return write_generation(state_dir, encode_checkpoint(state))


def write_json_atomic(path: Path, value: Any, *, sync: bool = True) -> None:
    """``value`` as JSON (non-finite floats as ``null``: ``p2pfl.jsonsafe``), atomically."""
    from p2pfl.jsonsafe import dumps

    write_atomic(path, (dumps(value, indent=2) + "\n").encode(), sync=sync)


class WriteHealth:
    """Says once that writing a file fails, and once that it works again.

    A full disk fails every round; a line per round would bury everything else.
    """

    def __init__(self, path: Path, what: str, consequence: str) -> None:
        self.path = path
        self.what = what
        self.consequence = consequence
        self.failures = 0  # in a row
        self.errors_total = 0

    def failed(self, error: BaseException) -> None:
        self.errors_total += 1
        self.failures += 1
        if self.failures == 1:
            log.error(
                "cannot write the %s %s: %s; %s",
                self.what,
                self.path,
                _reason(error),
                self.consequence,
            )
        else:
            log.debug("writing %s failed again: %s", self.path, error)

    def succeeded(self) -> None:
        if self.failures:
            log.warning(
                "the %s %s is written again (after %d failed attempt%s)",
                self.what,
                self.path,
                self.failures,
                "" if self.failures == 1 else "s",
            )
        self.failures = 0


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} (errno {error.errno})"
    return f"{type(error).__name__}: {error}"


class CheckpointWriter:
    """Writes checkpoints in a worker thread: one at a time, the newest state wins.

    ``submit`` takes a snapshot on the caller's thread (cheap: copies, no serialising)
    and returns at once; a worker thread serialises, hashes, fsyncs and renames. A state
    submitted while another is being written replaces any state still waiting, so a slow
    disk never builds a queue. Every state carries a sequence number and a write of an
    older one after a newer one is skipped, so ``write_now`` (the final checkpoint, on the
    caller's thread) cannot be overtaken by a write still in flight. A state identical to
    the last one written (same checksum) is not written again, so that the older
    generation stays one state older. The worker is a ``ThreadPoolExecutor``'s, kept
    between rounds (no thread started per round) and joined when the process exits, so
    a write in progress is finished first.
    """

    def __init__(
        self, state_dir: Path, write: Callable[[Path, bytes], Any] = write_generation
    ) -> None:
        self.state_dir = state_dir
        self.write_file = write
        #: the header of the last file written (it holds the payload's checksum): a state
        #: identical to it is not written again, so the older generation stays older
        self._last_header = b""
        self.health = WriteHealth(
            state_dir / CHECKPOINT_NAME,
            "checkpoint",
            "training goes on and the next checkpoint tries again",
        )
        self._mutex = threading.Lock()  # guards the fields below
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._scheduled = False  # a drain is queued or running on the worker
        self._worker = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="p2pfl-checkpoint", initializer=name_os_thread
        )
        self._seq = 0
        self._write_lock = threading.Lock()  # one write at a time
        self._written_seq = 0
        self.written = 0
        #: set while no state is waiting or being written (tests and shutdown wait on it)
        self.idle = threading.Event()
        self.idle.set()

    def submit(self, state: dict[str, Any]) -> None:
        """Write ``state`` soon, off the caller's thread."""
        copy = snapshot(state)
        with self._mutex:
            self._seq += 1
            self._pending = (self._seq, copy)
            self.idle.clear()
            if self._scheduled:
                return  # the worker takes it next
            self._scheduled = True
        self._worker.submit(self._drain)

    def write_now(self, state: dict[str, Any]) -> bool:
        """Write ``state`` on this thread (after a write in flight); true if it was written."""
        copy = snapshot(state)
        with self._mutex:
            self._seq += 1
            seq = self._seq
            self._pending = None  # superseded
        return self._write(seq, copy)

    def wait(self, timeout: float) -> bool:
        """Wait until every submitted state is written or superseded; true if so."""
        return self.idle.wait(timeout)

    def _drain(self) -> None:
        while True:
            with self._mutex:
                item, self._pending = self._pending, None
                if item is None:
                    self._scheduled = False
                    self.idle.set()
                    return
            self._write(*item)

    def _write(self, seq: int, state: dict[str, Any]) -> bool:
        with self._write_lock:
            if seq <= self._written_seq:
                return False  # a newer state is already on disk
            try:
                data = encode_checkpoint(state)
                header = data[: data.index(b"\n", len(MAGIC))]
                if header == self._last_header:
                    self._written_seq = seq
                    return False  # the same state as on disk: keep the older generation
                self.write_file(self.state_dir, data)
            except Exception as error:  # ENOSPC, EIO, EROFS...: training goes on
                self.health.failed(error)
                return False
            self._last_header = header
            self._written_seq = seq
            self.written += 1
            self.health.succeeded()
            return True


# -- reading ----------------------------------------------------------------------------------
def clean_stale_temps(state_dir: Path) -> list[Path]:
    """Remove the temporary files of writes interrupted by a crash; the paths removed."""
    removed: list[Path] = []
    if not state_dir.is_dir():
        return removed
    for path in state_dir.iterdir():
        if path.name.startswith(STALE_PREFIXES) and path.is_file():
            try:
                path.unlink()
            except OSError as error:
                log.warning("cannot remove the stale temporary file %s: %s", path, _reason(error))
                continue
            removed.append(path)
    if removed:
        log.info(
            "removed %d temporary file%s left by an interrupted write in %s",
            len(removed),
            "" if len(removed) == 1 else "s",
            state_dir,
        )
    return removed


def _read(
    path: Path, layout: Layout | None, fits: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise Damaged(f"cannot be read: {_reason(error)}") from None
    state = decode_checkpoint(data, layout)
    if fits is not None:
        try:
            fits(state)
        except Exception as error:  # a state this node's protocol cannot take
            raise Damaged(
                f"does not fit this node's protocol ({type(error).__name__}: {error})"
            ) from None
    return state


def load_checkpoint(
    state_dir: Path,
    layout: Layout | None = None,
    fits: Callable[[dict[str, Any]], None] | None = None,
    *,
    set_aside: bool = False,
) -> dict[str, Any] | None:
    """The newest usable checkpoint in ``state_dir``, or ``None`` if there is none.

    ``layout`` and ``fits`` (a function that raises on a state this node cannot take)
    check that it is this node's. A damaged newest generation falls back to the older one
    with a WARNING (``set_aside``: the damaged file is renamed ``checkpoint.pt.damaged``,
    so that the next write keeps the good one as the older generation);
    :class:`CheckpointError` if checkpoints exist and none can be used.
    """
    newest, previous = state_dir / CHECKPOINT_NAME, state_dir / PREVIOUS_NAME
    problems: list[str] = []
    for path in (newest, previous):
        if not path.exists():
            continue
        try:
            state = _read(path, layout, fits)
        except Damaged as why:
            problems.append(f"{path}: {why}")
            continue
        if problems:
            kept = ""
            if set_aside:  # the next write must not rotate it over the good one
                kept = _set_aside(newest)
            log.warning(
                "checkpoint %s; resuming from the older generation %s (%d rounds done)%s",
                problems[0],
                path,
                state["rounds_done"],
                kept,
            )
        elif path == previous:
            log.info("no %s (a write was interrupted): resuming from %s", newest, path)
        return state
    if not problems:
        return None
    raise CheckpointError(
        f"no usable checkpoint: {'; '.join(problems)} "
        f"(move {state_dir} aside to start afresh, or restore a good checkpoint there)"
    )


def _set_aside(path: Path) -> str:
    """Rename a damaged checkpoint out of the rotation; the note for the log line."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    try:
        os.replace(path, target)
    except OSError as error:
        return f"; it could not be set aside ({_reason(error)})"
    return f"; the damaged file is kept as {target}"


class StateDir:
    """A node's state directory: its checkpoints (two generations) and ``status.json``."""

    def __init__(self, path: Path, layout: Layout | None = None, *, every: int = 1) -> None:
        self.path = path
        self.layout = layout
        self.every = every
        self.writer = CheckpointWriter(path)
        self._json_health: dict[str, WriteHealth] = {}

    def open(self, fits: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """At start: remove stale temporary files, then the verified checkpoint (or none)."""
        clean_stale_temps(self.path)
        return load_checkpoint(self.path, self.layout, fits, set_aside=True)

    def due(self, rounds_done: int) -> bool:
        """Whether the cadence (``checkpoint_every``) asks for a checkpoint now."""
        return rounds_done % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        """Checkpoint ``state`` in the background (the event loop goes on at once)."""
        self.writer.submit(state)

    def save_now(self, state: dict[str, Any]) -> bool:
        """Checkpoint ``state`` before returning (at shutdown); true if it was written."""
        return self.writer.write_now(state)

    def write_json(self, name: str, value: Any) -> bool:
        """Write ``name`` atomically; a failure is logged once, not raised (a node that
        cannot write its status still trains). True if it was written.

        Not fsync'd: a report rewritten every round, on the event loop, is not worth a
        disk flush each time (the checkpoint, the state itself, is flushed)."""
        health = self._json_health.get(name)
        if health is None:
            health = self._json_health[name] = WriteHealth(
                self.path / name, "status file", "training goes on and it is tried again"
            )
        try:
            write_json_atomic(self.path / name, value, sync=False)
        except OSError as error:
            health.failed(error)
            return False
        health.succeeded()
        return True
