"""Aggregation rules by name, behind one call signature that every protocol uses.

A protocol holds an :class:`Aggregator` and calls it on the models it has gathered:

    agg = get_aggregator("krum", f_fraction=0.2)
    new_params = agg(stack, weights=mh_row, own=0)

``stack`` is ``(n, d)``, one model per row; row ``own`` is the local peer's own model
(centered clipping clips around it); ``weights`` (n,) are mixing weights such as a
Metropolis-Hastings row, used by the rules that have a weighted form (``mean``,
``geometric_median``, ``centered_clipping``) and ignored by the others.

Rules that tolerate ``f`` Byzantine rows take ``f`` (a count) or ``f_fraction`` (of ``n``,
the stack size with the own row included, rounded down, so one scenario works for peers of
any degree). When ``n`` is too small for
``f``, the call raises and explains the rule's requirement, unless ``clamp=True``: then ``f``
is lowered to the largest value the rule supports for that ``n``, and a rule that cannot
run even with ``f = 0`` (Krum or Bulyan on fewer than 3 rows) falls back to the mean.

``multi_krum``'s ``m`` is capped at ``n`` (peers have different degrees).

Any rule can be preceded by nearest-neighbour mixing: name it ``"nnm+<rule>"`` or pass
``nnm=True``; NNM then needs ``f`` too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from p2pfl.aggregation._checks import TooFewVectors, check_stack, largest_f, require_n, resolve_f
from p2pfl.aggregation.averaging import mean
from p2pfl.aggregation.clipping import centered_clipping
from p2pfl.aggregation.coordinatewise import coordinate_median, trimmed_mean
from p2pfl.aggregation.distance import bulyan, krum, multi_krum, nnm
from p2pfl.aggregation.geomedian import geometric_median


@runtime_checkable
class Aggregator(Protocol):
    """The call every protocol makes: ``(stack (n, d), weights (n,) | None, own) -> (d,)``."""

    name: str

    def __call__(self, stack: Tensor, weights: Tensor | None = None, own: int = 0) -> Tensor: ...


# ---------------------------------------------------------------- parameter checks


def _int_at_least(low: int) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        return value

    return check


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _nonneg_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def _fraction(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


# Parameters of every rule that tolerates f Byzantine rows (and of NNM): name -> (default, check)
_F_PARAMS: dict[str, tuple[Any, Callable[[str, Any], Any]]] = {
    "f": (None, _optional(_int_at_least(0))),
    "f_fraction": (None, _fraction),
    "clamp": (False, _flag),
}

# ---------------------------------------------------------------- the rules

Runner = Callable[[Tensor, Tensor | None, int, int, Mapping[str, Any]], Tensor]


@dataclass(frozen=True)
class _Rule:
    run: Runner  # (stack, weights, own, f, params) -> (d,)
    params: Mapping[str, tuple[Any, Callable[[str, Any], Any]]] = field(default_factory=dict)
    f_rule: str | None = None  # the requirement of _checks that f must satisfy; None: no f


_RULES: dict[str, _Rule] = {
    "mean": _Rule(lambda x, w, own, f, p: mean(x, w)),
    "median": _Rule(lambda x, w, own, f, p: coordinate_median(x)),
    "trimmed_mean": _Rule(lambda x, w, own, f, p: trimmed_mean(x, f), f_rule="trimmed_mean"),
    "krum": _Rule(lambda x, w, own, f, p: krum(x, f), f_rule="krum"),
    "multi_krum": _Rule(
        lambda x, w, own, f, p: multi_krum(x, f, None if p["m"] is None else min(p["m"], len(x))),
        params={"m": (None, _optional(_int_at_least(1)))},
        f_rule="krum",
    ),
    "bulyan": _Rule(lambda x, w, own, f, p: bulyan(x, f), f_rule="bulyan"),
    "geometric_median": _Rule(
        lambda x, w, own, f, p: geometric_median(
            x, w, iters=p["iters"], eps=p["eps"], tol=p["tol"]
        ),
        params={
            "iters": (100, _int_at_least(1)),
            "eps": (1e-6, _positive_float),
            "tol": (1e-7, _nonneg_float),
        },
    ),
    "centered_clipping": _Rule(
        lambda x, w, own, f, p: centered_clipping(x, x[own], p["tau"], p["iters"], w),
        params={"tau": (1.0, _positive_float), "iters": (1, _int_at_least(1))},
    ),
}


def _accepted(rule: str, with_nnm: bool) -> tuple[str, ...]:
    spec = _RULES[rule]
    names = list(spec.params)
    if spec.f_rule is not None or with_nnm:
        names += list(_F_PARAMS)
    if not with_nnm:
        names.append("nnm")
    return tuple(names)


#: Every accepted name, with the parameters it accepts. ``"nnm+<rule>"`` runs
#: nearest-neighbour mixing first; ``nnm=True`` on a plain name does the same.
AGGREGATORS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: _accepted(name, False) for name in _RULES}
    | {f"nnm+{name}": _accepted(name, True) for name in _RULES}
)

# ---------------------------------------------------------------- the configured aggregator


@dataclass(frozen=True)
class RuleAggregator:
    """A named rule with its parameters fixed; build it with :func:`get_aggregator`."""

    name: str
    rule: str
    params: Mapping[str, Any]
    nnm: bool = False
    f: int | None = None
    f_fraction: float | None = None
    clamp: bool = False

    @property
    def uses_f(self) -> bool:
        return self.nnm or _RULES[self.rule].f_rule is not None

    def _requirements(self) -> list[str]:
        reqs = ["nnm"] if self.nnm else []
        rule_req = _RULES[self.rule].f_rule
        return reqs + ([rule_req] if rule_req else [])

    def effective_f(self, n: int) -> int | None:
        """The ``f`` used on ``n`` rows (after ``f_fraction`` and clamping); None if unused.

        Returns ``-1`` when ``clamp`` is on and the rule cannot run on ``n`` rows even with
        ``f = 0`` (the call then falls back to the mean).
        """
        if not self.uses_f:
            return None
        f = resolve_f(n, self.f, self.f_fraction, self.name)
        for req in self._requirements():
            if self.clamp:
                f = min(f, largest_f(req, n))
            else:
                require_n(req, n, f)
        return max(f, -1)

    def refusal(self, n: int) -> str | None:
        """Why this rule, as configured, can never run on ``n`` vectors (``None``: it can,
        perhaps by clamping ``f``). A peer whose every round has at most ``n`` models would
        keep its own model every round (``SynchronousRoundProtocol``)."""
        if self.clamp or not self.uses_f:
            return None
        try:
            self.effective_f(n)
        except TooFewVectors as error:
            return str(error)
        return None

    def __call__(self, stack: Tensor, weights: Tensor | None = None, own: int = 0) -> Tensor:
        check_stack(stack, self.name)
        n = stack.shape[0]
        if isinstance(own, bool) or not isinstance(own, int) or not 0 <= own < n:
            raise ValueError(f"{self.name}: own must be a row index in [0, {n}), got {own!r}")
        f = self.effective_f(n)
        if f is not None and f < 0:
            return mean(stack, weights)
        if self.nnm:
            assert f is not None  # an nnm+ rule always uses f
            stack = nnm(stack, f)
        x = stack
        return _RULES[self.rule].run(x, weights, own, 0 if f is None else f, self.params)


def get_aggregator(name: str, **params: Any) -> RuleAggregator:
    """Build the aggregator called ``name`` (see :data:`AGGREGATORS`) with ``params``.

    Raises ValueError naming the accepted names, or the accepted parameters of that name,
    when either is unknown, and when a parameter has an invalid value or a needed one
    (``f`` or ``f_fraction`` for the rules that tolerate ``f`` Byzantine rows) is missing.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; accepted: {', '.join(sorted(AGGREGATORS))}")
    rule = name.removeprefix("nnm+")
    with_nnm = name != rule
    if "nnm" in params and not with_nnm:
        with_nnm = _flag(f"{name}: nnm", params.pop("nnm"))
    accepted = AGGREGATORS[f"nnm+{rule}" if with_nnm else rule]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"aggregator {name!r} does not accept {', '.join(unknown)}; "
            f"accepted parameters: {', '.join(accepted) or '(none)'}"
        )
    spec = _RULES[rule]
    values = {
        key: check(f"{name}: {key}", params.get(key, default))
        for key, (default, check) in {**spec.params, **_F_PARAMS}.items()
        if key in accepted
    }
    f_values = {key: values.pop(key, default) for key, (default, _) in _F_PARAMS.items()}
    if "f" in accepted:
        if f_values["f"] is None and f_values["f_fraction"] is None:
            raise ValueError(
                f"aggregator {name!r} needs f (a count) or f_fraction (of n, in [0, 1))"
            )
        if f_values["f"] is not None and f_values["f_fraction"] is not None:
            raise ValueError(f"aggregator {name!r}: give either f or f_fraction, not both")
    return RuleAggregator(
        name=f"nnm+{rule}" if with_nnm else rule,
        rule=rule,
        params=MappingProxyType(values),
        nnm=with_nnm,
        **f_values,
    )
