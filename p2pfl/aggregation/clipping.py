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

from p2pfl.aggregation._checks import check_stack, check_weights
from p2pfl.aggregation._linalg import sq_distances_to


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
    w = check_weights(weights, n, "centered_clipping")
    if w is None:
        w = torch.full((n,), 1.0 / n, dtype=torch.float64, device=x.device)
    else:
        w = w.to(device=x.device, dtype=torch.float64)
        w = w / w.sum()
    v = center.to(x.dtype)
    for _ in range(iters):
        if math.isinf(tau):
            scale = torch.ones(n, dtype=torch.float64, device=x.device)
        else:
            norms = sq_distances_to(x, v).sqrt()
            scale = (tau / norms.clamp_min(1e-300)).clamp_max(1.0)
        c = w * scale
        # v + sum_i c_i (x_i - v) == v * (1 - sum c) + c @ x, without an (n, d) temporary.
        v = v * float(1.0 - c.sum()) + c.to(x.dtype) @ x
    return v
