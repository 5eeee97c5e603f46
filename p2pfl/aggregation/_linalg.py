"""Gram matrices and pairwise distances of a stack, by matrix products.

Distance-based rules (Krum, Bulyan, NNM, the geometric median, FoolsGold) only need the
``n x n`` Gram matrix ``G = x @ x.T``: ``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij``. One
matrix product reads the stack once, instead of materialising ``n^2`` difference vectors.

Two ways to compute it:

:func:`gram` (exact, float64). That identity cancels large terms. For models of norm 30
that differ by 0.1, float32 rounding of the terms alone (``eps * ||x||^2 = 5e-5``) is 0.5%
of the squared distance (``0.01``), before any accumulation error over ``d`` terms; and a
Byzantine vector of magnitude 1e20 overflows float32 squares into ``inf - inf = nan``. In
float64 both are harmless. But at ``n = 100`` the product is compute-bound: a float64
Gram matrix costs about 3x a float32 one (25 memory passes over the stack at d = 1e6).

:func:`centred_gram` (fast, float32 products, float64 sums). Distances do not change when
every row is shifted by the same vector ``r``, and the cancellation above comes from the
rows' common part, not from their differences. So the rows are first centred on a
*reference row* chosen to lie among the others (the most central row of a cheap
float64 pilot on a few thousand sampled coordinates), the float32 product of each column
block is taken (in cache), and the blocks are summed in float64. For rows near the
reference, the relative error of a squared distance is then about ``1e-7`` (measured:
7.5e-8 worst, 1.5e-8 typical, on models of norm 30 a distance 0.07 apart, against 6e-3
without centring). Rows whose float32 products overflow or underflow (entries beyond
about 1e18 or below 1e-18) are recomputed exactly in float64. Rules that make a discrete
choice from these distances (Krum) re-check close calls exactly; see ``distance.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from p2pfl.aggregation._threads import pinned_blas, single_thread

_CHUNK_BYTES = 64 * 2**20
# Column blocks of the fast path: (rows x block) float32 values that stay in L2 cache.
_BLOCK_BYTES = 1 * 2**20
# On an accelerator, blocks only bound the temporary memory (kernel launches cost more).
DEVICE_BLOCK_BYTES = 64 * 2**20


def block_bytes(x: Tensor, cpu: int) -> int:
    """The column-block size in bytes for ``x``'s device: ``cpu`` there, else 64 MiB."""
    return cpu if x.device.type == "cpu" else DEVICE_BLOCK_BYTES


# Columns sampled (in a few contiguous runs) to choose the reference row.
_PILOT_COLUMNS = 4096
_PILOT_RUNS = 8
# Below this many entries (n * d), or this many rows, the rules take the exact float64
# Gram matrix: the float32 speed-up would not pay for the set-up (pilot, bounds). With few
# rows the float64 product is cheap anyway (measured at d = 1e5: the exact path 2-5x
# faster at n = 3-5, equal at n = 10, 1.3x faster at n = 12; at n = 20, d = 1e6 the fast
# one is 2-4x faster).
FAST_MIN_ELEMENTS = 2**18
FAST_MIN_ROWS = 16


def use_fast_gram(x: Tensor) -> bool:
    """Whether the stack is large enough for :func:`centred_gram`'s float32 products."""
    n, d = x.shape
    return n >= FAST_MIN_ROWS and n * d >= FAST_MIN_ELEMENTS


# float32 unit roundoff.
_UNIT = 2.0**-24
# A centred row whose squares sum to less than this per column of a block has entries
# near float32's subnormals (below ~1e-15): its products lose digits, so it is redone.
_TINY = 2.0**-100


def gram(x: Tensor, extra: Tensor | None = None) -> Tensor:
    """``x @ x.T`` with float64 products and sums, over column blocks; shape ``(n, n)``.

    With ``extra`` (m, d), the Gram matrix of the rows of ``x`` followed by those of
    ``extra``, shape ``(n + m, n + m)``, without concatenating the full stacks. Each block
    is widened to float64 in cache (1 MiB) and multiplied by :func:`_block_gram`:
    measured at d = 1e6, 11 memory passes at n = 100 and 2 at n = 10, against 32 and 12
    with 64 MiB chunks and torch's product.
    """
    x = x.detach()
    n, d = x.shape
    rows = n + (0 if extra is None else extra.shape[0])
    step = max(64, block_bytes(x, _BLOCK_BYTES) // (8 * rows))
    g = torch.zeros(rows, rows, dtype=torch.float64, device=x.device)
    with single_thread():
        for start in range(0, d, step):
            block = x[:, start : start + step]
            if extra is not None:
                block = torch.cat([block, extra[:, start : start + step].detach().to(x.dtype)])
            g += _block_gram(block.to(torch.float64))
    return g


def sq_distances_from_gram(g: Tensor) -> Tensor:
    """Pairwise squared distances from a Gram matrix: exact zeros on the diagonal, none negative."""
    diag = g.diagonal()
    d2 = (diag[:, None] + diag[None, :] - 2.0 * g).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of ``x`` (n, d); float64 ``(n, n)``."""
    return sq_distances_from_gram(gram(x))


@dataclass(frozen=True)
class CentredGram:
    """The Gram matrix of ``x_i - r`` for a reference row ``r`` of the stack, in float64.

    ``g`` (n, n): ``(x_i - r) . (x_j - r)``; ``cross`` (n,): ``r . (x_i - r)``; ``rr``:
    ``||r||^2``; ``reference``: the index of ``r`` (-1: a given centre); ``block``: the column-block length of
    the float32 products (it sets their rounding error, see :meth:`error_scale`).
    ``unit``: the unit roundoff of the products. ``spread`` (n,): ``sqrt(sum_b ||x_i^b - r^b||^4) / ||x_i - r||^2`` over column blocks
    ``b``, between ``1/sqrt(blocks)`` (a row spread evenly) and 1 (all in one block).
    ``cross`` and ``rr`` carry float32 rounding relative to ``||r||``: use them for norms
    of combinations (stopping tests), never for distances.
    """

    g: Tensor
    cross: Tensor
    rr: float
    reference: int
    block: int
    spread: Tensor
    unit: float

    def sq_distances(self) -> Tensor:
        return sq_distances_from_gram(self.g)

    def error_scale(self) -> Tensor:
        """``(n, n)`` float64: a generous estimate of the rounding error of each squared distance.

        It is ``8 u (sqrt(block) max(spread_i, spread_j) + 1) (||x_i - r|| + ||x_j - r||)^2``,
        ``u`` the unit roundoff of the products (float32's, or float64's for small or
        float64 stacks). The ``8 u`` term covers the rounding of the
        centred rows themselves. Within a block, float32 products summed over
        ``block`` terms err by about ``u sqrt(block / 3)`` of the block's share (a random
        walk of roundings); the blocks' errors add up in float64 like a random walk too,
        which ``spread`` accounts for (a row spread evenly over ``B`` blocks errs
        ``sqrt(B)`` times less, relative to its norm, than one held in a single block).
        Measured errors (against exact distances) stay 25-500x below this estimate.
        Rows recomputed exactly keep
        the estimate, which is then merely pessimistic.
        """
        norms = self.g.diagonal().clamp_min(0.0).sqrt()
        spread = torch.maximum(self.spread[:, None], self.spread[None, :])
        scale = 8.0 * self.unit * (self.block**0.5 * spread + 1.0)
        return scale * (norms[:, None] + norms[None, :]) ** 2


def _pilot_reference(x: Tensor) -> int:
    """The index of a central row, judged on a few thousand sampled coordinates.

    Each row is scored, in exact float64, by the sum of its squared distances to its
    ``ceil(n / 2)`` nearest rows (itself included) on the sample; the lowest score wins.
    With fewer than half the rows Byzantine, the winner sits among honest rows or close
    to them, which is where the distances that decide the rules need precision.
    """
    n, d = x.shape
    if n <= 2:
        return 0
    if d <= _PILOT_COLUMNS:
        sample = x
    else:
        run = _PILOT_COLUMNS // _PILOT_RUNS
        starts = torch.linspace(0, d - run, _PILOT_RUNS).long().tolist()
        sample = torch.cat([x[:, s : s + run] for s in starts], dim=1)
    d2 = pairwise_sq_distances(sample)
    k = (n + 1) // 2
    scores = torch.topk(d2, k, dim=1, largest=False, sorted=False).values.sum(dim=1)
    return int(torch.argmin(scores))


def centred_gram(x: Tensor, centre: Tensor | None = None) -> CentredGram:
    """The Gram matrix of the rows of ``x`` (n, d) centred on a reference (float32 products).

    ``centre`` (d,) is the reference when given (centered clipping centres on its own
    centre; ``reference`` is then -1); by default :func:`_pilot_reference` picks a row.
    float64 stacks take float64 products (no speed-up, no loss); half-precision stacks
    are widened to float32.
    """
    x = x.detach()  # a selection statistic: no gradient flows through it
    n, d = x.shape
    ref = _pilot_reference(x) if centre is None else -1
    # Small stacks take float64 products: as fast there, and exact.
    wide = x.dtype == torch.float64 or not use_fast_gram(x)
    compute = torch.float64 if wide else torch.float32
    r = (x[ref] if centre is None else centre.detach()).to(device=x.device, dtype=compute)
    step = max(64, block_bytes(x, _BLOCK_BYTES) // ((n + 1) * 4))
    rows = torch.empty(n + 1, min(step, d), dtype=compute, device=x.device)
    acc = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=x.device)
    fourth = torch.zeros(n, dtype=torch.float64, device=x.device)
    with single_thread():
        for start in range(0, d, step):
            end = min(d, start + step)
            block = rows[:, : end - start]
            torch.sub(x[:, start:end].to(compute), r[start:end], out=block[:n])
            block[n] = r[start:end]
            part = _block_gram(block)
            acc += part
            fourth += part.diagonal()[:n].to(torch.float64) ** 2
    g = acc[:n, :n].contiguous()
    cross = acc[n, :n].clone()
    diag = g.diagonal()
    bad = ~torch.isfinite(g).all(dim=1)
    if not wide:
        bad |= (diag > 0) & (diag < _TINY * step)
    if bool(bad.any()):
        _exact_rows(x, r, bad.nonzero().flatten(), g, cross)
    spread = torch.where(diag > 0, fourth.sqrt() / diag.clamp_min(1e-300), 1.0).clamp(max=1.0)
    spread[bad] = 1.0
    unit = 2.0**-53 if wide else _UNIT
    return CentredGram(g, cross, float(acc[n, n]), ref, step, spread, unit)


def _block_gram(block: Tensor) -> Tensor:
    """``block @ block.T`` for one column block.

    On CPU it is numpy's matrix product (OpenBLAS) when its threads can be pinned (see
    ``_threads``): measured on this project's AMD cores at 101 rows, 135-145 GFLOP/s on
    one thread against 70-75 for torch's (MKL) sgemm, and ahead of a triangular (syrk)
    product or of splitting the rows in halves.
    """
    if (
        block.device.type == "cpu"
        and block.dtype in (torch.float32, torch.float64)
        and pinned_blas()
    ):
        rows = block.detach().numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # overflowing rows are redone
            return torch.from_numpy(rows @ rows.T)
    return block @ block.T


def _exact_rows(x: Tensor, centre: Tensor, rows: Tensor, g: Tensor, cross: Tensor) -> None:
    """Recompute rows (and columns) ``rows`` of a centred Gram matrix exactly, in float64.

    float32 inputs convert to float64 exactly and their differences are exact there, so
    only the float64 sums round.
    """
    n, d = x.shape
    step = max(1, _CHUNK_BYTES // (8 * (n + 1)))
    part = torch.zeros(len(rows), n, dtype=torch.float64, device=x.device)
    rdot = torch.zeros(len(rows), dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        r = centre[start : start + step].to(torch.float64)
        block = x[:, start : start + step].to(torch.float64) - r
        part.addmm_(block[rows], block.T)
        rdot += block[rows] @ r
    g[rows, :] = part
    g[:, rows] = part.T
    cross[rows] = rdot


def exact_sq_distance_rows(x: Tensor, rows: Tensor, centre: Tensor) -> Tensor:
    """Squared distances from rows ``rows`` of ``x`` to every row, float64 ``(len(rows), n)``.

    Computed in cache-sized float64 blocks, one read of the stack whatever the number
    of rows. The rows are centred on ``centre`` first (exactly: float32 differences are
    exact in float64), so the Gram identity cancels only the spread of the rows around
    it, not their common part: more accurate than :func:`pairwise_sq_distances` on
    models that share a large common part.
    """
    x, centre = x.detach(), centre.detach()
    n, d = x.shape
    step = max(64, block_bytes(x, _BLOCK_BYTES) // (8 * n))
    part = torch.zeros(len(rows), n, dtype=torch.float64, device=x.device)
    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    if len(rows) == 0:
        return part
    for start in range(0, d, step):
        block = x[:, start : start + step].to(torch.float64)
        block -= centre[start : start + step].to(torch.float64)
        part.addmm_(block[rows], block.T)
        sq += torch.linalg.vecdot(block, block)
    d2 = (sq[rows][:, None] + sq[None, :] - 2.0 * part).clamp_min_(0.0)
    d2[torch.arange(len(rows)), rows] = 0.0
    return d2
