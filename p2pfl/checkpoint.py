"""Checkpoints of a node's state that cannot be lost, flushed off the event loop.

Why each part is there:

- **Two generations, flushed.** ``checkpoint.pt`` is the newest, ``checkpoint.prev.pt``
  the one before it. A write goes to a temporary file in the same directory, is flushed
  to disk (fsync), and only then does the newest become the older and the new file the
  newest (two renames, flushed too). A crash or a power cut at any moment leaves at
  least one complete checkpoint; a newest one damaged at rest (a torn disk, a flipped
  bit, an editor) still leaves the older one.
- **Every round, live, between generations.** An fsync per round costs a third to a
  half of the writer's CPU, and a file created, written and renamed per round more
  than the round's learning spends on it (issue 17), so the node's writer writes a
  generation at most every :data:`SYNC_EVERY_S` seconds (and as its first and its final
  write); each round's state in between goes into one of two *live* files
  (``checkpoint.live.0.pt``, ``.1.pt``), each overwritten in place, the older of the two
  each time: one ``pwritev`` into the page cache on the caller's thread, no file created,
  renamed or flushed, no thread woken. A live record is a checkpoint file whose header
  also names the generation it was written after (that generation's payload checksum)
  and a count that orders the two. A killed process cannot lose what it wrote (the
  kernel holds it) and a kill in the middle of a live write leaves the other live
  record, a round older; the loader takes the newest whole live record written after
  the generation it resumes from, so a killed node resumes from its last round. Only a
  power cut (or a kernel crash) can lose or tear live records; the node then resumes
  from its newest flushed generation, at most ``SYNC_EVERY_S`` seconds old (a torn
  record is refused by its checksum), never from a torn one. A live record written
  after another generation (an older run's, a generation restored by hand) is never
  taken.
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
- **Off the event loop.** A generation's write, fsync and renames run in a worker thread
  (:class:`CheckpointWriter`): one write at a time, the newest state wins (a state
  superseded before its turn is never written), the final one at shutdown written
  synchronously. The state is serialised (format 3: ~0.05 ms for the digits MLP) and
  hashed on the caller's thread, so what the caller mutates next is not in the bytes; a
  live record (a copy into the page cache) is written there too, up to
  :data:`INLINE_BYTES`, and by the worker above it.
- **A full disk does not stop training.** A write that fails (``ENOSPC`` or any other
  ``OSError``) is logged at ERROR once -- not every round -- and tried again with the
  next state; when a write succeeds again that is logged once too. A generation that
  fails leaves the state as a live record instead (into the room reserved for it), so
  a node killed on a full disk still resumes its last round. ``status.json``'s
  failures are reported the same way (:meth:`StateDir.write_json`: written atomically
  on the loop, not fsync'd -- a report rewritten every round, not the state).
- **No litter.** Temporary files left by a process killed mid-write
  (``.checkpoint.pt.*``, ``.status.json.*``) are removed at start.
"""

from __future__ import annotations

import concurrent.futures
import errno
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
import weakref
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
    "LIVE_NAMES",
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
#: (see "Every round, live, between generations" above); 0 flushes every write
SYNC_EVERY_S = 5.0
#: the two files a round's state is written into between flushed generations
#: (:class:`_LiveSlots`)
LIVE_NAMES = ("checkpoint.live.0.pt", "checkpoint.live.1.pt")
#: a state up to this size is written into a live slot on the caller's thread (a copy into
#: the page cache: ~10 us for the digits MLP); a larger one by the worker
INLINE_BYTES = 1 << 20
#: buffers in one ``pwritev`` at most (the kernel's limit is 1024)
_MAX_PIECES = 256
#: ``posix_fallocate`` errors of a file system that cannot reserve room (not a full one)
_CANNOT_RESERVE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
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
    return _encode(state).file_bytes()


@dataclass(frozen=True)
class _Encoded:
    """A state serialised: its header and its payload, kept in pieces (the structure line,
    then each tensor's bytes) so that a write hands them to the kernel without joining."""

    #: format, sha256 and size of the payload, peer_id, protocol, dim, rounds_done
    header: dict[str, Any]
    pieces: tuple[bytes, ...]

    @property
    def sha256(self) -> str:
        return str(self.header["sha256"])

    def head(self, **extra: Any) -> bytes:
        """The magic line and the header line (with ``extra`` keys, for a live record)."""
        return MAGIC + json.dumps({**self.header, **extra}, sort_keys=True).encode() + b"\n"

    def file_bytes(self) -> bytes:
        return b"".join((self.head(), *self.pieces))


def _encode(state: dict[str, Any]) -> _Encoded:
    fmt = FORMAT
    try:
        pieces = _pack_payload(state)
    except _Unpackable:  # something format 3 cannot hold: torch.save it
        fmt = TORCH_FORMAT
        buffer = io.BytesIO()
        torch.save(state, buffer)
        pieces = (buffer.getvalue(),)
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    protocol = state.get("protocol") or {}
    params = protocol.get("params")
    header = {
        "format": fmt,
        "sha256": digest.hexdigest(),
        "size": sum(map(len, pieces)),
        "peer_id": protocol.get("peer_id"),
        "protocol": protocol.get("protocol"),
        "dim": int(params.numel()) if isinstance(params, torch.Tensor) else None,
        "rounds_done": state.get("rounds_done"),
    }
    return _Encoded(header, pieces)


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


def _pack_payload(state: dict[str, Any]) -> tuple[bytes, ...]:
    """Format 3's payload in pieces: the structure line, then the tensors' bytes."""
    blobs: list[bytes] = []
    structure = json.dumps(_pack(state, blobs), separators=(",", ":")).encode()
    return (structure + b"\n", *blobs)


def _pack(value: Any, blobs: list[bytes]) -> Any:
    kind = type(value)
    if kind in _JSON_ATOMS:
        return value
    if kind is list or kind is tuple:
        count = len(value)
        # exactly ints (bool is not int here), counted by identity: quicker than a set
        if count >= INTS_FROM and list(map(type, value)).count(int) == count:
            try:
                blobs.append(np.fromiter(value, dtype="<i8", count=count).tobytes())
            except OverflowError:  # an int beyond 64 bits: JSON holds it exactly
                pass
            else:
                return {_INTS: ["list" if kind is list else "tuple", count]}
        kinds = set(map(type, value))
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
    return _decode(data, layout)[0]


def _decode(
    data: bytes, layout: Layout | None, *, live: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state in a checkpoint file's bytes and the file's header; ``live``: a live
    record, which the rest of the file follows (:class:`_LiveSlots`)."""
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
    if live and type(size) is int and 0 <= size <= len(payload):
        payload = payload[:size]
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
        return state, header
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
    return state, header


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


def write_generation(state_dir: Path, data: bytes, *, sync: bool = True) -> Path:
    """Write a checkpoint file's bytes as the newest generation; the newest so far
    becomes the older one.

    ``sync``: the new file is complete on disk before either rename and the renames are
    flushed after them, so a power cut between them leaves the older generation, which
    the loader then uses (the node's writer always syncs; see "Two generations,
    flushed" above).
    """
    newest, previous = state_dir / CHECKPOINT_NAME, state_dir / PREVIOUS_NAME
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
        if newest.exists():  # (without a newest, the older one stays)
            previous.unlink(missing_ok=True)
            os.rename(newest, previous)
        os.rename(tmp, newest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(state_dir)
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
    """Writes checkpoints: a round's state into a live slot at once, a flushed generation
    at a cadence in a worker thread; the newest state wins.

    ``submit`` serialises and hashes the state on the caller's thread (what the caller
    mutates next is not in the bytes). When no flush is due and the worker is idle, the
    bytes go into the next live slot right there: one ``pwritev`` into the page cache of a
    file kept open, no thread woken (issue 17: the hand-off and the temporary file, write
    and renames of each round cost more than the round's own learning spent on them).
    Otherwise the worker takes them: a flushed generation (written, fsync'd, rotated), or
    a live slot for a state too large to copy on the caller's thread. A state submitted
    while the worker is busy replaces any state still waiting, so a slow disk never builds
    a queue. Every state carries a sequence number and a write of an older one after a
    newer one is skipped, so ``write_now`` (the final checkpoint, on the caller's thread,
    always a flushed generation) cannot be overtaken by a write still in flight. A state
    identical to the last one written (same checksum) is not written again, so that the
    older generation stays one state older. The worker is a ``ThreadPoolExecutor``'s, kept
    between rounds and joined when the process exits, so a write in progress is finished
    first.
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
        #: called ``write(state_dir, data)`` for each flushed generation
        self.write_file = write
        #: seconds between two flushed generations (0: every write is one)
        self.sync_every = sync_every
        self._clock = clock
        self._synced_at: float | None = None  # monotonic time of the last generation
        #: the payload checksum of the newest generation this writer wrote: the base of the
        #: live records written after it (none yet: the next write is a generation)
        self._generation: str | None = None
        #: the payload checksum of the last state written, live or generation
        self._last = ""
        self._live = _LiveSlots(state_dir)
        self.health = WriteHealth(
            state_dir / CHECKPOINT_NAME,
            "checkpoint",
            "training goes on and the next checkpoint tries again",
        )
        #: the live records' own: a full disk that fails the generations but not them
        #: (their room is reserved) must not say "written again" every round
        self.live_health = WriteHealth(
            state_dir / "checkpoint.live.{0,1}.pt",
            "live checkpoint",
            "training goes on, resumable from the last flushed generation",
        )
        self._mutex = threading.Lock()  # guards the fields below
        self._pending: tuple[int, _Encoded] | None = None
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

    def _encode(self, state: dict[str, Any]) -> _Encoded | None:
        try:
            return _encode(state)
        except Exception as error:  # a state that cannot be serialised: reported, not raised
            self.health.failed(error)
            return None

    def _flush_due(self) -> bool:
        """Whether the next write must be a flushed generation."""
        return (
            self._generation is None
            or self.sync_every <= 0
            or self._synced_at is None
            or self._clock() - self._synced_at >= self.sync_every
        )

    def submit(self, state: dict[str, Any]) -> None:
        """Write ``state`` soon: into a live slot at once when that is all it needs,
        else in the worker."""
        encoded = self._encode(state)
        if encoded is None:
            return
        with self._mutex:
            self._seq += 1
            inline = (
                not self._scheduled
                and encoded.header["size"] <= INLINE_BYTES
                and not self._flush_due()
            )
            if not inline:
                self._pending = (self._seq, encoded)
                self.idle.clear()
                if self._scheduled:
                    return  # the worker takes it next
                self._scheduled = True
            seq = self._seq
        if inline:
            self._write(seq, encoded, flush=False)
        else:
            self._worker.submit(self._drain)

    def write_now(self, state: dict[str, Any]) -> bool:
        """Write ``state`` as a flushed generation on this thread (after a write in
        flight); true if it was written. The live slots' files are closed after it."""
        encoded = self._encode(state)
        if encoded is None:
            return False
        with self._mutex:
            self._seq += 1
            seq = self._seq
            self._pending = None  # superseded
        try:
            return self._write(seq, encoded, flush=True)
        finally:
            self._live.close()

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
            self._write(*item, flush=self._flush_due())

    def _write(self, seq: int, encoded: _Encoded, *, flush: bool) -> bool:
        with self._write_lock:
            if seq <= self._written_seq:
                return False  # a newer state is already on disk
            sha = encoded.sha256
            if sha == self._last and (not flush or sha == self._generation):
                self._written_seq = seq
                return False  # the same state as on disk: keep the older generation
            if not flush and self._generation is not None:
                return self._write_live(seq, encoded)
            now = self._clock()
            data = encoded.file_bytes()
            try:
                self.write_file(self.state_dir, data)
            except Exception as error:  # ENOSPC, EIO, EROFS...: training goes on
                self.health.failed(error)
                if self._generation is not None and self.sync_every > 0:
                    # a full disk: the state as a live record all the same, into the room
                    # reserved for it, so that a killed node still resumes its last round
                    self._write_live(seq, encoded)
                return False
            self.health.succeeded()
            self._generation, self._synced_at = sha, now
            self._wrote(seq, sha)
            if self.sync_every > 0:
                self._reserve_live(len(data) + 256)  # (its header also names a base)
            return True

    def _write_live(self, seq: int, encoded: _Encoded) -> bool:
        """The state as a live record after the newest generation; true if written."""
        try:
            self._live.write(encoded, base=str(self._generation))
        except Exception as error:  # ENOSPC, EIO, EROFS...: training goes on
            self.live_health.failed(error)
            return False
        self.live_health.succeeded()
        self._wrote(seq, encoded.sha256)
        return True

    def _wrote(self, seq: int, sha: str) -> None:
        self._last = sha
        self._written_seq = seq
        self.written += 1

    def _reserve_live(self, size: int) -> None:
        try:
            self._live.reserve(size)
        except OSError as error:  # the live writes try again, and say so if they fail
            log.debug("cannot reserve room for the live checkpoints: %s", _reason(error))


class _LiveSlots:
    """The two live files a round's state is written into between flushed generations.

    Each write overwrites the older of the two in place (``pwritev`` at offset 0 of a file
    kept open), so that a process killed in the middle of one leaves the other whole. A
    record is a checkpoint file whose header also names its ``base`` (the payload checksum
    of the generation it was written after) and a ``live`` count that orders the two; what
    follows it in the file (the rest of a longer record, or room reserved) is not read
    (see :func:`load_checkpoint`). Room for a record and a quarter more is reserved in
    both files when a generation is written (``reserve``), so that a disk that fills up
    later still takes each round's record: it only overwrites blocks it holds. Nothing
    here is flushed: a power cut can tear both, and the flushed generation is what is
    left then.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._fds: list[int | None] = [None, None]
        self._room = [0, 0]  # bytes reserved in each file
        self._count = 0
        self._closer = weakref.finalize(self, _close_fds, self._fds)

    def reserve(self, size: int) -> None:
        """Open both files and reserve room for a record of ``size`` bytes and more."""
        for slot in (0, 1):
            self._reserve(slot, size)

    def write(self, encoded: _Encoded, *, base: str) -> None:
        self._count += 1
        slot = self._count % 2
        head = encoded.head(base=base, live=self._count)
        size = len(head) + encoded.header["size"]
        fd = self._reserve(slot, size)
        pieces = [head, *encoded.pieces]
        if len(pieces) > _MAX_PIECES:  # (a state of many tensors: one buffer)
            pieces = [b"".join(pieces)]
        done = os.pwritev(fd, pieces, 0)
        if done < size:  # a short write (a signal, a nearly full disk): the rest, in one
            rest = b"".join(pieces)[done:]
            while rest:
                rest = rest[os.pwrite(fd, rest, size - len(rest)) :]

    def _reserve(self, slot: int, size: int) -> int:
        fd = self._fds[slot]
        if fd is None:
            path = self.state_dir / LIVE_NAMES[slot]
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:  # no folder yet (or it was removed)
                self.state_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, flags, 0o600)
            self._fds[slot] = fd
            self._room[slot] = os.fstat(fd).st_size
        if size > self._room[slot]:
            room = size + size // 4 + 4096
            try:
                os.posix_fallocate(fd, 0, room)
            except OSError as error:  # a file system that cannot: the write allocates
                if error.errno not in _CANNOT_RESERVE:
                    raise
            self._room[slot] = room
        return fd

    def close(self) -> None:
        _close_fds(self._fds)


def _close_fds(fds: list[int | None]) -> None:
    for slot, fd in enumerate(fds):
        if fd is not None:
            fds[slot] = None
            try:
                os.close(fd)
            except OSError:
                pass


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
    path: Path,
    layout: Layout | None,
    fits: Callable[[dict[str, Any]], None] | None,
    *,
    live: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state in the checkpoint file ``path`` and its header; :class:`Damaged` if it
    cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise Damaged(f"cannot be read: {_reason(error)}") from None
    state, header = _decode(data, layout, live=live)
    if fits is not None:
        try:
            fits(state)
        except Exception as error:  # a state this node's protocol cannot take
            raise Damaged(
                f"does not fit this node's protocol ({type(error).__name__}: {error})"
            ) from None
    return state, header


def load_checkpoint(
    state_dir: Path,
    layout: Layout | None = None,
    fits: Callable[[dict[str, Any]], None] | None = None,
    *,
    set_aside: bool = False,
) -> dict[str, Any] | None:
    """The newest usable checkpoint in ``state_dir``, or ``None`` if there is none.

    The newest usable generation, then the newest live record written after it, if any
    (:class:`_LiveSlots`). ``layout`` and ``fits`` (a function that raises on a state
    this node cannot take) check that it is this node's. A damaged newest generation falls
    back to the older one with a WARNING (``set_aside``: the damaged file is renamed
    ``checkpoint.pt.damaged``, so that the next write keeps the good one as the older
    generation); :class:`CheckpointError` if generations exist and none can be used.
    """
    newest, previous = state_dir / CHECKPOINT_NAME, state_dir / PREVIOUS_NAME
    problems: list[str] = []
    for path in (newest, previous):
        if not path.exists():
            continue
        try:
            state, header = _read(path, layout, fits)
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
        live = _newest_live(state_dir, path, state, header, layout, fits)
        return live if live is not None else state
    if not problems:
        return None
    raise CheckpointError(
        f"no usable checkpoint: {'; '.join(problems)} "
        f"(move {state_dir} aside to start afresh, or restore a good checkpoint there)"
    )


def _newest_live(
    state_dir: Path,
    generation_path: Path,
    generation: dict[str, Any],
    generation_header: dict[str, Any],
    layout: Layout | None,
    fits: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any] | None:
    """The newest whole live record written after the generation read from
    ``generation_path`` (its header names that generation's checksum as its base), or
    ``None``. A record written after another generation (an older run's, or one since
    replaced) is stale, and a torn one (a process killed while writing it) is refused by
    its checksum: neither is used."""
    best: tuple[int, dict[str, Any], Path] | None = None
    for name in LIVE_NAMES:
        path = state_dir / name
        if not path.exists():
            continue
        try:
            state, header = _read(path, layout, fits, live=True)
        except Damaged as why:
            log.info("live checkpoint %s not used: %s", path, why)
            continue
        count = header.get("live")
        if (
            header.get("base") != generation_header.get("sha256")
            or type(count) is not int
            or state["rounds_done"] < generation["rounds_done"]
        ):
            continue  # written after another generation
        if best is None or count > best[0]:
            best = (count, state, path)
    if best is None:
        return None
    _, state, path = best
    log.info(
        "resuming from %s (%d rounds done), written after %s (%d rounds done)",
        path,
        state["rounds_done"],
        generation_path,
        generation["rounds_done"],
    )
    return state


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
