"""Model poisoning: what a Byzantine peer sends instead of its honest model.

Pure functions of honest vectors. Protocols exchange *models*, not gradients, so attacks
defined on updates are applied relative to a ``reference`` point, the model the round
started from: a model ``x`` has update ``x - reference``, and an update ``u`` is sent as
the model ``reference + u``. With ``reference=None`` the functions act on the vectors
themselves (for stacks that hold updates).

``honest`` is an ``(m, d)`` stack of honest vectors; an omniscient attacker (ALIE, IPM)
knows them, e.g. the models its honest neighbours sent it this round.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rows(honest: Tensor, who: str) -> Tensor:
    if honest.dim() == 1:
        return honest[None, :]
    if honest.dim() != 2 or honest.shape[0] == 0:
        raise ValueError(f"{who}: expected a vector (d,) or a stack (m, d) with m >= 1")
    return honest


def _mean_update(honest: Tensor, reference: Tensor | None, who: str) -> Tensor:
    mean = _rows(honest, who).mean(dim=0)
    return mean if reference is None else mean - reference


def sign_flip(honest: Tensor, reference: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """Reverse the update: ``reference - scale * (mean(honest) - reference)``; shape ``(d,)``.

    ``honest`` is one vector ``(d,)`` (the attacker's own trained model: the classic sign
    flip) or a stack ``(m, d)`` whose mean is flipped. Without ``reference`` it returns
    ``-scale * mean(honest)``.
    """
    update = _mean_update(honest, reference, "sign_flip")
    return -scale * update if reference is None else reference - scale * update


def ipm(honest: Tensor, eps: float = 0.5, reference: Tensor | None = None) -> Tensor:
    """Inner product manipulation (Xie et al., 2020): send ``-eps`` times the honest mean update.

    Returns ``-eps * mean(honest)``, or ``reference - eps * (mean(honest) - reference)`` with a
    reference; shape ``(d,)``. With a small ``eps`` the vector is close to the honest ones
    (it passes distance filters) yet has a negative inner product with the true update,
    so a mean or a loosely filtered aggregate makes less progress, or goes backwards.
    """
    update = _mean_update(honest, reference, "ipm")
    return -eps * update if reference is None else reference - eps * update


def gaussian(own: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``own`` plus i.i.d. ``N(0, sigma^2)`` noise in every coordinate; shape of ``own``."""
    if not sigma >= 0:
        raise ValueError(f"gaussian: sigma must be >= 0, got {sigma!r}")
    noise = torch.randn(own.shape, generator=generator, dtype=own.dtype, device=own.device)
    return own + sigma * noise


def scaling(own: Tensor, reference: Tensor, factor: float) -> Tensor:
    """Boost the update by ``factor``: ``reference + factor * (own - reference)``.

    The model-replacement trick: with ``factor`` about ``n``, the attacker's update survives
    being averaged with ``n - 1`` others.
    """
    return reference + factor * (own - reference)


def alie_z(n_total: int, f: int) -> float:
    """``z_max`` of "A Little Is Enough" (Baruch et al., 2019) for ``n_total`` vectors, ``f`` Byzantine.

    ``s = floor(n / 2 + 1) - f`` honest vectors must be won over for a majority;
    ``z_max = Phi^-1((n - s) / n)``, the largest shift (in standard deviations) that keeps
    the malicious vector closer to the mean than ``s`` of the honest ones, in expectation.
    """
    if isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < 1:
        raise ValueError(f"alie: n_total must be an int >= 1, got {n_total!r}")
    if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= n_total:
        raise ValueError(f"alie: f must be an int in [0, n_total], got {f!r}")
    s = math.floor(n_total / 2 + 1) - f
    p = (n_total - s) / n_total
    if not 0 < p < 1:
        raise ValueError(
            f"alie: z_max is infinite for n_total = {n_total}, f = {f} "
            f"(the quantile (n - s) / n = {p} must lie in (0, 1))"
        )
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def alie(honest: Tensor, n_total: int, f: int, z: float | None = None) -> Tensor:
    """ALIE: ``mean(honest) + z * std(honest)`` per coordinate; shape ``(d,)``.

    ``honest`` is ``(m, d)``; ``std`` is the population standard deviation (``ddof = 0``), so
    one honest vector gives its own value back. ``z`` defaults to :func:`alie_z` of
    ``(n_total, f)``. Each coordinate stays within the spread of the honest values, so
    coordinate-wise and distance-based rules cannot tell it apart, yet all ``f`` attackers
    push every coordinate the same way. Invariant to a shared reference point.
    """
    rows = _rows(honest, "alie")
    z = alie_z(n_total, f) if z is None else z
    std, mean = torch.std_mean(rows, dim=0, correction=0)
    return mean + z * std


def free_rider(received: Tensor) -> Tensor:
    """A free rider trains nothing and sends back the model it received (a copy of it)."""
    return received.clone()
