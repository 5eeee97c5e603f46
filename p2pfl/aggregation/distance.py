"""Distance-based rules: Krum, Multi-Krum, Bulyan and nearest-neighbour mixing (NNM).

All of them start from the ``n x n`` matrix of squared distances, computed once by a
matrix product (see ``_linalg``); only the final averaging reads the ``(n, d)`` stack
again. Ties between equal scores are broken by the lower row index, so results are
deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_f, check_stack, require_n
from p2pfl.aggregation._linalg import pairwise_sq_distances
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


def krum(x: Tensor, f: int) -> Tensor:
    """Krum (Blanchard et al., 2017): the row with the smallest Krum score; shape ``(d,)``.

    Needs ``n > 2f + 2``. With at most ``f`` Byzantine rows the chosen row is one whose
    ``n - f - 2`` nearest neighbours are close, which an isolated outlier never is. The
    result is a copy, never a view of the stack.
    """
    scores = krum_scores(x, f)
    return x[int(torch.argmin(scores))].clone()


def multi_krum(x: Tensor, f: int, m: int | None = None) -> Tensor:
    """Mean of the ``m`` rows with the smallest Krum scores (default ``m = n - f``).

    Scores are computed once on the whole stack (not recomputed after each pick), the
    usual reading of Blanchard et al.; ``m = 1`` is Krum. Needs ``n > 2f + 2``.
    """
    scores = krum_scores(x, f)
    n = x.shape[0]
    m = n - f if m is None else m
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"multi_krum: m must be an int in [1, n] = [1, {n}], got {m!r}")
    order = torch.sort(scores, stable=True).indices[:m]
    return x[order].mean(dim=0)


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
