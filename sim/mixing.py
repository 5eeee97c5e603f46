"""Deferred mixing: thousands of peers' weighted means computed as a few sparse products.

D-PSGD and Epidemic Learning end every round with ``torch.stack([own, *received])``
followed by ``weights @ stack`` (or ``stack.mean(0)``). Run eagerly for 10,000 peers, that
copies five 100 KB rows per peer into a fresh stack and runs 10,000 small matrix-vector
products: about twice the memory traffic of the one sparse product ``W @ X`` that computes
the same thing, plus the per-call overhead. The simulator keeps the protocols unchanged and
defers the arithmetic instead:

- training results come back to the protocols as *rows*: ordinary tensors (rows of a
  pooled buffer) except that ``torch.stack`` of rows returns a ``PendingStack``, which
  holds references to the rows and no data;
- the weighted mean or mean of a ``PendingStack`` returns a ``PendingMix``: a tensor with a
  shape and a dtype but no value yet, whose rows and weights the ``Mixer`` records;
- when the executor trains a chunk of peers from their mixes, the mixer computes the
  chunk's values into the executor's scratch, one sparse product per source buffer
  (usually one), and the values are not kept: the mix keeps its rows instead, so a
  round's means cost no memory of their own (about two rows per peer in all: the round
  being trained and the round its means read). Anything else that asks for a mix's value
  (the evaluator, any other torch operation) gets it computed again from those rows, to
  the same bits, and kept from then on.

Every other operation on a ``PendingStack`` or ``PendingMix`` materialises it first and then
runs unchanged, so code that does something else with a stack (a robust aggregator, an
attack) gets exactly what eager code would have given it: deferral changes when the
arithmetic happens and its float rounding, never its meaning.

Memory safety comes from reference counting, not from bookkeeping: an arena block is
handed out again only when no tensor viewing it (a row, or anything derived from one, or a
mix that still reads it) is left, which ``RowArena`` learns from a weak reference.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

from p2pfl.versions import require

# a private torch context manager and scipy's sparse kernel: the releases measured
require("torch", at_least="2.2", below="2.15", why="sim.mixing")
require("scipy", at_least="1.11", below="1.18", why="sim.mixing")

import numpy as np
import scipy.sparse as sp
import torch
from torch._C import DisableTorchFunctionSubclass
from torch.utils._pytree import tree_map

from p2pfl.protocols.synchronous import AggregateFn, weighted_mean

__all__ = [
    "Mixer",
    "PendingMix",
    "PendingStack",
    "Row",
    "RowArena",
    "consecutive",
    "deferred_aggregate",
    "plain",
]

try:  # scipy's kernel for ``Y += A @ X`` (what ``A @ X`` runs on zeros): a chunk whose
    # rows come from two buffers then accumulates both products in place.
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover - a scipy that moved it: the public product still works
    _csr_matvecs = None

# A row's key packs (arena buffer, row in it) into one int: resolving 10,000 mixes is then
# a few numpy operations on an int64 array instead of a Python loop per row.
_ROW_BITS = 32
#: mixes settled one by one (an evaluated peer's) share chunks of this many rows
_SETTLE_BLOCK = 64


class RowArena:
    """Blocks of ``(rows, dim)`` float32 rows carved out of large, reused buffers.

    Why not fresh tensors: a fresh 1 GB tensor costs page faults on first touch (on the
    2-core machine this was written on, cloning 1 GB into new memory took four times as
    long as copying it into memory already mapped). Why one buffer for many blocks: the
    mixer does one sparse product per buffer its inputs come from, so results of the
    several small training batches of a round (and of the next) should share a buffer.

    A block is reused once no tensor views it: every block is handed out as
    ``torch.from_numpy`` of a numpy view, which torch keeps alive exactly as long as any
    tensor uses that memory, and the arena keeps only a weak reference to the view. Free
    space is found block by block (first fit, lowest address first), not buffer by
    buffer: a buffer of about two rounds of rows then holds the round being trained and
    the round its means still read, however the rounds interleave, and only the rows
    written so far cost resident memory (a buffer is allocated untouched).
    """

    def __init__(self, dim: int, capacity: int, *, keep_idle: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.dim = dim
        self.capacity = capacity
        self.keep_idle = keep_idle
        self.buffers: dict[int, np.ndarray] = {}
        #: per buffer, its live blocks as ``(first row, end row, weak view)``, by first row
        self._blocks: dict[int, list[tuple[int, int, weakref.ref[np.ndarray]]]] = {}
        self._next_id = 0
        self.allocated = 0  # buffers created over the arena's life
        #: per buffer, the rows ever handed out from its start (its touched, resident part)
        self.high_water: dict[int, int] = {}
        #: asked before a new buffer is opened: let go of memory held for convenience
        #: (``Mixer.settle_spent``); returns whether it let go of anything
        self.reclaim: Callable[[], int] | None = None

    def take(self, rows: int, *, at_least: int | None = None) -> tuple[int, int, torch.Tensor]:
        """A block of ``rows`` rows: ``(buffer id, first row, tensor (rows, dim))``.

        With ``at_least``, the block may be shorter: the first free run of at least that
        many rows, up to ``rows`` of it. A caller that can split its work this way fills
        the holes that rows freed out of order leave, instead of growing the buffer.
        """
        need = rows if at_least is None else max(1, min(at_least, rows))
        found = self._first_fit(need)
        if found is None and self.buffers and self.reclaim is not None and self.reclaim():
            found = self._first_fit(need)  # memory others held on to was let go: look again
        if found is None:
            found = (self._fresh(rows), 0, rows)
        ident, first, room = found
        rows = min(rows, room)
        self._drop_idle(keep=ident)
        view = self.buffers[ident][first : first + rows]
        blocks = self._blocks[ident]
        bisect.insort(blocks, (first, first + rows, weakref.ref(view)), key=lambda b: b[0])
        self.high_water[ident] = max(self.high_water.get(ident, 0), first + rows)
        return ident, first, torch.from_numpy(view)

    def _first_fit(self, rows: int) -> tuple[int, int, int] | None:
        """``(buffer, first row, free rows from there)`` of the first run of ``rows``."""
        for ident in self.buffers:
            self._purge(ident)
        for ident in self.buffers:
            found = self._gap(ident, rows)
            if found is not None:
                return ident, *found
        return None

    def in_use(self, ident: int) -> bool:
        """Whether any tensor still views buffer ``ident``."""
        return any(ref() is not None for _, _, ref in self._blocks[ident])

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    @property
    def rows_in_use(self) -> int:
        """Rows of live blocks, over all buffers."""
        return sum(hi - lo for blocks in self._blocks.values() for lo, hi, ref in blocks if ref() is not None)

    def _purge(self, ident: int) -> None:
        blocks = self._blocks[ident]
        if any(ref() is None for _, _, ref in blocks):
            self._blocks[ident] = [b for b in blocks if b[2]() is not None]

    def _gap(self, ident: int, rows: int) -> tuple[int, int] | None:
        """The lowest run of at least ``rows`` free rows in buffer ``ident``, if any, as
        ``(first row, length)``."""
        start = 0
        for first, end, _ in self._blocks[ident]:
            if first - start >= rows:
                return start, first - start
            start = max(start, end)
        room = self.buffers[ident].shape[0] - start
        return (start, room) if room >= rows else None

    def _fresh(self, rows: int) -> int:
        """A new buffer with room for ``rows`` (an oversized request gets its own)."""
        ident = self._next_id
        self._next_id += 1
        self.buffers[ident] = np.empty((max(rows, self.capacity), self.dim), dtype=np.float32)
        self._blocks[ident] = []
        self.allocated += 1
        return ident

    def _drop_idle(self, keep: int) -> None:
        """Give back buffers nobody views, beyond ``keep_idle`` of them (``keep`` stays)."""
        idle = [i for i in self.buffers if i != keep and not self._blocks[i]]
        spare = self.keep_idle - (0 if self._blocks[keep] else 1)
        for extra in idle[max(spare, 0) :]:
            del self.buffers[extra], self._blocks[extra]
            self.high_water.pop(extra, None)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as an ordinary ``torch.Tensor`` (computing it if it is a pending mix)."""
    if isinstance(tensor, PendingMix):
        return tensor.value()
    if isinstance(tensor, PendingStack):
        return tensor.materialize()
    if isinstance(tensor, Row):
        with DisableTorchFunctionSubclass():
            return tensor.as_subclass(torch.Tensor)
    return tensor


def _plain_tree(tree: Any) -> Any:
    return tree_map(lambda t: plain(t) if isinstance(t, torch.Tensor) else t, tree)


def _metadata_functions() -> frozenset[Any]:
    """Tensor methods and properties that read metadata only: safe on a value-less tensor."""
    found: set[Any] = set()
    for name in ("dtype", "shape", "device", "ndim", "layout", "requires_grad", "is_sparse",
                 "itemsize", "nbytes", "is_cuda", "grad_fn", "is_leaf"):
        attribute = getattr(torch.Tensor, name, None)
        if attribute is not None and hasattr(attribute, "__get__"):
            found.add(attribute.__get__)
    for name in ("size", "dim", "numel", "element_size", "nelement", "ndimension",
                 "is_floating_point", "is_complex", "get_device", "__len__"):
        found.add(getattr(torch.Tensor, name))
    return frozenset(found)


_METADATA = _metadata_functions()


class Row(torch.Tensor):
    """A training result: a real row of an arena buffer that ``torch.stack`` defers.

    Each ``Mixer`` binds its own subclass (with ``_mixer`` and ``_dim`` as class
    attributes), so a row carries one attribute of its own: ``_key``. Everything but
    ``torch.stack`` behaves as on a plain tensor and returns plain tensors; ``numel`` and
    ``element_size`` skip torch's dispatch, since the simulator sizes every message.
    """

    _mixer: Mixer
    _dim: int
    _key: int
    #: an upper bound on the magnitude of every value (the row's L2 norm), computed where
    #: the row was made, in one pass over the whole training chunk: a message contract
    #: that finds it well inside its bound skips its own scan (NaN/Inf: it scans)
    abs_bound: float | None = None

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func is torch.stack and not kwargs and len(args) == 1:
            rows = args[0]
            if rows and all(type(r) is cls for r in rows):
                return cls._mixer.stack_type(rows)
        with DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def numel(self) -> int:
        return self._dim

    def element_size(self) -> int:
        return 4


class _Deferred(torch.Tensor):
    """Shared machinery of the value-less tensors: materialise on anything but metadata."""

    _mixer: Mixer

    @staticmethod
    def _new(cls: type, shape: tuple[int, ...]) -> Any:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32)

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        lazy = cls._defer(func, args, kwargs)
        if lazy is not None:
            return lazy
        return func(*_plain_tree(args), **_plain_tree(kwargs))

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        # Reached only when torch-function handling is off (modes, internals): still correct.
        return func(*_plain_tree(args), **_plain_tree(kwargs or {}))

    @classmethod
    def _defer(cls, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        return None


_MATMUL = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__})
_MEAN = frozenset({torch.mean, torch.Tensor.mean})


class PendingStack(_Deferred):
    """``torch.stack`` of training results, not yet copied anywhere."""

    _rows: list[Row]

    def __new__(cls, rows: Sequence[Row]) -> PendingStack:
        stack = cls._new(cls, (len(rows), cls._mixer.dim))
        stack._rows = list(rows)
        return stack

    def materialize(self) -> torch.Tensor:
        return torch.stack([plain(r) for r in self._rows])

    @classmethod
    def _defer(cls, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        if func in _MATMUL and len(args) == 2 and not kwargs:
            weights, stack = args
            if type(stack) is cls and not isinstance(weights, _Deferred):
                return stack.mix(weights)
        if func in _MEAN and args and type(args[0]) is cls:
            dims = args[1:] or (kwargs.get("dim"),)
            extra = {k: v for k, v in kwargs.items() if k != "dim"}
            if dims in ((0,), ([0],), ((0,),)) and not extra:
                return args[0].mix(None)
        return None

    def mix(self, weights: torch.Tensor | None) -> torch.Tensor:
        """``weights @ self`` (``None``: the mean), deferred when the weights fit."""
        rows = self._rows
        if weights is not None and (weights.dim() != 1 or weights.shape[0] != len(rows)):
            return plain(weights) @ self.materialize()  # let torch report the mismatch
        return self._mixer.defer(rows, weights)


class PendingMix(_Deferred):
    """A peer's mixed model ``sum_k w_k rows_k``, computed later with everyone else's."""

    _rows: list[Row] | None
    _weights: torch.Tensor | None
    _chunk: torch.Tensor | None
    _position: int

    def __new__(cls, rows: list[Row], weights: torch.Tensor | None) -> PendingMix:
        mix = cls._new(cls, (cls._mixer.dim,))
        mix._rows = rows
        mix._weights = weights
        mix._chunk = None
        return mix

    @property
    def computed(self) -> bool:
        """Whether the mix holds its value (else it holds the rows it reads)."""
        return self._chunk is not None

    def value(self) -> torch.Tensor:
        """The mixed vector, computed (alone) and kept the first time it is asked for."""
        if self._chunk is None:
            self._mixer.settle([self])
        assert self._chunk is not None
        return self._chunk[self._position]

    def materialize(self) -> torch.Tensor:
        return self.value()


class Mixer:
    """Records deferred means over one arena's rows and computes them as sparse products.

    ``chunk`` peers' mixes are computed together: their output (chunk x dim floats)
    stays in cache for the training step that usually reads it next.
    """

    def __init__(self, arena: RowArena, *, chunk: int = 256) -> None:
        self.arena = arena
        self.dim = arena.dim
        self.chunk = chunk
        bound = {"_mixer": self, "_dim": arena.dim, "__module__": __name__}
        self.row_type: type[Row] = type("Row", (Row,), bound)
        self.stack_type: type[PendingStack] = type("PendingStack", (PendingStack,), bound)
        self.mix_type: type[PendingMix] = type("PendingMix", (PendingMix,), bound)
        self._pending: dict[int, PendingMix] = {}
        self._uniform: dict[int, np.ndarray] = {}
        #: spent mixes, with the generation (the peer's job count) they were spent at
        self._spent: list[tuple[int, weakref.ref[PendingMix]]] = []
        self._compact_at = 1024
        #: the chunk mixes are settled into one by one, and its rows used so far
        self._settling: tuple[torch.Tensor, int] | None = None
        self.deferred = 0  # mixes recorded
        self.products = 0  # sparse products run

    # -- building ----------------------------------------------------------------------
    def rows(
        self,
        ident: int,
        first: int,
        block: torch.Tensor,
        bounds: Sequence[float] | None = None,
    ) -> list[Row]:
        """``block`` (rows ``first..`` of arena buffer ``ident``) as one row per peer,
        with each row's magnitude bound when the caller computed them (``bounds``)."""
        row_type = self.row_type
        key = (ident << _ROW_BITS) + first
        rows = []
        for index, view in enumerate(block.unbind(0)):
            row = view.as_subclass(row_type)
            row._key = key
            if bounds is not None:
                row.abs_bound = bounds[index]
            key += 1
            rows.append(row)
        return rows

    def defer(self, rows: Sequence[Row], weights: torch.Tensor | None) -> PendingMix:
        mix = self.mix_type(list(rows), weights)
        self._pending[id(mix)] = mix
        self.deferred += 1
        return mix

    def aggregate(self, inner: AggregateFn | None) -> AggregateFn:
        """A protocol ``aggregate`` that defers the plain (weighted) mean.

        Handed to protocols in place of ``None`` so that their default mean reaches the
        mixer without a detour through torch's dispatch; any other rule (``inner``) gets
        a materialised stack, as it would without deferral.
        """
        if inner is not None:
            rule = inner
            return lambda stack, weights, own: rule(plain(stack), weights, own)
        stack_type = self.stack_type

        def deferred_mean(stack: torch.Tensor, weights: torch.Tensor | None, own: int) -> torch.Tensor:
            if type(stack) is stack_type:
                return stack.mix(weights)
            return weighted_mean(plain(stack), weights, own)

        return deferred_mean

    # -- computing -----------------------------------------------------------------------
    # A mix is in one of three states: *pending* (never computed, in ``_pending``),
    # *spent* (computed once into the executor's scratch to be trained from, value not
    # kept, still holding its rows: it can be computed again, to the same bits) and
    # *settled* (its value kept in a chunk of its own, rows let go). Only settled mixes
    # cost memory of their own; a round's means are normally spent, never settled, so the
    # simulator holds the rows of two rounds and nothing per peer (see ``RowArena``).
    @property
    def pending(self) -> int:
        return len(self._pending)

    def is_pending(self, tensor: torch.Tensor) -> TypeGuard[PendingMix]:
        """Whether ``tensor`` is a mix of this mixer without a value of its own."""
        return type(tensor) is self.mix_type and tensor._chunk is None

    def flush(self) -> None:
        """Compute and keep every pending mix, a chunk at a time."""
        mixes = list(self._pending.values())
        for start in range(0, len(mixes), self.chunk):
            self.resolve(mixes[start : start + self.chunk])

    def resolve(self, mixes: Sequence[PendingMix]) -> torch.Tensor:
        """Compute ``mixes`` (none settled) into one new ``(len(mixes), dim)`` tensor, in
        order, and keep each value there (the mixes let their rows go)."""
        chunk = self._empty(len(mixes))
        self._compute(mixes, chunk)
        self._keep(mixes, chunk)
        return chunk

    def settle(self, mixes: Sequence[PendingMix]) -> None:
        """Compute and keep ``mixes`` (none settled), packed into small shared chunks.

        Mixes settled one at a time (each peer an evaluator reads) share chunks of
        ``_SETTLE_BLOCK`` rows rather than each owning a tensor; a chunk is freed when
        the last mix in it is.
        """
        if not mixes:
            return
        if self._settling is None or self._settling[1] + len(mixes) > self._settling[0].shape[0]:
            self._settling = (self._empty(max(_SETTLE_BLOCK, len(mixes))), 0)
        block, used = self._settling
        self._compute(mixes, block[used : used + len(mixes)])
        self._keep(mixes, block, offset=used)
        self._settling = (block, used + len(mixes))

    def compute_into(
        self, mixes: Sequence[torch.Tensor], out: torch.Tensor, generations: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The values of ``mixes`` in ``out`` (``(k, dim)``, contiguous), keeping none.

        Unsettled mixes are computed (and become spent: they keep their rows, to be
        computed again if their value is ever asked for); settled mixes, rows and plain
        tensors are copied. ``out`` is scratch the caller reuses: the values of a chunk
        live there only until the chunk is trained. ``generations`` (the training job
        each input is for, counted per peer) lets ``settle_spent`` tell old means from new.
        """
        pending = [m if self.is_pending(m) else None for m in mixes]
        self._compute(pending, out)
        forget, remember, ref = self._pending.pop, self._spent.append, weakref.ref
        for index, mix in enumerate(pending):
            if mix is None:
                out[index].copy_(plain(mixes[index]))
                continue
            forget(id(mix), None)
            remember((generations[index] if generations is not None else 0, ref(mix)))
        if len(self._spent) > self._compact_at:  # forget the dead
            self._spent = [(g, ref) for g, ref in self._spent if self._unsettled(ref)]
            self._compact_at = max(1024, 2 * len(self._spent))
        return out

    def settle_spent(self, before: int) -> int:
        """Settle the spent mixes of generations before ``before`` still alive; how many.

        A peer's mean lives until the peer finishes its next round; a peer still holding
        one from an older generation than others now train (it is behind, or stopped)
        pins the rows that mean reads, and with them the arena's blocks of that round.
        Its value costs one row; the blocks it pins, up to a round of rows.
        """
        stale: list[PendingMix] = []
        kept: list[tuple[int, weakref.ref[PendingMix]]] = []
        for generation, ref in self._spent:
            if not self._unsettled(ref):
                continue
            if generation < before:
                stale.append(ref())  # type: ignore[arg-type]
            else:
                kept.append((generation, ref))
        self._spent = kept
        self.settle(stale)
        return len(stale)

    @staticmethod
    def _unsettled(ref: weakref.ref[PendingMix]) -> bool:
        mix = ref()
        return mix is not None and mix._chunk is None

    def _keep(self, mixes: Sequence[PendingMix], chunk: torch.Tensor, offset: int = 0) -> None:
        for position, mix in enumerate(mixes, start=offset):
            mix._chunk = chunk
            mix._position = position
            mix._rows = None  # let the source rows go
            mix._weights = None
            self._pending.pop(id(mix), None)

    def _empty(self, rows: int) -> torch.Tensor:
        """``rows`` uninitialised rows where this mixer keeps values (a chunk, a settle
        block): the CPU here, the device for ``sim.device.DeviceMixer``."""
        return torch.empty((rows, self.dim), dtype=torch.float32)

    def _compute(self, mixes: Sequence[PendingMix | None], out: torch.Tensor) -> None:
        """``out[i] = sum_k w_ik rows_ik`` for each mix (``None``: row left at zero).

        One sparse product per source buffer, in buffer order, each accumulated on zeros
        with the kernel scipy's ``A @ X`` runs: a mix computed alone, in a chunk, into
        scratch or kept, gets the same bits.
        """
        # One pass over the mixes (a chunk is ~100 of them, every round): row keys, how
        # many rows each mix reads, and the weights, gathered into flat lists.
        counts: list[int] = []
        keys: list[int] = []
        weights: list[np.ndarray] = []
        uniform = self._uniform
        for mix in mixes:
            if mix is None:
                counts.append(0)
                continue
            rows = mix._rows
            if rows is None:
                raise ValueError("a mix that is already computed cannot be computed again")
            count = len(rows)
            counts.append(count)
            keys.extend([row._key for row in rows])
            given = mix._weights
            if given is None:
                flat = uniform.get(count)
                if flat is None:
                    flat = uniform[count] = np.full(count, 1.0 / count, dtype=np.float32)
            elif type(given) is torch.Tensor and given.dim() == 1 and not given.requires_grad:
                flat = given.numpy()  # the usual case, a view: no per-peer torch call
            else:
                flat = plain(given).detach().reshape(-1).cpu().numpy()
            weights.append(flat)
        values = (np.concatenate(weights) if weights else np.zeros(0, dtype=np.float32)).astype(
            np.float32, copy=False
        )
        key_array = np.array(keys, dtype=np.int64)
        out.zero_()
        buffers = key_array >> _ROW_BITS
        columns = key_array & ((1 << _ROW_BITS) - 1)
        idents = np.unique(buffers)
        for ident in idents.tolist():
            if len(idents) == 1:  # the usual case: every input row in one buffer
                per_mix, cols, data = np.array(counts, dtype=np.int64), columns, values
            else:
                mask = buffers == ident
                owner = np.repeat(np.arange(len(mixes)), np.array(counts, dtype=np.int64))
                per_mix = np.bincount(owner[mask], minlength=len(mixes))
                cols, data = columns[mask], values[mask]
            indptr = np.zeros(len(mixes) + 1, dtype=np.int64)
            np.cumsum(per_mix, out=indptr[1:])
            self._product(ident, indptr, cols, data, out)
            self.products += 1

    def _product(
        self, ident: int, indptr: np.ndarray, columns: np.ndarray, weights: np.ndarray, out: torch.Tensor
    ) -> None:
        """``out += A @ buffer`` for the CSR matrix ``A = (weights, columns, indptr)`` over
        arena buffer ``ident``: scipy's kernel on the CPU's numpy buffers."""
        _accumulate(indptr, columns, weights, self.arena.buffers[ident], out.numpy())


def _accumulate(
    indptr: np.ndarray, columns: np.ndarray, weights: np.ndarray, source: np.ndarray, out: np.ndarray
) -> None:
    """``out += A @ source`` for the CSR matrix ``A = (weights, columns, indptr)``.

    Straight into scipy's kernel when it is reachable: no temporary, and no
    ``csr_array`` built and format-checked for every chunk of every round (CSR needs
    neither sorted nor unique columns for a product). Otherwise the public product.
    """
    rows = len(indptr) - 1
    if _csr_matvecs is None or source.dtype != out.dtype or weights.dtype != out.dtype:
        out += sp.csr_array((weights, columns, indptr), shape=(rows, source.shape[0])) @ source
        return
    _csr_matvecs(rows, source.shape[0], source.shape[1], indptr, columns, weights,
                 source.ravel(), out.ravel())


def deferred_aggregate(mixer: Mixer | None, inner: AggregateFn | None) -> AggregateFn | None:
    """``mixer.aggregate(inner)``, or ``inner`` unchanged when nothing is deferred."""
    return inner if mixer is None else mixer.aggregate(inner)


def consecutive(mixes: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The values of computed ``mixes`` as one slice, if they lie in order in one chunk."""
    first = mixes[0]
    if not isinstance(first, PendingMix) or first._chunk is None:
        return None
    chunk, start = first._chunk, first._position
    for offset, mix in enumerate(mixes):
        if not isinstance(mix, PendingMix) or mix._chunk is not chunk or mix._position != start + offset:
            return None
    return chunk[start : start + len(mixes)]
