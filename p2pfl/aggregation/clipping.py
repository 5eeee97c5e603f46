"""Centered clipping (Karimireddy et al., 2021; ClippedGossip, He et al., 2022).

Starting from a centre ``v`` (in a decentralised protocol: the peer's own model), move
towards every vector, but by at most ``tau`` per vector:

    v <- v + sum_i w_i * clip_tau(x_i - v),   clip_tau(z) = z * min(1, tau / ||z||)

with ``w`` uniform (``1/n``) or the given mixing weights, normalised. One Byzantine vector
can then shift ``v`` by at most ``w_i * tau`` per iteration, however far away it is, while
honest vectors within ``tau`` of ``v`` are averaged exactly as by the mean.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_stack, normalised_weights
from p2pfl.aggregation._linalg import gram


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
    # v stays an affine combination of the rows and the centre, v = a[:n] @ x + a[n] * centre,
    # so distances come from one Gram matrix of [x; centre] whatever the number of
    # iterations, and the stack is read twice in all (Gram, final combination).
    coeffs = torch.zeros(n + 1, dtype=torch.float64, device=x.device)
    coeffs[n] = 1.0
    g = None if math.isinf(tau) else gram(x, center[None, :])
    for _ in range(iters):
        if g is None:
            scale = torch.ones(n, dtype=torch.float64, device=x.device)
        else:
            ga = g @ coeffs
            sq = (g.diagonal()[:n] - 2.0 * ga[:n] + coeffs @ ga).clamp_min(0.0)
            scale = (tau / sq.sqrt().clamp_min(1e-300)).clamp_max(1.0)
        c = w * scale
        # v + sum_i c_i (x_i - v) = v * (1 - sum c) + sum_i c_i x_i
        coeffs = coeffs * (1.0 - c.sum())
        coeffs[:n] += c
    return coeffs[:n].to(x.dtype) @ x + coeffs[n].to(x.dtype) * center.to(x.dtype)
