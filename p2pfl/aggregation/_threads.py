"""Keep numpy's BLAS on the calling thread while an aggregator multiplies blocks with it.

The fast Gram matrices multiply small column blocks (about 100 x 2,600) with numpy's
BLAS (OpenBLAS), which by default runs one thread per core, whatever
``torch.set_num_threads`` says. Next to torch's own OpenMP workers, which spin for a while
after each parallel region, those threads fight over the cores: measured on this 2-core
machine with torch at 2 threads, Krum on a 100 x 300,000 stack took 0.7-3.5 s instead of
0.1-0.2 s, and 0.5-1.2 s even with torch at 1 thread. Blocks this small gain little from
threads anyway.

OpenBLAS (0.3.27 and later) has ``openblas_set_num_threads_local``, which sets the count
for the calling thread only and returns the previous one; numpy's wheels ship it in
``numpy.libs``. It is reached through ctypes (the package imports only numpy, torch and
the standard library). Where it cannot be found (another BLAS, another platform),
:func:`pinned_blas` says so and the callers multiply with torch instead.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

_UNSET: object = object()
_setter: Callable[[int], int] | None | object = _UNSET


def _find_setter() -> Callable[[int], int] | None:
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    if not libs.is_dir():
        return None
    for path in sorted(libs.glob("lib*openblas*.so*")):
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by numpy: the same instance
        except OSError:
            continue
        setter = getattr(lib, "openblas_set_num_threads_local", None)
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            setter.restype = ctypes.c_int
            return setter
    return None


def _local_setter() -> Callable[[int], int] | None:
    global _setter
    if _setter is _UNSET:
        _setter = _find_setter()
    return _setter  # type: ignore[return-value]


def pinned_blas() -> bool:
    """Whether numpy's BLAS can be held to the calling thread (see :func:`single_thread`)."""
    return _local_setter() is not None


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Within the block numpy's BLAS runs on the calling thread (when :func:`pinned_blas`)."""
    setter = _local_setter()
    if setter is None:
        yield
        return
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)
