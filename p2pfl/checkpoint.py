"""Checkpoints of a node's state that cannot be lost, written off the event loop.

Why each part is there:

- **Two generations.** ``checkpoint.pt`` is the newest, ``checkpoint.prev.pt`` the one
  before it. A write goes to a temporary file in the same directory and only then does
  the newest become the older and the new file the newest (two renames). A crash at any
  moment leaves at least one complete checkpoint; a newest one damaged at rest (a torn
  disk, a flipped bit, an editor) still leaves the older one.
- **Flushed to disk at a cadence, never torn.** A killed process cannot tear a file: the
  bytes are in the kernel's page cache before the rename, and a rename is atomic, so the
  newest generation is always whole. Only a power cut (or a kernel crash) can lose bytes
  not yet flushed. An fsync per round guards against that, at a third to a half of the
  writer's CPU (issue 17), so the node's writer flushes at most every
  :data:`SYNC_EVERY_S` seconds, and keeps this invariant instead: *the older generation, or the newest, is
  always one that was flushed* (file and rename). A write that is not flushed rotates
  only a flushed newest into the older place; while the newest is an unflushed one, the
  next unflushed write replaces it in place and the flushed older one stays. A flushed
  write first flushes the newest it is about to rotate. After a power cut the node
  therefore resumes from a checkpoint at most ``SYNC_EVERY_S`` seconds old (a newer,
  torn one is refused by its checksum and set aside), never from a torn one. The first
  write of a process and the final one at shutdown are always flushed.
- **Verified on load.** The file starts with a header line and a JSON line (format,
  SHA-256 and size of the payload, peer id, protocol, parameter count, rounds done); the
  payload (format 3) is one JSON line for the structure followed by the tensors' raw
  little-endian bytes, so that a round's checkpoint costs a JSON dump and a memory copy,
  not ``torch.save``'s zip archive and pickler (issue 17: 0.07 ms instead of 0.17 ms for
  the digits MLP's state). A long sequence of integers (a random generator's state: 625
  of them) travels with the tensors as 64-bit integers instead of as JSON numbers, which
  took more than half of a digits checkpoint's encoding (format 2 is format 3 without
  this, and still read). A state holding anything else than plain data, tuples,
  tensors and arrays of the usual dtypes is written as format 1, ``torch.save`` data,
  read back with ``weights_only=True``; files of every format are read, and none
  can run code on load. A checkpoint is taken only if the checksum matches, every
  tensor is finite, and it fits this node: same peer id, same protocol,
  a parameter vector of the right length, the same data share. A damaged newest
  generation is reported at WARNING, naming the file and why, and the older one is used;
  if no generation can be used, :class:`CheckpointError` says so in one line (the CLI
  exits with status 2), rather than a traceback or a training thread that hangs.
- **Off the event loop.** Writing, fsync-ing and renaming run in a worker thread
  (:class:`CheckpointWriter`): one write at a time, the newest state wins (a state
  superseded before its turn is never written), the final one at shutdown written
  synchronously. The state is serialised (format 3: ~0.05 ms for the digits MLP) and
  hashed on the caller's thread instead of being copied there for the worker to
  serialise: the copy is no longer needed, and the worker is left with system calls
  and almost no Python (issue 17).
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
import itertools
import json
import logging
import os
import tempfile
import threading
import time
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
    "SYNC_EVERY_S",
    "CheckpointError",
    "CheckpointWriter",
    "Damaged",
    "Layout",
    "StateDir",
    "clean_stale_temps",
    "decode_checkpoint",
    "encode_checkpoint",
    "fsync_dir",
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
FORMAT = 3
#: format 3 without its integer sequences (``_INTS``): still read
PLAIN_FORMAT = 2
#: ``torch.save`` payload: still read, and written for a state format 3 cannot hold
TORCH_FORMAT = 1
#: the node's writer flushes a checkpoint to disk (fsync) at most this many seconds apart
#: (see "Flushed to disk at a cadence" above); 0 flushes every write
SYNC_EVERY_S = 5.0
#: a header line longer than this is not ours (read no further into a garbage file)
MAX_HEADER = 4096
#: a damaged newest checkpoint is renamed with this suffix, out of the rotation
DAMAGED_SUFFIX = ".damaged"
#: prefixes of the temporary files of an interrupted write (status: ``tempfile.mkstemp``
#: names; checkpoints: ``.checkpoint.pt.<pid>-<n>``, see ``write_generation``)
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
    fmt = FORMAT
    try:
        payload = _pack_payload(state)
    except _Unpackable:  # something format 3 cannot hold: torch.save it
        fmt = TORCH_FORMAT
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
    protocol = state.get("protocol") or {}
    params = protocol.get("params")
    header = {
        "format": fmt,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "peer_id": protocol.get("peer_id"),
        "protocol": protocol.get("protocol"),
        "dim": int(params.numel()) if isinstance(params, torch.Tensor) else None,
        "rounds_done": state.get("rounds_done"),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


# -- format 3: a JSON line for the structure, then the tensors' bytes ----------------------
#: a JSON object with one of these keys stands for a tuple, a tensor, a numpy array or a
#: list or tuple of integers whose values are in the bytes (format 3 only)
_TUPLE, _TENSOR, _ARRAY, _INTS = "\x00tuple", "\x00tensor", "\x00array", "\x00ints"
#: a list or tuple of at least this many Python ints (all of them in int64's range) is
#: written as ``_INTS``: 8 bytes each, no JSON (a Mersenne Twister state: 625)
INTS_FROM = 64
#: the dtypes a tensor or array may have in format 3 (anything else: format 1)
_DTYPES: dict[str, tuple[torch.dtype, np.dtype[Any]]] = {
    name: (getattr(torch, name), np.dtype(name))
    for name in (
        "float32",
        "float64",
        "float16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    )
}
_TORCH_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_JSON_ATOMS = frozenset({int, float, str, bool, type(None)})


class _Unpackable(P2PFLError):
    """The state holds a value format 3 cannot represent exactly."""


def _pack_payload(state: dict[str, Any]) -> bytes:
    blobs: list[bytes] = []
    structure = json.dumps(_pack(state, blobs), separators=(",", ":")).encode()
    return b"".join([structure, b"\n", *blobs])


def _pack(value: Any, blobs: list[bytes]) -> Any:
    kind = type(value)
    if kind in _JSON_ATOMS:
        return value
    if kind is list or kind is tuple:
        kinds = set(map(type, value))
        if kinds == {int} and len(value) >= INTS_FROM:  # (bool is not int here: exact)
            try:
                blobs.append(np.array(value, dtype="<i8").tobytes())
            except OverflowError:  # an int beyond 64 bits: JSON holds it exactly
                pass
            else:
                return {_INTS: ["list" if kind is list else "tuple", len(value)]}
        items = (
            list(value)
            if _JSON_ATOMS.issuperset(kinds)  # plain data: no walk
            else [_pack(item, blobs) for item in value]
        )
        return items if kind is list else {_TUPLE: items}
    if kind is dict:
        if not all(type(key) is str and not key.startswith("\x00") for key in value):
            raise _Unpackable("a dict key that is not a plain string")
        return {key: _pack(item, blobs) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        name = _TORCH_NAMES.get(value.dtype)
        if name is None or value.layout != torch.strided or value.requires_grad:
            raise _Unpackable(f"a {value.dtype} tensor")
        data = (
            value.detach()
            .cpu()
            .contiguous()
            .numpy()
            .astype("<" + _DTYPES[name][1].str[1:], copy=False)
        )
        blobs.append(data.tobytes())
        return {_TENSOR: [name, list(value.shape)]}
    if isinstance(value, np.ndarray):
        name = value.dtype.name
        if name not in _DTYPES or value.dtype.byteorder not in "=<|":
            raise _Unpackable(f"a {value.dtype} array")
        blobs.append(np.ascontiguousarray(value).tobytes())
        return {_ARRAY: [name, list(value.shape)]}
    raise _Unpackable(f"a {kind.__name__}")


def _unpack_payload(payload: bytes, *, ints: bool = True) -> Any:
    """Format 3's state (``ints``), or format 2's (no ``_INTS``); ``ValueError`` for
    anything that is not exactly what :func:`_pack_payload` writes (the checksum matched:
    a bug or a forged file)."""
    end = payload.find(b"\n")
    if end < 0:
        raise ValueError("no structure line")
    structure = json.loads(payload[:end])
    blob = memoryview(payload)[end + 1 :]
    offset = [0]

    def take_bytes(dtype: np.dtype[Any], count: int) -> memoryview:
        size = dtype.itemsize * count
        start = offset[0]
        if start + size > len(blob):
            raise ValueError("tensor bytes past the end of the payload")
        offset[0] = start + size
        return blob[start : start + size]

    def take(spec: Any) -> np.ndarray:
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in _DTYPES):
            raise ValueError("a tensor entry that is not [dtype, shape]")
        name, shape = spec
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError("a tensor shape that is not a list of sizes")
        dtype = _DTYPES[name][1].newbyteorder("<")
        data = take_bytes(dtype, int(np.prod(shape, dtype=np.int64)))
        # a private, writable copy in native byte order
        return (
            np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)
        )

    def take_ints(spec: Any) -> list[int] | tuple[int, ...]:
        if not (
            ints
            and isinstance(spec, list)
            and len(spec) == 2
            and spec[0] in ("list", "tuple")
            and type(spec[1]) is int
            and spec[1] >= 0
        ):
            raise ValueError("an integer sequence that is not [list|tuple, count]")
        values = np.frombuffer(take_bytes(np.dtype("<i8"), spec[1]), dtype="<i8").tolist()
        return values if spec[0] == "list" else tuple(values)

    def unpack(value: Any) -> Any:
        if isinstance(value, list):
            return [unpack(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, item),) = value.items()
            if key == _TUPLE:
                if not isinstance(item, list):
                    raise ValueError("a tuple entry that is not a list")
                return tuple(unpack(x) for x in item)
            if key == _TENSOR:
                return torch.from_numpy(take(item))
            if key == _ARRAY:
                return take(item)
            if key == _INTS:
                return take_ints(item)
        if any(key.startswith("\x00") for key in value):
            raise ValueError("an unknown tagged entry")
        return {key: unpack(item) for key, item in value.items()}

    state = unpack(structure)
    if offset[0] != len(blob):
        raise ValueError("bytes left over after the last tensor")
    return state


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
    if not isinstance(header, dict) or header.get("format") not in (
        FORMAT, PLAIN_FORMAT, TORCH_FORMAT
    ):
        raise Damaged(
            f"unknown checkpoint format (expected format {FORMAT}, {PLAIN_FORMAT} or {TORCH_FORMAT})"
        )
    payload = data[end + 1 :]
    size = header.get("size")
    if len(payload) != size:
        raise Damaged(
            f"truncated or padded: {len(payload)} bytes of payload, the header says {size}"
        )
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise Damaged("checksum mismatch: the file was altered or torn")
    if header["format"] in (FORMAT, PLAIN_FORMAT):
        try:
            state = _unpack_payload(payload, ints=header["format"] == FORMAT)
        except (ValueError, TypeError, RecursionError) as error:
            raise Damaged(
                f"its contents cannot be read as tensors and plain data ({type(error).__name__})"
            ) from None
        _check_state(state, layout or Layout())
        return state
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


# -- writing --------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
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


#: numbers the temporary files of this process's checkpoint writes
_temp_ids = itertools.count()


def write_generation(
    state_dir: Path, data: bytes, *, sync: bool = True, rotate: bool = True, settle: bool = False
) -> Path:
    """Write a checkpoint file's bytes as the newest generation; the newest so far
    becomes the older one (``rotate``) or is replaced in place (not ``rotate``).

    ``sync``: the new file is complete on disk before either rename and the renames are
    flushed after them, so a power cut between them leaves the older generation, which
    the loader then uses. ``settle``: the newest so far is flushed before it is rotated
    (it was written without ``sync``). See "Flushed to disk at a cadence" above.
    """
    newest, previous = state_dir / CHECKPOINT_NAME, state_dir / PREVIOUS_NAME
    if settle:
        _fsync_file(newest)
    # a name of this process and write (mkstemp's random names cost more than the write),
    # with the prefix clean_stale_temps removes; O_EXCL: never someone else's file
    tmp = state_dir / f".{CHECKPOINT_NAME}.{os.getpid()}-{next(_temp_ids)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:  # no folder yet (or it was removed): made on demand, not
        state_dir.mkdir(parents=True, exist_ok=True)  # checked on every write
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        # Never a rename over an existing file: ext4 treats one as "replace by rename"
        # and pushes the new file's blocks to disk at once (auto_da_alloc), twice the CPU
        # of the whole write (issue 17: 0.12 ms vs 0.05 ms a write). The name is freed
        # first; a kill between the two steps leaves the other generation, as a kill
        # between the two renames always did.
        if rotate and newest.exists():  # (without a newest, the older one stays)
            previous.unlink(missing_ok=True)
            os.rename(newest, previous)
        elif not rotate:
            newest.unlink(missing_ok=True)
        os.rename(tmp, newest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(state_dir)
    return newest


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to disk; a missing file is nothing to flush."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    ``submit`` serialises and hashes the state on the caller's thread (what the caller
    mutates next is not in the bytes) and returns at once; a worker thread writes,
    fsyncs and renames. A state
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
        self,
        state_dir: Path,
        write: Callable[..., Any] = write_generation,
        *,
        sync_every: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_dir = state_dir
        #: called ``write(state_dir, data)`` for a flushed write that rotates (every write
        #: when ``sync_every`` is 0), else with ``write_generation``'s keywords
        self.write_file = write
        #: seconds between two flushed writes (0: every write is flushed)
        self.sync_every = sync_every
        self._clock = clock
        self._synced_at: float | None = None  # monotonic time of the last flushed write
        #: whether the newest generation on disk was flushed (false after a failed write);
        #: true at first: the first write is flushed and nothing of this process is older
        self._newest_synced = True
        #: the header of the last file written (it holds the payload's checksum): a state
        #: identical to it is not written again, so the older generation stays older
        self._last_header = b""
        self.health = WriteHealth(
            state_dir / CHECKPOINT_NAME,
            "checkpoint",
            "training goes on and the next checkpoint tries again",
        )
        self._mutex = threading.Lock()  # guards the fields below
        self._pending: tuple[int, bytes] | None = None
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

    def _encode(self, state: dict[str, Any]) -> bytes | None:
        try:
            return encode_checkpoint(state)
        except Exception as error:  # a state that cannot be serialised: reported, not raised
            self.health.failed(error)
            return None

    def submit(self, state: dict[str, Any]) -> None:
        """Write ``state`` soon; only its serialising happens on the caller's thread."""
        data = self._encode(state)
        if data is None:
            return
        with self._mutex:
            self._seq += 1
            self._pending = (self._seq, data)
            self.idle.clear()
            if self._scheduled:
                return  # the worker takes it next
            self._scheduled = True
        self._worker.submit(self._drain)

    def write_now(self, state: dict[str, Any]) -> bool:
        """Write ``state`` on this thread (after a write in flight); true if it was written."""
        data = self._encode(state)
        if data is None:
            return False
        with self._mutex:
            self._seq += 1
            seq = self._seq
            self._pending = None  # superseded
        return self._write(seq, data, final=True)

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

    def _write(self, seq: int, data: bytes, *, final: bool = False) -> bool:
        with self._write_lock:
            if seq <= self._written_seq:
                return False  # a newer state is already on disk
            try:
                header = data[: data.index(b"\n", len(MAGIC))]
                now = self._clock()
                if header == self._last_header:
                    self._written_seq = seq
                    if final and not self._newest_synced:  # on disk, not yet flushed
                        _fsync_file(self.state_dir / CHECKPOINT_NAME)
                        fsync_dir(self.state_dir)
                        self._newest_synced, self._synced_at = True, now
                    return False  # the same state as on disk: keep the older generation
                synced = (
                    final
                    or self.sync_every <= 0
                    or self._synced_at is None
                    or now - self._synced_at >= self.sync_every
                )
                if synced and (self._newest_synced or self.sync_every <= 0):
                    # (flushing every write, the newest on disk is a flushed one)
                    self.write_file(self.state_dir, data)
                elif synced:  # flush the unflushed newest before it becomes the older one
                    self.write_file(self.state_dir, data, settle=True)
                else:  # rotate only a flushed newest into the older place
                    self.write_file(self.state_dir, data, sync=False, rotate=self._newest_synced)
            except Exception as error:  # ENOSPC, EIO, EROFS...: training goes on
                self._newest_synced = False  # not known: the next flushed write settles it
                self.health.failed(error)
                return False
            self._newest_synced = synced
            if synced:
                self._synced_at = now
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

    def __init__(
        self,
        path: Path,
        layout: Layout | None = None,
        *,
        every: int = 1,
        sync_every: float = SYNC_EVERY_S,
    ) -> None:
        self.path = path
        self.layout = layout
        self.every = every
        self.writer = CheckpointWriter(path, sync_every=sync_every)
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
