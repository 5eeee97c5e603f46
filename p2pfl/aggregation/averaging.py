"""Plain and weighted averaging: the non-robust baseline every protocol starts from."""

from __future__ import annotations

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_stack, check_weights


def mean(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """Average of the rows of ``x`` (n, d); shape ``(d,)``.

    ``weights`` (n,) are non-negative and are divided by their sum, so a row of a
    Metropolis-Hastings matrix (which sums to 1) gives the D-PSGD mixing step, and raw
    trust scores (SybilWall, own weight 1) give the normalised trust-weighted average.
    Without weights every row counts the same. Breakdown point 0: one vector moves it
    arbitrarily far.
    """
    check_stack(x, "mean")
    w = check_weights(weights, x.shape[0], "mean")
    if w is None:
        # A matrix-vector product reads the stack once, row-major; ``x.mean(dim=0)`` is a
        # strided reduction, about twice as slow on CPU for a tall (n, d) stack.
        return torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device) @ x
    w = w.to(device=x.device, dtype=x.dtype)
    return (w / w.sum()) @ x
