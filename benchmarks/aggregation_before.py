"""The aggregation rules as they were before the memory-bound rework (issue 17), kept for
``benchmarks/aggregation.py`` only, so that "before" and "after" are timed in one run on
the same stack. Not imported by the package; checks on inputs are left out.

- median: ``x.median(dim=0)`` plus a streaming fix-up for even n;
- trimmed mean: a full sort of the stack along dim 0;
- Krum and the geometric median: an exact float64 Gram matrix (chunks widened to float64);
- centered clipping: a float64 Gram matrix of ``[x; centre]``, whatever the iterations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_CHUNK_BYTES = 64 * 2**20


def gram(x: Tensor, extra: Tensor | None = None) -> Tensor:
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


def _sq_distances(x: Tensor) -> Tensor:
    g = gram(x)
    diag = g.diagonal()
    d2 = (diag[:, None] + diag[None, :] - 2.0 * g).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2


def coordinate_median(x: Tensor) -> Tensor:
    lower = x.median(dim=0).values
    if x.shape[0] % 2 == 1:
        return lower
    at_most = x <= lower
    above = x.masked_fill(at_most, torch.inf).amin(dim=0)
    upper = torch.where(at_most.sum(dim=0) > x.shape[0] // 2, lower, above)
    return (lower + upper) / 2


def trimmed_mean(x: Tensor, f: int) -> Tensor:
    n = x.shape[0]
    if f == 0:
        return x.mean(dim=0)
    return torch.sort(x, dim=0).values[f : n - f].mean(dim=0)


def krum_scores(x: Tensor, f: int) -> Tensor:
    d2 = _sq_distances(x)
    n = d2.shape[0]
    k = min(max(n - f - 2, 1), n - 1)
    masked = d2.clone()
    masked.fill_diagonal_(torch.inf)
    return torch.topk(masked, k, dim=1, largest=False, sorted=False).values.sum(dim=1)


def krum(x: Tensor, f: int) -> Tensor:
    return x[int(torch.argmin(krum_scores(x, f)))].clone()


def multi_krum(x: Tensor, f: int, m: int | None = None) -> Tensor:
    m = x.shape[0] - f if m is None else m
    order = torch.sort(krum_scores(x, f), stable=True).indices[:m]
    return x[order].mean(dim=0)


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6, tol: float = 1e-7) -> Tensor:
    n = x.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    g = gram(x)
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
        moved_sq = float(step @ (g @ step))
        size_sq = max(float(new @ (g @ new)), eps * eps)
        coeffs = new
        if moved_sq <= tol * tol * size_sq:
            break
        dist = distances(coeffs)
    return coeffs.to(x.dtype) @ x


def centered_clipping(x: Tensor, center: Tensor, tau: float, iters: int = 1) -> Tensor:
    n = x.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    coeffs = torch.zeros(n + 1, dtype=torch.float64)
    coeffs[n] = 1.0
    g = None if math.isinf(tau) else gram(x, center[None, :])
    for _ in range(iters):
        if g is None:
            scale = torch.ones(n, dtype=torch.float64)
        else:
            ga = g @ coeffs
            sq = (g.diagonal()[:n] - 2.0 * ga[:n] + coeffs @ ga).clamp_min(0.0)
            scale = (tau / sq.sqrt().clamp_min(1e-300)).clamp_max(1.0)
        c = w * scale
        coeffs = coeffs * (1.0 - c.sum())
        coeffs[:n] += c
    return coeffs[:n].to(x.dtype) @ x + coeffs[n].to(x.dtype) * center.to(x.dtype)
