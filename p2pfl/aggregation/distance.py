"""Distance-based rules: Krum, Multi-Krum, Bulyan and nearest-neighbour mixing (NNM).

All of them start from the ``n x n`` matrix of squared distances, computed once by a
matrix product (see ``_linalg``); only the final averaging reads the ``(n, d)`` stack
again. Ties between equal scores are broken by the lower row index, so results are
deterministic.

Krum and Multi-Krum take the fast centred float32 Gram matrix and then make sure their
choice is the one exact (float64) distances give: every row gets an interval that
surely holds its exact score, from an error estimate of each distance; the rows whose
fate those intervals leave open (usually none, at worst a handful of near ties) are
re-scored with exact float64 distances, one extra read of the stack. Bulyan and NNM make
``O(n)`` nested choices and keep the exact float64 Gram matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_f, check_stack, require_n
from p2pfl.aggregation._linalg import (
    centred_gram,
    exact_sq_distance_rows,
    pairwise_sq_distances,
    use_fast_gram,
)
from p2pfl.aggregation.coordinatewise import coordinate_median


def _krum_scores(d2: Tensor, f: int, alive: Tensor | None = None) -> Tensor:
    """Krum score of every row: the sum of squared distances to its ``r - f - 2`` nearest.

    ``d2`` is the (n, n) squared-distance matrix; ``alive`` (bool, n) restricts the game to
    the rows still in play (``r`` of them), as Bulyan's repeated Krum needs. Rows not alive
    score ``inf``. The neighbour count is kept in ``[1, r - 1]`` so that the late rounds of
    Bulyan, where ``r - f - 2`` drops below 1, still rank rows by their nearest neighbour.
    """
    n = d2.shape[0]
    if alive is None:
        alive = torch.ones(n, dtype=torch.bool, device=d2.device)
    r = int(alive.sum())
    k = min(max(r - f - 2, 1), r - 1)
    if k <= 0:  # a single row left: it wins
        return torch.where(alive, 0.0, torch.inf).to(d2.dtype)
    masked = d2.masked_fill(~alive[None, :], torch.inf)
    masked.fill_diagonal_(torch.inf)  # a row is not its own neighbour
    scores = torch.topk(masked, k, dim=1, largest=False, sorted=False).values.sum(dim=1)
    return scores.masked_fill(~alive, torch.inf)


def krum_scores(x: Tensor, f: int) -> Tensor:
    """Krum score of every row of ``x`` (n, d): shape ``(n,)``, float64; lower is more central."""
    check_stack(x, "krum")
    check_f(f, "krum")
    require_n("krum", x.shape[0], f)
    return _krum_scores(pairwise_sq_distances(x), f)


def _k_smallest_sum(d2: Tensor, k: int) -> Tensor:
    """Row sums of the ``k`` smallest off-diagonal entries of a square matrix."""
    masked = d2.clone()
    masked.fill_diagonal_(torch.inf)
    return torch.topk(masked, k, dim=1, largest=False, sorted=False).values.sum(dim=1)


def krum_best(x: Tensor, f: int, m: int) -> Tensor:
    """Indices of the ``m`` rows with the smallest exact Krum scores, in index order.

    The same set as ``sort(krum_scores(x, f), stable=True)[:m]`` (ties by lower index),
    found from the fast centred Gram matrix (see the module docstring). With ``e_ij``
    the error estimate of distance ``ij`` and ``N~(i)`` the ``k`` nearest by the fast
    distances, the exact score lies in ``[sum of the k smallest (d~_ij - e_ij),
    sum over N~(i) of (d~_ij + e_ij)]``. A row is surely chosen when fewer than ``m``
    others could score below it, surely not when ``m`` others surely do; the rest are
    scored exactly and fill the remaining places.
    """
    n = x.shape[0]
    k = min(max(n - f - 2, 1), n - 1)
    if not use_fast_gram(x):  # small: exact distances cost less than the bounds
        order = torch.sort(_krum_scores(pairwise_sq_distances(x), f), stable=True).indices
        return torch.sort(order[:m]).values
    cg = centred_gram(x)
    d2 = cg.sq_distances()
    err = cg.error_scale()
    near = d2.clone()
    near.fill_diagonal_(torch.inf)
    picked = torch.topk(near, k, dim=1, largest=False, sorted=False)
    upper = picked.values.sum(dim=1) + err.gather(1, picked.indices).sum(dim=1)
    lower = _k_smallest_sum((d2 - err).clamp_min(0.0), k)
    others = ~torch.eye(n, dtype=torch.bool, device=d2.device)
    may_beat = ((lower[None, :] <= upper[:, None]) & others).sum(dim=1)  # j could precede i
    beats = ((upper[None, :] < lower[:, None]) & others).sum(dim=1)  # j surely precedes i
    surely_in = may_beat < m
    open_rows = (~surely_in & (beats < m)).nonzero().flatten()
    chosen = surely_in.nonzero().flatten()
    places = m - len(chosen)
    if places > 0:
        centre = x[cg.reference]
        exact = exact_sq_distance_rows(x, open_rows, centre)
        exact[torch.arange(len(open_rows)), open_rows] = torch.inf  # not its own neighbour
        scores = torch.topk(exact, k, dim=1, largest=False, sorted=False).values.sum(dim=1)
        order = torch.sort(scores, stable=True).indices[:places]  # open_rows ascend
        chosen = torch.cat([chosen, open_rows[order]])
    return torch.sort(chosen).values


def krum(x: Tensor, f: int) -> Tensor:
    """Krum (Blanchard et al., 2017): the row with the smallest Krum score; shape ``(d,)``.

    Needs ``n > 2f + 2``. With at most ``f`` Byzantine rows the chosen row is one whose
    ``n - f - 2`` nearest neighbours are close, which an isolated outlier never is. The
    result is a copy, never a view of the stack.
    """
    check_stack(x, "krum")
    check_f(f, "krum")
    require_n("krum", x.shape[0], f)
    return x[int(krum_best(x, f, 1)[0])].clone()


def multi_krum(x: Tensor, f: int, m: int | None = None) -> Tensor:
    """Mean of the ``m`` rows with the smallest Krum scores (default ``m = n - f``).

    Scores are computed once on the whole stack (not recomputed after each pick), the
    usual reading of Blanchard et al.; ``m = 1`` is Krum. Needs ``n > 2f + 2``.
    """
    check_stack(x, "krum")
    check_f(f, "krum")
    n = x.shape[0]
    require_n("krum", n, f)
    m = n - f if m is None else m
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"multi_krum: m must be an int in [1, n] = [1, {n}], got {m!r}")
    chosen = krum_best(x, f, m)
    # One matrix-vector product reads the stack once; x[chosen].mean(0) would copy the rows.
    pick = torch.zeros(n, dtype=x.dtype, device=x.device)
    pick[chosen] = 1.0
    return (pick @ x) / m


def bulyan(x: Tensor, f: int) -> Tensor:
    """Bulyan (El Mhamdi et al., 2018) over ``x`` (n, d); shape ``(d,)``. Needs ``n >= 4f + 3``.

    1. Select ``theta = n - 2f`` rows by repeated Krum: each round picks the best-scored
       row among those left and removes it (scores recomputed on the remaining rows).
    2. For every coordinate, average the ``beta = theta - 2f`` selected values closest to
       that coordinate's median over the selection.

    Step 1 bounds how far a selected vector can be; step 2 bounds each coordinate, which
    Krum alone leaves exposed in high dimension.
    """
    check_stack(x, "bulyan")
    check_f(f, "bulyan")
    n = x.shape[0]
    require_n("bulyan", n, f)
    theta, beta = n - 2 * f, n - 4 * f
    d2 = pairwise_sq_distances(x)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    chosen: list[int] = []
    for _ in range(theta):
        best = int(torch.argmin(_krum_scores(d2, f, alive)))
        chosen.append(best)
        alive[best] = False
    selected = x[torch.tensor(chosen, device=x.device)]
    if beta == theta:  # f = 0: nothing to trim around the median
        return selected.mean(dim=0)
    med = coordinate_median(selected)
    closest = torch.topk((selected - med).abs(), beta, dim=0, largest=False, sorted=False).indices
    return torch.gather(selected, 0, closest).mean(dim=0)


def nnm(x: Tensor, f: int) -> Tensor:
    """Nearest-neighbour mixing (Allouah et al., 2023): a pre-aggregation, shape ``(n, d)``.

    Row ``i`` is replaced by the mean of its ``n - f`` nearest rows, itself included.
    Feeding the mixed stack to a robust rule (``nnm+krum``, ``nnm+median``...) makes that
    rule much less sensitive to heterogeneous honest vectors. Needs ``n > 2f``. Row order
    is kept, so the local peer's row stays where it was.
    """
    check_stack(x, "nnm")
    check_f(f, "nnm")
    n = x.shape[0]
    require_n("nnm", n, f)
    if f == 0:
        return x.mean(dim=0, keepdim=True).expand(n, -1).clone()
    d2 = pairwise_sq_distances(x)
    # A stable sort breaks distance ties by row index; row i is always first (distance 0).
    nearest = torch.sort(d2, dim=1, stable=True).indices[:, : n - f]
    mixing = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    mixing.scatter_(1, nearest, 1.0 / (n - f))
    return mixing @ x
