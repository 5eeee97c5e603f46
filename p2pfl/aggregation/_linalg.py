"""Gram matrices and pairwise distances of a stack, by matrix products.

Distance-based rules (Krum, Bulyan, NNM, the geometric median, FoolsGold) only need the
``n x n`` Gram matrix ``G = x @ x.T``: ``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij``. One
matrix product reads the stack once, instead of materialising ``n^2`` difference vectors.

Why float64: that identity cancels large terms. Models of norm 30 that differ by 0.1 lose
most digits of their distance in float32 (``eps * ||x||^2 = 6e-5`` against ``0.01``), and
a Byzantine vector of magnitude 1e20 overflows float32 squares into ``inf - inf = nan``.
In float64 both are harmless, and the error of an honest pair depends only on the honest
norms, whatever the outliers. The stack is converted chunk by chunk, so the extra memory
is bounded (about 64 MiB) whatever ``d`` is.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_BYTES = 64 * 2**20


def gram(x: Tensor) -> Tensor:
    """``x @ x.T`` accumulated in float64 over column chunks; shape ``(n, n)``."""
    n, d = x.shape
    step = max(1, _CHUNK_BYTES // (8 * n))
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        block = x[:, start : start + step].to(torch.float64)
        g.addmm_(block, block.T)
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


def sq_distances_to(x: Tensor, point: Tensor) -> Tensor:
    """``||x_i - point||^2`` for every row, in float64, reading ``x`` in column chunks.

    Used where the reference point is not a row of the stack (centered clipping), so the
    Gram matrix does not help; chunking keeps the ``(n, d)`` difference out of memory.
    """
    n, d = x.shape
    step = max(1, _CHUNK_BYTES // (8 * n))
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        diff = x[:, start : start + step].to(torch.float64) - point[start : start + step].to(
            torch.float64
        )
        out += diff.square().sum(dim=1)
    return out
