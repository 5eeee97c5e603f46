"""Coordinate-wise robust statistics: each coordinate is aggregated on its own.

Both rules look at one coordinate's ``n`` values at a time, so they tolerate outliers in
every coordinate but ignore how coordinates move together (which ALIE exploits).

Why the stack is sorted in column blocks: a model stack is ``(n, d)``, one row per model,
so one coordinate's ``n`` values are ``d`` floats apart. A selection along ``dim=0``
(``x.median(dim=0)``, numpy's ``median(axis=0)``) gathers them one strided value at a
time and runs a branchy quickselect per coordinate; at ``n = 100`` that costs 25-55 times
one streaming pass over the stack. Here a block of columns (``(n, b)``, sized to stay in
the L2 cache) is transposed once into ``(b, n)`` rows and every row is sorted by
numpy's vectorised small-array sort (AVX-512/AVX2 sorting networks for float32 and
float64), which sorts 100 floats in about 100 ns. Sorting is exact, so the median is
bit for bit the same as before; the trimmed mean is summed in float64, which only makes
it closer to the exact mean of the kept values. Other devices (CUDA) and dtypes numpy
cannot sort natively (bfloat16, float16) use torch's sort along the same layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_f, check_stack, require_n
from p2pfl.aggregation._linalg import block_bytes

# A block of n x b values sized to stay in a core's L2 cache while it is transposed,
# sorted and reduced (measured: 256 KiB-1 MiB blocks are equally fast; 16 MiB is not).
_BLOCK_BYTES = 512 * 2**10
_NUMPY_SORTABLE = (torch.float32, torch.float64)


def _column_blocks(x: Tensor) -> Iterator[tuple[int, int]]:
    n, d = x.shape
    step = max(64, block_bytes(x, _BLOCK_BYTES) // (n * x.element_size()))
    for start in range(0, d, step):
        yield start, min(d, start + step)


def _sorted_rows(block: Tensor) -> Tensor:
    """The ``(n, b)`` block transposed to ``(b, n)``, every row sorted ascending."""
    rows = block.T.contiguous()
    if rows.device.type == "cpu" and rows.dtype in _NUMPY_SORTABLE:
        rows.detach().numpy().sort(axis=1)  # in place, on the tensor's memory
        return rows
    return torch.sort(rows, dim=1).values


def _per_block(x: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``reduce`` ((b, n) sorted rows -> (b,)) to every column block of ``x``.

    Order statistics are not differentiated: the stack is detached (the sort is in place).
    """
    x = x.detach()
    out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
    for start, end in _column_blocks(x):
        out[start:end] = reduce(_sorted_rows(x[:, start:end]))
    return out


def coordinate_median(x: Tensor) -> Tensor:
    """Median of every coordinate of ``x`` (n, d); shape ``(d,)``.

    For even ``n`` it is the mean of the two middle values (numpy's convention), not
    ``torch.median``'s lower middle value: that keeps the rule symmetric under ``x -> -x``.
    Breakdown point 1/2: with fewer than ``n / 2`` arbitrary vectors every output
    coordinate stays within the range of the honest values of that coordinate.
    """
    check_stack(x, "median")
    n = x.shape[0]
    if n % 2 == 1:
        return _per_block(x, lambda s: s[:, n // 2])
    # (a + b) / 2 in the stack's dtype, exactly as numpy computes the mean of the pair.
    return _per_block(x, lambda s: (s[:, n // 2 - 1] + s[:, n // 2]) / 2)


def trimmed_mean(x: Tensor, f: int) -> Tensor:
    """Per coordinate, drop the ``f`` largest and ``f`` smallest values and average the rest.

    ``x`` is (n, d); needs ``n > 2f``; returns shape ``(d,)``. With at most ``f`` outliers
    the output lies within the range of the honest values of each coordinate. The trim
    is done by sorting rather than by subtracting top-k sums, because subtracting the sum
    of a 1e30 outlier from a total containing it would wipe out the honest digits. The
    kept values are summed in float64 (when the stack is float32), so the result is the
    correctly rounded mean of the kept values in all but contrived cases.
    """
    check_stack(x, "trimmed_mean")
    check_f(f, "trimmed_mean")
    n = x.shape[0]
    require_n("trimmed_mean", n, f)
    if f == 0:
        return x.mean(dim=0)
    kept = n - 2 * f
    wide = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32

    def reduce(s: Tensor) -> Tensor:
        if kept <= 16:  # a few strided columns: adding them one by one is ~10x faster
            total = s[:, f].to(wide)
            for j in range(f + 1, n - f):
                total += s[:, j]
        else:
            total = s[:, f : n - f].sum(dim=1, dtype=wide)
        return (total / kept).to(x.dtype)

    return _per_block(x, reduce)
