"""Coordinate-wise robust statistics: each coordinate is aggregated on its own.

Both rules look at one coordinate's ``n`` values at a time, so they tolerate outliers in
every coordinate but ignore how coordinates move together (which ALIE exploits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_f, check_stack, require_n


def coordinate_median(x: Tensor) -> Tensor:
    """Median of every coordinate of ``x`` (n, d); shape ``(d,)``.

    For even ``n`` it is the mean of the two middle values (numpy's convention), not
    ``torch.median``'s lower middle value: that keeps the rule symmetric under ``x -> -x``.
    Breakdown point 1/2: with fewer than ``n / 2`` arbitrary vectors every output
    coordinate stays within the range of the honest values of that coordinate.
    """
    check_stack(x, "median")
    lower = x.median(dim=0).values
    if x.shape[0] % 2 == 1:
        return lower
    # The upper middle value is the lower one when more than n/2 values are <= it, else the
    # smallest value above it: a few streaming passes, cheaper than a second median pass or
    # a full sort of the stack (which also allocates int64 indices).
    at_most = x <= lower
    above = x.masked_fill(at_most, torch.inf).amin(dim=0)
    upper = torch.where(at_most.sum(dim=0) > x.shape[0] // 2, lower, above)
    return (lower + upper) / 2


def trimmed_mean(x: Tensor, f: int) -> Tensor:
    """Per coordinate, drop the ``f`` largest and ``f`` smallest values and average the rest.

    ``x`` is (n, d); needs ``n > 2f``; returns shape ``(d,)``. With at most ``f`` outliers
    the output lies within the range of the honest values of each coordinate. The trim
    is done by sorting rather than by subtracting top-k sums, because subtracting the sum
    of a 1e30 outlier from a total containing it would wipe out the honest digits.
    """
    check_stack(x, "trimmed_mean")
    check_f(f, "trimmed_mean")
    n = x.shape[0]
    require_n("trimmed_mean", n, f)
    if f == 0:
        return x.mean(dim=0)
    kept = torch.sort(x, dim=0).values[f : n - f]
    return kept.mean(dim=0)
