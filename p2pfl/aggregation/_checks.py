"""Input validation shared by the aggregation rules.

Every rule takes a stack ``x`` of ``n`` parameter vectors, shape ``(n, d)``. The checks
live here so that each rule fails the same way, with a message that says what the rule
needs and why, instead of an index error deep inside a sort.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from p2pfl.errors import P2PFLError


class TooFewVectors(P2PFLError, ValueError):
    """A rule's ``f`` cannot be tolerated on this many vectors (``require_n``).

    Its own type because it is a fact of the round, not a mistake in the call: a
    protocol whose neighbours did not all send this round meets it, and keeps its own
    model rather than mix too few models to be robust (``SynchronousRoundProtocol``).
    """


def check_stack(x: Tensor, rule: str) -> Tensor:
    """Return ``x`` if it is a non-empty floating ``(n, d)`` stack, else raise ValueError."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{rule}: expected a torch.Tensor of shape (n, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{rule}: expected a stack of shape (n, d), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{rule}: the stack is empty (n = 0); there is nothing to aggregate")
    if not x.is_floating_point():
        raise ValueError(f"{rule}: expected a floating-point stack, got dtype {x.dtype}")
    return x


def check_weights(weights: Tensor | None, n: int, rule: str) -> Tensor | None:
    """Validate non-negative weights of shape ``(n,)`` with a positive sum.

    Weights are returned unnormalised; callers divide by the sum so that both
    Metropolis-Hastings rows (summing to 1) and raw scores (SybilWall) can be passed.
    """
    if weights is None:
        return None
    if weights.shape != (n,):
        raise ValueError(
            f"{rule}: weights must have shape ({n},) to match the stack, got {tuple(weights.shape)}"
        )
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{rule}: weights must be finite and non-negative, got {weights.tolist()}")
    if float(weights.sum()) <= 0.0:
        raise ValueError(f"{rule}: weights sum to zero; at least one vector needs positive weight")
    return weights


def normalised_weights(weights: Tensor | None, n: int, rule: str, device: torch.device) -> Tensor:
    """Weights (validated as above) divided by their sum, float64; uniform ``1/n`` when None."""
    w = check_weights(weights, n, rule)
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    w = w.to(device=device, dtype=torch.float64)
    return w / w.sum()


def check_f(f: int, rule: str) -> int:
    """Return ``f`` if it is a non-negative int (bools are refused: ``True`` is not a count)."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(
            f"{rule}: f (the number of Byzantine vectors) must be an int >= 0, got {f!r}"
        )
    return f


# rule -> (is n large enough for f, the largest feasible f for n, the requirement explained)
_REQUIREMENTS: dict[str, tuple[Callable[[int, int], bool], Callable[[int], int], str]] = {
    "trimmed_mean": (
        lambda n, f: n > 2 * f,
        lambda n: (n - 1) // 2,
        "n > 2f: it drops the f largest and the f smallest value of every coordinate, "
        "so at least one value must remain",
    ),
    "krum": (
        lambda n, f: n > 2 * f + 2,
        lambda n: (n - 3) // 2,
        "n > 2f + 2: each vector is scored by its distances to its n - f - 2 nearest others, "
        "and only when honest vectors outnumber 2f + 2 is the best score an honest one's",
    ),
    "bulyan": (
        lambda n, f: n >= 4 * f + 3,
        lambda n: (n - 3) // 4,
        "n >= 4f + 3: it selects n - 2f vectors with Krum, then averages the n - 4f values "
        "closest to the median of each coordinate, and needs at least 3 of them",
    ),
    "nnm": (
        lambda n, f: n > 2 * f,
        lambda n: (n - 1) // 2,
        "n > 2f: each vector is replaced by the mean of its n - f nearest vectors, "
        "which must contain an honest majority",
    ),
}


def require_n(rule: str, n: int, f: int) -> None:
    """Raise ``TooFewVectors`` (a ValueError), explaining the rule's requirement, when
    ``n`` is too small for ``f``."""
    ok, largest, why = _REQUIREMENTS[rule]
    if not ok(n, f):
        hint = (
            f"the largest f it supports for n = {n} is {largest(n)}"
            if largest(n) >= 0
            else f"it cannot run on n = {n} vectors at all"
        )
        raise TooFewVectors(f"{rule} with f = {f} needs {why}; got n = {n} ({hint})")


def largest_f(rule: str, n: int) -> int:
    """The largest ``f`` the rule supports on ``n`` vectors; negative when none does."""
    return _REQUIREMENTS[rule][1](n)


def resolve_f(n: int, f: int | None, f_fraction: float | None, rule: str) -> int:
    """Turn ``f`` (a count) or ``f_fraction`` (of ``n``, rounded down) into a count."""
    if f is not None and f_fraction is not None:
        raise ValueError(f"{rule}: give either f or f_fraction, not both")
    if f is not None:
        return check_f(f, rule)
    if f_fraction is None:
        raise ValueError(f"{rule}: needs f (a count) or f_fraction (of n, in [0, 1))")
    if isinstance(f_fraction, bool) or not 0.0 <= float(f_fraction) < 1.0:
        raise ValueError(f"{rule}: f_fraction must be a number in [0, 1), got {f_fraction!r}")
    # The tiny slack keeps 0.29 * 100 (= 28.999999999999996 in binary) at 29, not 28.
    return math.floor(float(f_fraction) * n + 1e-9)
