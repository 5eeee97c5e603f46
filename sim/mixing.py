"""Deferred mixing: thousands of peers' weighted means computed as a few sparse products.

D-PSGD and Epidemic Learning end every round with ``torch.stack([own, *received])``
followed by ``weights @ stack`` (or ``stack.mean(0)``). Run eagerly for 10,000 peers, that
copies five 100 KB rows per peer into a fresh stack and runs 10,000 tiny matrix-vector
products: about twice the memory traffic of the one sparse product ``W @ X`` that computes
the same thing, plus the per-call overhead. The simulator keeps the protocols unchanged and
defers the arithmetic instead:

- training results come back to the protocols as ``Row`` tensors: ordinary tensors (rows of
  a pooled ``(B, d)`` buffer) except that ``torch.stack`` of Rows returns a ``PendingStack``,
  which holds references to the rows and no data;
- the weighted mean or mean of a ``PendingStack`` returns a ``PendingMix``: a tensor with a
  shape and a dtype but no value yet, whose rows and weights the ``Mixer`` records;
- when a value is needed (the executor trains the peer, the evaluator reads its model, any
  other torch operation touches it) the mixer computes *all* pending mixes, one sparse
  product per source buffer and chunk of peers.

Every other operation on a ``PendingStack`` or ``PendingMix`` materialises it first and then
runs unchanged, so code that does something else with a stack (a robust aggregator, an
attack) gets exactly what eager code would have given it: deferral changes when the
arithmetic happens and its float rounding, never its meaning.

Memory safety comes from reference counting, not from bookkeeping: a pooled buffer is handed
out again only when no tensor (a ``Row``, or any view derived from one) still uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch._C import DisableTorchFunctionSubclass
from torch.utils._pytree import tree_map

from p2pfl.protocols.synchronous import AggregateFn, weighted_mean

__all__ = ["BufferPool", "Mixer", "PendingMix", "PendingStack", "Row", "plain"]


class BufferPool:
    """Reusable ``(rows, dim)`` float32 buffers for results that outlive one call.

    A fresh 1 GB tensor costs page faults on first touch (on the 2-core machine this was
    written on, cloning 1 GB into new memory took four times as long as copying it into
    memory already mapped). The pool keeps its buffers as numpy arrays and hands out torch
    views of them: ``torch.from_numpy`` makes every tensor viewing a buffer hold a
    reference to the array, so ``sys.getrefcount`` tells when the last one is gone.
    """

    def __init__(self, dim: int, *, keep_idle: int = 2) -> None:
        self.dim = dim
        self.keep_idle = keep_idle
        self._buffers: list[np.ndarray] = []
        self.allocated = 0  # buffers created over the pool's life (a test hook)

    def take(self, rows: int) -> tuple[np.ndarray, torch.Tensor]:
        """A ``(rows, dim)`` tensor over a buffer nobody else uses, and that buffer."""
        free = [b for b in self._buffers if self._is_free(b)]
        fitting = [b for b in free if b.shape[0] >= rows]
        if fitting:
            buffer = min(fitting, key=lambda b: b.shape[0])
        else:
            buffer = np.empty((rows, self.dim), dtype=np.float32)
            self._buffers.append(buffer)
            self.allocated += 1
        idle = [b for b in free if b is not buffer]
        for extra in sorted(idle, key=lambda b: b.shape[0])[: max(0, len(idle) - self.keep_idle)]:
            self._buffers.remove(extra)  # too many idle buffers: give memory back
        view = buffer[:rows]
        return buffer, torch.from_numpy(view)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    @staticmethod
    def _is_free(buffer: np.ndarray) -> bool:
        # references: the pool's list, the caller's name and getrefcount's own argument
        return sys.getrefcount(buffer) <= 3


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
    names = ("dtype", "shape", "device", "ndim", "layout", "requires_grad", "is_sparse",
             "itemsize", "nbytes", "is_cuda", "grad_fn", "is_leaf", "names")
    found: set[Any] = set()
    for name in names:
        attribute = getattr(torch.Tensor, name, None)
        if attribute is not None and hasattr(attribute, "__get__"):
            found.add(attribute.__get__)
    for name in ("size", "dim", "numel", "element_size", "nelement", "ndimension",
                 "is_floating_point", "is_complex", "get_device", "__len__"):
        found.add(getattr(torch.Tensor, name))
    return frozenset(found)


_METADATA = _metadata_functions()


class Row(torch.Tensor):
    """A training result: a real row of a pooled buffer that ``torch.stack`` defers.

    Everything but ``torch.stack`` behaves as on a plain tensor (results are plain
    tensors). ``numel`` and ``element_size`` skip torch's dispatch altogether: the
    simulator asks for a message's size twice per message.
    """

    _block: np.ndarray
    _index: int
    _mixer: Mixer

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is torch.stack and not kwargs and len(args) == 1:
            rows = args[0]
            if rows and all(type(r) is Row for r in rows):
                return PendingStack(rows)
        with DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def numel(self) -> int:  # type: ignore[override]
        return self._block.shape[1]

    def element_size(self) -> int:  # type: ignore[override]
        return 4


class _Deferred(torch.Tensor):
    """Shared machinery of the value-less tensors: materialise on anything but metadata."""

    @staticmethod
    def _new(cls: type, shape: tuple[int, ...]) -> Any:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32)

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _METADATA:
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        lazy = cls._defer(func, args, kwargs)
        if lazy is not None:
            return lazy
        return func(*_plain_tree(args), **_plain_tree(kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
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
        stack = cls._new(cls, (len(rows), rows[0]._block.shape[1]))
        stack._rows = list(rows)
        return stack

    def materialize(self) -> torch.Tensor:
        return torch.stack([plain(r) for r in self._rows])

    @classmethod
    def _defer(cls, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        if func in _MATMUL and len(args) == 2 and not kwargs:
            weights, stack = args
            if type(stack) is PendingStack and not isinstance(weights, _Deferred):
                return stack.mix(weights)
        if func in _MEAN and len(args) >= 1 and type(args[0]) is PendingStack:
            dims = args[1:] or (kwargs.get("dim"),)
            extra = {k: v for k, v in kwargs.items() if k != "dim"}
            if dims in ((0,), ([0],), ((0,),)) and not extra:
                return args[0].mix(None)
        return None

    def mix(self, weights: torch.Tensor | None) -> torch.Tensor:
        """``weights @ self`` (``None``: the mean), deferred when the weights fit."""
        if weights is not None and (weights.dim() != 1 or weights.numel() != len(self._rows)):
            return plain(weights) @ self.materialize()  # let torch report the mismatch
        return self._rows[0]._mixer.defer(self._rows, weights)


class PendingMix(_Deferred):
    """A peer's mixed model, ``sum_k w_k rows_k``, computed later with everyone else's."""

    _rows: list[Row] | None
    _weights: torch.Tensor | None
    _mixer: Mixer
    _chunk: torch.Tensor | None
    _position: int

    def __new__(cls, mixer: Mixer, rows: list[Row], weights: torch.Tensor | None) -> PendingMix:
        mix = cls._new(cls, (rows[0]._block.shape[1],))
        mix._rows = rows
        mix._weights = weights
        mix._mixer = mixer
        mix._chunk = None
        mix._position = 0
        return mix

    @property
    def computed(self) -> bool:
        return self._chunk is not None

    def value(self) -> torch.Tensor:
        """The mixed vector (computing every pending mix if this one is not done yet)."""
        if self._chunk is None:
            self._mixer.flush()
        assert self._chunk is not None
        return self._chunk[self._position]

    def materialize(self) -> torch.Tensor:
        return self.value()


class Mixer:
    """Records deferred mixes and computes them in batches, as sparse products.

    ``chunk`` peers' mixes are computed together: their output (chunk x d floats) stays
    in cache for the training step that usually reads it next.
    """

    def __init__(self, *, chunk: int = 256) -> None:
        self.chunk = chunk
        self._pending: dict[int, PendingMix] = {}
        self.deferred = 0  # mixes recorded
        self.products = 0  # sparse products run

    # -- building ----------------------------------------------------------------------
    def rows(self, block: np.ndarray, values: torch.Tensor) -> list[Row]:
        """``values`` (a (B, d) view of pooled ``block``) as one ``Row`` per row."""
        rows = []
        for index, view in enumerate(values.unbind(0)):
            row = view.as_subclass(Row)
            row._block = block
            row._index = index
            row._mixer = self
            rows.append(row)
        return rows

    def defer(self, rows: Sequence[Row], weights: torch.Tensor | None) -> PendingMix:
        mix = PendingMix(self, list(rows), weights)
        self._pending[id(mix)] = mix
        self.deferred += 1
        return mix

    def aggregate(self, inner: AggregateFn | None) -> AggregateFn:
        """A protocol ``aggregate`` that defers the plain (weighted) mean.

        Handed to protocols instead of ``None`` so that their default mean reaches the
        mixer without going through torch's dispatch; any other rule (``inner``) gets a
        materialised stack, as it would without deferral.
        """
        if inner is not None:
            return lambda stack, weights, own: inner(plain(stack), weights, own)

        def deferred_mean(stack: torch.Tensor, weights: torch.Tensor | None, own: int) -> torch.Tensor:
            if type(stack) is PendingStack:
                return stack.mix(weights)
            return weighted_mean(plain(stack), weights, own)

        return deferred_mean

    # -- computing -----------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Compute every pending mix."""
        mixes = list(self._pending.values())
        for start in range(0, len(mixes), self.chunk):
            self.resolve(mixes[start : start + self.chunk])

    def resolve(self, mixes: Sequence[PendingMix]) -> torch.Tensor:
        """Compute ``mixes`` (all pending) into one ``(len(mixes), d)`` tensor, in order."""
        entries: dict[int, tuple[np.ndarray, list[int], list[int], list[float]]] = {}
        weights = [m._weights for m in mixes]
        given = [w for w in weights if w is not None]
        flat = torch.cat([plain(w).reshape(-1) for w in given]).tolist() if given else []
        cursor = 0
        for i, mix in enumerate(mixes):
            rows = mix._rows
            assert rows is not None, "mix already computed"
            if mix._weights is None:
                ws = [1.0 / len(rows)] * len(rows)
            else:
                ws = flat[cursor : cursor + len(rows)]
                cursor += len(rows)
            for row, w in zip(rows, ws, strict=True):
                block = row._block
                entry = entries.get(id(block))
                if entry is None:
                    entry = entries[id(block)] = (block, [], [], [])
                entry[1].append(i)
                entry[2].append(row._index)
                entry[3].append(w)
        out: np.ndarray | None = None
        for block, r, c, w in entries.values():
            matrix = sp.csr_array(
                (np.asarray(w, dtype=np.float32), (np.asarray(r), np.asarray(c))),
                shape=(len(mixes), block.shape[0]),
            )
            product = matrix @ block
            self.products += 1
            if out is None:
                out = product
            else:
                out += product
        assert out is not None
        chunk = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        for position, mix in enumerate(mixes):
            mix._chunk = chunk
            mix._position = position
            mix._rows = None  # let the source buffers go
            mix._weights = None
            self._pending.pop(id(mix), None)
        return chunk


def deferred_aggregate(mixer: Mixer | None, inner: AggregateFn | None) -> AggregateFn | None:
    """``mixer.aggregate(inner)``, or ``inner`` unchanged when nothing is deferred."""
    return inner if mixer is None else mixer.aggregate(inner)


def consecutive(mixes: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The rows of computed ``mixes`` as one slice, if they lie in order in one chunk."""
    first = mixes[0]
    if type(first) is not PendingMix or first._chunk is None:
        return None
    chunk, start = first._chunk, first._position
    for offset, mix in enumerate(mixes):
        if type(mix) is not PendingMix or mix._chunk is not chunk or mix._position != start + offset:
            return None
    return chunk[start : start + len(mixes)]


Callback = Callable[[], None]
