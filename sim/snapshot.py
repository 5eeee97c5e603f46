"""Pickling a running simulation whole: closures, the mixer's classes and arena views.

A simulation between two events is an object graph: the engine's queue, every protocol's
state, the samplers' and network's random generators, the training executor's queue and
the arena of rows the protocols' tensors view. Plain ``pickle`` cannot write it, for three
reasons this module answers (``Snapshotter`` / ``restore``):

- *closures and nested functions* (a protocol's ``aggregate``, a disruption's scheduled
  action): written as a reference to their code (module, enclosing function, qualified
  name, first line) plus their cells' contents; the code itself comes from the source at
  load, so a snapshot is only read by the code that wrote it (``sim.checkpoint`` checks);
- *the mixer's classes* (``Mixer`` binds its own ``Row``/``PendingStack``/``PendingMix``
  subclasses): written as "that mixer's row type", made again when the mixer is;
- *aliasing*: hundreds of tensors view one arena buffer, and other tensors share storage
  (a chunk of settled means and the views of it). Each storage is written once and every
  tensor as (storage, offset, shape, strides), so views stay views; an arena is written as
  its live blocks only (the rows written but no longer viewed are free space), at the
  same buffer and row, so that a run resumed lays its rows out, and rounds its sums,
  exactly as the run that was never stopped.

Objects that are the same in a fresh build of the same scenario and that the run never
changes (the dataset, the shared trainer, the graph, the keys) are written as names
(``persistent_id``) and taken from that fresh build at load: a checkpoint holds state, not
the data set.

Anything this module does not know how to keep exact (a tensor on a GPU, a numpy view into
an arena, a class made at run time elsewhere) raises ``SnapshotError`` rather than being
written approximately.
"""

from __future__ import annotations

import pickle
import sys
import types
import weakref
from typing import Any

import numpy as np
import torch

from p2pfl.errors import P2PFLError
from sim.mixing import Mixer, PendingMix, PendingStack, Row, RowArena

__all__ = ["SnapshotError", "Snapshotter", "dumps_to", "restore"]


class SnapshotError(P2PFLError):
    """A simulation holds something a snapshot cannot keep exactly; one line."""


# -- functions ---------------------------------------------------------------------------


def _resolve(module: str, qualname: str) -> Any:
    """The object ``module.qualname`` names (through class ``__dict__``s), or ``None``."""
    target: Any = sys.modules.get(module)
    if target is None:
        try:
            __import__(module)
        except ImportError:
            return None
        target = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(target, "__dict__", {}).get(part)
        if found is None:
            return None
        target = found
    return target


#: per module, the code objects compiled from its source file, as (qualname, line) -> codes
_COMPILED: dict[str, dict[tuple[str, int], list[types.CodeType]]] = {}


def _module_codes(module: str) -> dict[tuple[str, int], list[types.CodeType]]:
    """Every code object of ``module``'s source, compiled again, by (qualname, first line).

    A nested function or lambda has no name to be imported by, and a module keeps no
    reference to its code once imported; compiled again from the same file (the checkpoint
    refuses other code, ``sim.checkpoint.code_fingerprint``) it is the same code.
    """
    known = _COMPILED.get(module)
    if known is not None:
        return known
    filename = getattr(sys.modules.get(module), "__file__", None)
    if not filename or not filename.endswith(".py"):
        raise SnapshotError(f"cannot keep a function of module {module}: it has no Python source")
    with open(filename, "rb") as handle:
        top = compile(handle.read(), filename, "exec", dont_inherit=True)
    found: dict[tuple[str, int], list[types.CodeType]] = {}
    stack, steps = [top], 0
    while stack and steps < 1_000_000:  # bounded: a module has thousands of code objects at most
        steps += 1
        current = stack.pop(0)
        for const in current.co_consts:
            if isinstance(const, types.CodeType):
                found.setdefault((const.co_qualname, const.co_firstlineno), []).append(const)
                stack.append(const)
    _COMPILED[module] = found
    return found


_EMPTY = "<p2pfl-sim-empty-cell>"


def _make_function(module: str, qualname: str, line: int, ordinal: int, cells: int) -> Any:
    matches = _module_codes(module).get((qualname, line), [])
    if ordinal >= len(matches):
        raise SnapshotError(f"function {module}.{qualname} (line {line}) is not in this version's code")
    code = matches[ordinal]
    closure = tuple(types.CellType() for _ in range(cells)) if cells else None
    return types.FunctionType(code, sys.modules[module].__dict__, code.co_name, None, closure)


def _set_function(function: Any, state: tuple[Any, ...]) -> None:
    contents, defaults, kwdefaults, attributes = state
    for cell, value in zip(function.__closure__ or (), contents, strict=True):
        if not (isinstance(value, str) and value == _EMPTY):
            cell.cell_contents = value
    function.__defaults__ = defaults
    function.__kwdefaults__ = kwdefaults
    function.__dict__.update(attributes)


def _reduce_function(function: types.FunctionType) -> Any:
    module, qualname = function.__module__, function.__qualname__
    if "<locals>" not in qualname and _resolve(module, qualname) is function:
        return NotImplemented  # importable by name: pickle's own reference
    if function.__globals__ is not getattr(sys.modules.get(module), "__dict__", None):
        raise SnapshotError(f"cannot keep function {module}.{qualname}: its globals are not its module's")
    code = function.__code__
    matches = _module_codes(module).get((code.co_qualname, code.co_firstlineno), [])
    ordinal = next((k for k, found in enumerate(matches) if found == code), None)
    if ordinal is None:
        raise SnapshotError(f"cannot keep function {module}.{qualname}: its code is not its source file's")
    contents = []
    for cell in function.__closure__ or ():
        try:
            contents.append(cell.cell_contents)
        except ValueError:
            contents.append(_EMPTY)
    cells = len(function.__closure__ or ())
    state = (contents, function.__defaults__, function.__kwdefaults__, dict(function.__dict__))
    args = (module, code.co_qualname, code.co_firstlineno, ordinal, cells)
    return _make_function, args, state, None, None, _set_function


# -- tensors and arrays -------------------------------------------------------------------


def _storage_bytes(storage: torch.UntypedStorage) -> pickle.PickleBuffer:
    raw = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()  # a view: no copy
    return pickle.PickleBuffer(raw.data)


class _Blob:
    """One tensor storage, written once however many tensors view it."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.storage = storage

    def __reduce__(self) -> Any:
        return _load_blob, (_storage_bytes(self.storage),)


def _load_blob(data: Any) -> torch.Tensor:
    buffer = bytearray(data) if not isinstance(data, bytearray) else data
    if not buffer:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def _tensor_on(
    base: torch.Tensor, dtype: torch.dtype, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(base.untyped_storage(), offset, size, stride)


def _load_tensor(
    base: torch.Tensor,
    dtype: torch.dtype,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    cls: type,
    requires_grad: bool,
) -> torch.Tensor:
    tensor = _tensor_on(base, dtype, offset, size, stride)
    if cls is torch.nn.Parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    if cls is not torch.Tensor:
        tensor = tensor.as_subclass(cls)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _set_attributes(target: Any, state: dict[str, Any]) -> None:
    target.__dict__.update(state)


def _arena_block(arena: RowArena, ident: int, first: int) -> torch.Tensor:
    blocks: dict[tuple[int, int], torch.Tensor] = arena.__dict__["_restoring"]
    return blocks[(ident, first)]


def _load_arena_view(
    arena: RowArena,
    ident: int,
    first: int,
    dtype: torch.dtype,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    cls: type,
) -> torch.Tensor:
    tensor = _tensor_on(_arena_block(arena, ident, first), dtype, offset, size, stride)
    return tensor if cls is torch.Tensor else tensor.as_subclass(cls)


#: arenas made by the load in progress (their strong block references go when it ends)
_RESTORED: list[RowArena] = []


def _new_arena(
    dim: int,
    capacity: int,
    keep_idle: int,
    counters: tuple[int, int],
    high_water: dict[int, int],
    shapes: dict[int, int],
    blocks: dict[int, list[tuple[int, int, Any]]],
) -> RowArena:
    """The arena as written: same buffers, same live blocks at the same rows.

    The blocks' tensors are held strongly (``_restoring``) until the load ends, so that
    the rows read back can view them; then only their weak references stay, as in a run.
    """
    arena = RowArena(dim, capacity, keep_idle=keep_idle)
    arena._next_id, arena.allocated = counters
    arena.high_water = dict(high_water)
    restoring: dict[tuple[int, int], torch.Tensor] = {}
    for ident, rows in shapes.items():
        buffer = np.empty((rows, dim), dtype=np.float32)
        arena.buffers[ident] = buffer
        arena._blocks[ident] = []
        for first, end, data in blocks.get(ident, []):
            view = buffer[first:end]
            view.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
            arena._blocks[ident].append((first, end, weakref.ref(view)))
            restoring[(ident, first)] = torch.from_numpy(view)
    arena.__dict__["_restoring"] = restoring
    _RESTORED.append(arena)
    return arena


def _new_mixer(cls: type[Mixer], arena: RowArena, chunk: int) -> Mixer:
    return cls(arena, chunk=chunk)


def _set_mixer(mixer: Mixer, state: dict[str, Any]) -> None:
    pending: list[PendingMix] = state.pop("_pending")
    spent: list[tuple[int, PendingMix]] = state.pop("_spent")
    mixer.__dict__.update(state)
    mixer._pending = {id(mix): mix for mix in pending}
    mixer._spent = [(generation, weakref.ref(mix)) for generation, mix in spent]


def _new_mix(mixer: Mixer) -> torch.Tensor:
    return PendingStack._new(mixer.mix_type, (mixer.dim,))


def _set_deferred(tensor: torch.Tensor, state: tuple[tuple[int, ...], dict[str, Any]]) -> None:
    shape, attributes = state
    if tuple(tensor.shape) != shape:  # a stack's height is its number of rows
        raise SnapshotError(f"a deferred stack read back with shape {tuple(tensor.shape)}, expected {shape}")
    tensor.__dict__.update(attributes)


def _new_stack(mixer: Mixer, rows: int) -> torch.Tensor:
    return PendingStack._new(mixer.stack_type, (rows, mixer.dim))


def _mapping_proxy(mapping: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(mapping)


def _np_view(root: np.ndarray, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.ndarray(shape, dtype=dtype, buffer=root, offset=offset, strides=strides)


# -- the pickler -----------------------------------------------------------------------------


class Snapshotter(pickle.Pickler):
    """Writes a simulation's object graph; ``static`` names objects taken from a fresh build."""

    def __init__(self, file: Any, static: dict[int, str]) -> None:
        super().__init__(file, protocol=5)
        self.static = static
        self._blobs: dict[tuple[int, int], _Blob] = {}
        self._arenas: list[tuple[RowArena, list[tuple[int, int, int, set[int]]]]] = []
        self._mixer_types: dict[type, tuple[Mixer, str]] = {}


    # The arena's address map: which block (buffer, first row) a storage pointer starts.
    def _arena_of(self, pointer: int) -> tuple[RowArena, int, int] | None:
        for arena, spans in self._arenas:
            for start, end, ident, starts in spans:
                if start <= pointer < end:
                    first, rest = divmod(pointer - start, arena.dim * 4)
                    if rest or first not in starts:
                        raise SnapshotError("a tensor views arena memory that is not one of its live blocks")
                    return arena, ident, first
        return None

    def _register_arena(self, arena: RowArena) -> None:
        if any(known is arena for known, _ in self._arenas):
            return
        spans = []
        for ident, buffer in arena.buffers.items():
            start = buffer.__array_interface__["data"][0]
            live = {first for first, _, ref in arena._blocks[ident] if ref() is not None}
            spans.append((start, start + buffer.nbytes, ident, live))
        self._arenas.append((arena, spans))

    def _reduce_arena(self, arena: RowArena) -> Any:
        self._register_arena(arena)
        shapes = {ident: int(buffer.shape[0]) for ident, buffer in arena.buffers.items()}
        blocks: dict[int, list[tuple[int, int, Any]]] = {}
        for ident in arena.buffers:
            live = []
            for first, end, ref in arena._blocks[ident]:
                view = ref()
                if view is not None:
                    live.append((first, end, pickle.PickleBuffer(np.ascontiguousarray(view).reshape(-1).view(np.uint8).data)))
            blocks[ident] = live
        args = (
            arena.dim, arena.capacity, arena.keep_idle, (arena._next_id, arena.allocated),
            dict(arena.high_water), shapes, blocks,
        )
        state = {"reclaim": arena.reclaim}
        return _new_arena, args, state, None, None, _set_attributes

    def _reduce_mixer(self, mixer: Mixer) -> Any:
        self._register_arena(mixer.arena)
        for kind in ("row_type", "stack_type", "mix_type"):
            self._mixer_types[getattr(mixer, kind)] = (mixer, kind)
        skip = {"row_type", "stack_type", "mix_type", "arena", "dim", "chunk"}
        state = {k: v for k, v in mixer.__dict__.items() if k not in skip}
        state["_pending"] = list(mixer._pending.values())
        state["_spent"] = [(g, ref()) for g, ref in mixer._spent if ref() is not None]
        return _new_mixer, (type(mixer), mixer.arena, mixer.chunk), state, None, None, _set_mixer

    def _reduce_tensor(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, PendingStack | PendingMix):
            mixer: Mixer = tensor._mixer
            self._reduce_mixer_types(mixer)
            kind = "stack_type" if isinstance(tensor, PendingStack) else "mix_type"
            attributes = dict(tensor.__dict__)
            if kind == "stack_type":
                return _new_stack, (mixer, int(tensor.shape[0])), (tuple(tensor.shape), attributes), None, None, _set_deferred
            return _new_mix, (mixer,), (tuple(tensor.shape), attributes), None, None, _set_deferred
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            raise SnapshotError(f"cannot keep a {tensor.device.type} {tensor.layout} tensor")
        if tensor.grad_fn is not None:
            raise SnapshotError("cannot keep a tensor that is part of an autograd graph")
        cls = type(tensor)
        if isinstance(tensor, Row):
            self._reduce_mixer_types(tensor._mixer)
        elif cls not in (torch.Tensor, torch.nn.Parameter):
            raise SnapshotError(f"cannot keep a tensor of class {cls.__qualname__}")
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        size, stride, offset = tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset()
        attributes = dict(tensor.__dict__)
        found = self._arena_of(pointer) if pointer else None
        if found is not None:
            arena, ident, first = found
            args = (arena, ident, first, tensor.dtype, offset, size, stride, cls)
            return _load_arena_view, args, attributes, None, None, _set_attributes
        if isinstance(tensor, Row):
            raise SnapshotError("a row that views no arena block")
        key = (pointer, storage.nbytes())
        blob = self._blobs.get(key)
        if blob is None:
            blob = self._blobs[key] = _Blob(storage)
        args2 = (blob, tensor.dtype, offset, size, stride, cls, tensor.requires_grad)
        return _load_tensor, args2, attributes, None, None, _set_attributes

    def _reduce_mixer_types(self, mixer: Mixer) -> None:
        for kind in ("row_type", "stack_type", "mix_type"):
            self._mixer_types[getattr(mixer, kind)] = (mixer, kind)

    def _reduce_array(self, array: np.ndarray) -> Any:
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        for arena, _ in self._arenas:
            if any(root is buffer for buffer in arena.buffers.values()):
                raise SnapshotError("a numpy array views the arena (only tensors may)")
        if root is array or not root.flags.c_contiguous or array.dtype.hasobject:
            return NotImplemented
        offset = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        return _np_view, (root, offset, array.shape, array.strides, array.dtype)

    def reducer_override(self, obj: Any) -> Any:  # noqa: C901 - one dispatch on type
        # (not ``persistent_id``: pickle asks that of every int and string too, a million
        # calls a checkpoint at 1,000 peers; this hook is not asked of atoms)
        name = self.static.get(id(obj))
        if name is not None:
            return _static, (name,)
        if isinstance(obj, torch.Tensor):
            return self._reduce_tensor(obj)
        if isinstance(obj, np.ndarray):
            return self._reduce_array(obj)
        if isinstance(obj, types.FunctionType):
            return _reduce_function(obj)
        if isinstance(obj, RowArena):
            return self._reduce_arena(obj)
        if isinstance(obj, Mixer):
            return self._reduce_mixer(obj)
        if isinstance(obj, type):
            known = self._mixer_types.get(obj)
            if known is None and "_mixer" in obj.__dict__:
                mixer = obj.__dict__["_mixer"]
                self._reduce_mixer_types(mixer)
                known = self._mixer_types.get(obj)
            if known is not None:
                return getattr, known
            return NotImplemented
        if isinstance(obj, types.MappingProxyType):  # a frozen mapping (an attack's params)
            return _mapping_proxy, (dict(obj),)
        if isinstance(obj, weakref.ReferenceType):
            raise SnapshotError("cannot keep a weak reference outside the arena and mixer")
        return NotImplemented


#: the objects of the fresh build the load in progress takes by name
_STATIC: dict[str, Any] = {}


def _static(name: str) -> Any:
    try:
        return _STATIC[name]
    except KeyError:
        raise SnapshotError(f"the snapshot names {name!r}, which this build does not have") from None


def restore(file: Any, static: dict[str, Any]) -> Any:
    """The object graph ``dumps_to`` wrote into ``file`` (read from where it stands), with
    ``static`` names resolved."""
    _RESTORED.clear()
    _STATIC.clear()
    _STATIC.update(static)
    try:
        return pickle.Unpickler(file).load()
    finally:
        for arena in _RESTORED:
            arena.__dict__.pop("_restoring", None)  # only the weak references stay
        _RESTORED.clear()
        _STATIC.clear()


def dumps_to(file: Any, obj: Any, static: dict[int, str], arenas: list[RowArena]) -> None:
    """Write ``obj`` into ``file`` with a ``Snapshotter`` that knows ``arenas`` (every arena
    the graph holds: a tensor may view one before the arena itself is reached)."""
    pickler = Snapshotter(file, static)
    for arena in arenas:
        pickler._register_arena(arena)
    try:
        pickler.dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise SnapshotError(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
