"""Geometric median by the smoothed Weiszfeld algorithm (as in RFA, Pillutla et al., 2022).

The geometric median minimises ``sum_i w_i ||z - x_i||``; it has breakdown point 1/2 and,
unlike the coordinate median, is rotation invariant. Weiszfeld's iteration re-weights each
point by the inverse of its distance to the current estimate:

    z <- sum_i b_i x_i / sum_i b_i,   b_i = w_i / max(eps, ||z - x_i||)

``eps`` (the smoothing) keeps a weight finite when ``z`` lands on a data point.

Every iterate is a convex combination ``z = sum_i a_i x_i`` of the rows, so distances can
be read off the Gram matrix ``G``: ``||z - x_j||^2 = a'Ga - 2(Ga)_j + G_jj``. The
iterations then cost ``O(n^2)`` each and the ``(n, d)`` stack is read only twice (once for
``G``, once for the final combination), however many iterations run. ``G`` is the fast
centred Gram matrix of ``_linalg`` (rows minus a reference row ``r``, float32 products
summed in float64): since the coefficients sum to 1, the identity holds for the centred
rows as well, and ``||z||^2`` (for the stopping test) is ``||r||^2 + 2 a.(r.(x - r)) + a'Ga``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_stack, normalised_weights
from p2pfl.aggregation._linalg import centred_gram, gram, use_fast_gram


def geometric_median_coefficients(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    iters: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-7,
) -> Tensor:
    """The convex coefficients ``a`` (n,), float64, with ``geometric_median(x) = a @ x``.

    Starts from the (weighted) mean; stops after ``iters`` iterations, or earlier once an
    iteration moves the estimate by less than ``tol`` times its norm. (A test on the
    objective would stop too early when far outliers dominate it.)
    """
    check_stack(x, "geometric_median")
    n = x.shape[0]
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"geometric_median: iters must be an int >= 1, got {iters!r}")
    if not eps > 0:
        raise ValueError(f"geometric_median: eps (smoothing) must be > 0, got {eps!r}")
    w = normalised_weights(weights, n, "geometric_median", x.device)
    if not use_fast_gram(x):  # small: the exact Gram matrix, uncentred
        g, cross, rr = gram(x), torch.zeros(n, dtype=torch.float64, device=x.device), 0.0
    else:
        cg = centred_gram(x)
        g, cross, rr = cg.g, cg.cross, cg.rr
    diag = g.diagonal()

    def distances(a: Tensor) -> Tensor:
        ga = g @ a
        return (a @ ga - 2.0 * ga + diag).clamp_min(0.0).sqrt()

    coeffs = w.clone()
    dist = distances(coeffs)
    for _ in range(iters):
        beta = w / dist.clamp_min(eps)
        new = beta / beta.sum()
        step = new - coeffs
        moved_sq = float(step @ (g @ step))  # ||z_new - z_old||^2
        # ||z_new||^2, at least eps^2
        size_sq = max(rr + 2.0 * float(new @ cross) + float(new @ (g @ new)), eps * eps)
        coeffs = new
        if moved_sq <= tol * tol * size_sq:
            break
        dist = distances(coeffs)
    return coeffs


def geometric_median(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    iters: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-7,
) -> Tensor:
    """Smoothed-Weiszfeld geometric median of the rows of ``x`` (n, d); shape ``(d,)``.

    ``weights`` (n,), non-negative, make it the weighted geometric median. ``eps`` is the
    smoothing distance (in the units of ``x``), ``iters`` the iteration cap, ``tol`` the
    relative move of the estimate below which it stops.
    """
    coeffs = geometric_median_coefficients(x, weights, iters=iters, eps=eps, tol=tol)
    return coeffs.to(x.dtype) @ x
