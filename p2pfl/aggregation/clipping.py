"""Centered clipping (Karimireddy et al., 2021; ClippedGossip, He et al., 2022).

Starting from a centre ``v`` (in a decentralised protocol: the peer's own model), move
towards every vector, but by at most ``tau`` per vector:

    v <- v + sum_i w_i * clip_tau(x_i - v),   clip_tau(z) = z * min(1, tau / ||z||)

with ``w`` uniform (``1/n``) or the given mixing weights, normalised. One Byzantine vector
can then shift ``v`` by at most ``w_i * tau`` per iteration, however far away it is, while
honest vectors within ``tau`` of ``v`` are averaged exactly as by the mean.

Two ways to run it, chosen by cost. With few iterations (the usual one to three) the
clipping is done directly, streaming over column blocks of the stack: one pass
measures every ``||x_i - v||``, and each iteration's pass both forms the new ``v``
and measures the distances to it while the block is still in cache, so ``L``
iterations read the stack ``L + 1`` times. With more than three iterations, ``v`` stays an
affine combination of the rows and the centre, ``v = a[:n] @ x + a[n] * centre``, and
distances come from one centred Gram matrix of ``[x; centre]`` (compute-bound, about
eight passes at n = 100) whatever the number of iterations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_stack, normalised_weights
from p2pfl.aggregation._linalg import block_bytes, centred_gram

# Up to this many iterations the direct form beats the Gram matrix (measured at n = 100,
# d = 1e6, in passes over the stack: direct 3.1 for one iteration, 7.6 for three, about
# 2.2 more per iteration; the centred Gram matrix and the final combination about 8.5).
_DIRECT_ITERS = 3
# Column blocks of the direct form: (n x block) values that stay in L2 cache.
_BLOCK_BYTES = 512 * 2**10


def centered_clipping(
    x: Tensor,
    center: Tensor,
    tau: float,
    iters: int = 1,
    weights: Tensor | None = None,
) -> Tensor:
    """Centered clipping of ``x`` (n, d) around ``center`` (d,) with radius ``tau``; shape ``(d,)``.

    ``tau = inf`` turns clipping off: one iteration then returns the (weighted) mean.
    ``iters`` re-centres on the previous result, as in the original paper's ``L`` steps.
    """
    check_stack(x, "centered_clipping")
    n, d = x.shape
    if center.shape != (d,):
        raise ValueError(
            f"centered_clipping: center must have shape ({d},), got {tuple(center.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"centered_clipping: tau must be > 0 (or inf), got {tau!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"centered_clipping: iters must be an int >= 1, got {iters!r}")
    w = normalised_weights(weights, n, "centered_clipping", x.device)
    if math.isinf(tau):  # no clipping: one step from any centre lands on the weighted mean
        return w.to(x.dtype) @ x
    if iters <= _DIRECT_ITERS:
        return _direct(x, center, tau, iters, w)
    return _by_gram(x, center, tau, iters, w)


def _scales(sq: Tensor, tau: float) -> Tensor:
    """``min(1, tau / ||x_i - v||)`` from the squared distances (float64)."""
    return (tau / sq.sqrt().clamp_min(1e-300)).clamp_max(1.0)


def _direct(x: Tensor, center: Tensor, tau: float, iters: int, w: Tensor) -> Tensor:
    """Clip around ``v`` directly: ``iters + 1`` streaming passes over the stack.

    Differences are taken in the stack's dtype, each block's squares summed by a
    vectorised dot product and the blocks' sums in float64, so every ``||x_i - v||`` is
    within about 1e-7 (relative) of the exact one.
    """
    x = x.detach()  # updated in place below: no gradient flows through this form
    n, d = x.shape
    step = max(64, block_bytes(x, _BLOCK_BYTES) // (n * x.element_size()))
    v = center.detach().to(device=x.device, dtype=x.dtype).clone()
    buf = torch.empty(n, min(step, d), dtype=x.dtype, device=x.device)

    def add_sq(block: Tensor, centre: Tensor, sq: Tensor) -> None:
        diff = buf[:, : block.shape[1]]
        torch.sub(block, centre, out=diff)
        # A dot product per row of one cache-sized block (vectorised accumulators),
        # then float64 across blocks: ~1e-7 relative, and 0.5 pass cheaper than
        # widening every square to float64.
        sq += torch.linalg.vecdot(diff, diff)

    sq = torch.zeros(n, dtype=torch.float64, device=x.device)
    for start in range(0, d, step):
        add_sq(x[:, start : start + step], v[start : start + step], sq)
    _fix_overflow(x, v, sq)
    for it in range(iters):
        c = w * _scales(sq, tau)
        keep, coeffs = float(1.0 - c.sum()), c.to(x.dtype)
        last = it == iters - 1
        sq = torch.zeros(n, dtype=torch.float64, device=x.device)
        for start in range(0, d, step):
            block, part = x[:, start : start + step], v[start : start + step]
            # v + sum_i c_i (x_i - v) = v * (1 - sum c) + sum_i c_i x_i
            part.addmv_(block.T, coeffs, beta=keep)
            if not last:
                add_sq(block, part, sq)
        if not last:
            _fix_overflow(x, v, sq)
    return v


def _fix_overflow(x: Tensor, v: Tensor, sq: Tensor) -> None:
    """Redo in float64 the distances whose float32 squares overflowed (entries near 1e19+)."""
    bad = (~torch.isfinite(sq)).nonzero().flatten()
    if len(bad) == 0:
        return
    far = x[bad].to(torch.float64) - v.to(torch.float64)
    sq[bad] = (far * far).sum(dim=1)


def _by_gram(x: Tensor, center: Tensor, tau: float, iters: int, w: Tensor) -> Tensor:
    """Iterate on the coefficients of ``v`` over ``[x; centre]``; the stack is read twice."""
    n = x.shape[0]
    cg = centred_gram(x, centre=center)
    # Rows centred on the centre: the centre's own centred row is zero, so the Gram
    # matrix of [x; centre] is g bordered by zeros.
    g = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=x.device)
    g[:n, :n] = cg.g
    coeffs = torch.zeros(n + 1, dtype=torch.float64, device=x.device)
    coeffs[n] = 1.0
    for _ in range(iters):
        ga = g @ coeffs
        sq = (g.diagonal()[:n] - 2.0 * ga[:n] + coeffs @ ga).clamp_min(0.0)
        c = w * _scales(sq, tau)
        coeffs = coeffs * (1.0 - c.sum())
        coeffs[:n] += c
    return coeffs[:n].to(x.dtype) @ x + coeffs[n].to(x.dtype) * center.to(x.dtype)
