"""Gram matrices and pairwise distances of a stack, by matrix products.

Distance-based rules (Krum, Bulyan, NNM, the geometric median, FoolsGold) only need the
``n x n`` Gram matrix ``G = x @ x.T``: ``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij``. One
matrix product reads the stack once, instead of materialising ``n^2`` difference vectors.

Why float64: that identity cancels large terms. For models of norm 30 that differ by 0.1,
float32 rounding of the terms alone (``eps * ||x||^2 = 5e-5``) is 0.5% of the squared
distance (``0.01``), before any accumulation error over ``d`` terms; and
a Byzantine vector of magnitude 1e20 overflows float32 squares into ``inf - inf = nan``.
In float64 both are harmless, and the error of an honest pair depends only on the honest
norms, whatever the outliers. The stack is converted chunk by chunk, so the extra memory
is bounded (about 64 MiB) whatever ``d`` is.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_BYTES = 64 * 2**20


def gram(x: Tensor, extra: Tensor | None = None) -> Tensor:
    """``x @ x.T`` accumulated in float64 over column chunks; shape ``(n, n)``.

    With ``extra`` (m, d), the Gram matrix of the rows of ``x`` followed by those of
    ``extra``, shape ``(n + m, n + m)``, without concatenating the full stacks.
    """
    n, d = x.shape
    rows = n + (0 if extra is None else extra.shape[0])
    step = max(1, _CHUNK_BYTES // (8 * rows))
    g = torch.zeros(rows, rows, dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        block = x[:, start : start + step]
        if extra is not None:
            block = torch.cat([block, extra[:, start : start + step].to(x.dtype)])
        block = block.to(torch.float64)
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
