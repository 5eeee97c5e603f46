"""Build peer graphs by name, so a scenario file can say ``kind = "ring"`` and nothing more.

Every graph has nodes ``0..n-1`` (plain ints: peer ``i`` is node ``i``), is undirected and
simple, and is the same for the same ``(kind, n, seed, params)``. The graph attributes
``kind``, ``seed`` and ``params`` (with defaults filled in) record how it was built.

:data:`GRAPH_PARAMS` lists, per kind, the accepted parameters and their defaults, so a
configuration layer can reject an unknown key before anything is built. A default of
``None`` means "derived from ``n``" (documented per kind below), except for ``file``'s
``path``, which is required.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import networkx as nx
import numpy as np

from topologies.errors import TopologyError
from topologies.files import read_graph

__all__ = ["GRAPH_KINDS", "GRAPH_PARAMS", "build_graph", "resolve_params", "torus_shape"]


# --------------------------------------------------------------------------- kinds
# Each builder takes ``n`` and ``seed`` positionally and its parameters as keyword-only
# arguments with defaults; GRAPH_PARAMS is read off these signatures so the two never drift.


def _complete(n: int, seed: int) -> nx.Graph:
    _check_n(n, "complete", minimum=1)
    return nx.complete_graph(n)


def _ring(n: int, seed: int) -> nx.Graph:
    _check_n(n, "ring", minimum=3)
    return nx.cycle_graph(n)


def _torus(n: int, seed: int, *, rows: int | None = None, cols: int | None = None) -> nx.Graph:
    """2-D torus: peer ``r * cols + c`` links to its four grid neighbours, wrapping around."""
    rows, cols = torus_shape(n, rows=rows, cols=cols)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            g.add_edge(node, r * cols + (c + 1) % cols)
            g.add_edge(node, ((r + 1) % rows) * cols + c)
    return g


def _regular(n: int, seed: int, *, k: int = 4) -> nx.Graph:
    _check_n(n, "regular", minimum=2)
    _check_int("k", k, minimum=0, maximum=n - 1)
    if (n * k) % 2:
        raise TopologyError(f"regular graph needs n * k even, got n={n}, k={k}")
    return nx.random_regular_graph(k, n, seed=seed)


def _erdos_renyi(n: int, seed: int, *, p: float | None = None) -> nx.Graph:
    """G(n, p); ``p=None`` takes ``2 ln(n) / n``, twice the connectivity threshold."""
    _check_n(n, "erdos_renyi", minimum=1)
    if p is None:
        p = min(1.0, 2.0 * math.log(n) / n) if n > 1 else 0.0
    _check_float("p", p, minimum=0.0, maximum=1.0)
    return nx.fast_gnp_random_graph(n, p, seed=seed)


def _barabasi_albert(n: int, seed: int, *, m: int = 2) -> nx.Graph:
    _check_n(n, "barabasi_albert", minimum=2)
    _check_int("m", m, minimum=1, maximum=n - 1)
    return nx.barabasi_albert_graph(n, m, seed=seed)


def _watts_strogatz(n: int, seed: int, *, k: int = 4, p: float = 0.1) -> nx.Graph:
    _check_n(n, "watts_strogatz", minimum=3)
    _check_int("k", k, minimum=2, maximum=n - 1)
    if k % 2:
        raise TopologyError(f"watts_strogatz needs an even k (k/2 neighbours per side), got k={k}")
    _check_float("p", p, minimum=0.0, maximum=1.0)
    return nx.watts_strogatz_graph(n, k, p, seed=seed)


def _geometric(n: int, seed: int, *, radius: float | None = None) -> nx.Graph:
    """Random geometric graph in the unit square; every node gets ``"pos" = (x, y)``.

    ``radius=None`` takes ``sqrt(2 ln(n) / (pi n))``: about ``2 ln n`` neighbours on
    average, above the connectivity threshold (connected with high probability, not surely).
    """
    _check_n(n, "geometric", minimum=1)
    if radius is None:
        radius = math.sqrt(2.0 * math.log(n) / (math.pi * n)) if n > 1 else 1.0
    _check_float("radius", radius, minimum=0.0, maximum=math.inf)
    xy = np.random.default_rng(seed).random((n, 2))
    pos = {i: (float(x), float(y)) for i, (x, y) in enumerate(xy)}
    return nx.random_geometric_graph(n, radius, pos=pos)


def _star(n: int, seed: int) -> nx.Graph:
    """Peer 0 is the hub, linked to every other peer."""
    _check_n(n, "star", minimum=1)
    return nx.star_graph(n - 1)


def _file(n: int | None, seed: int, *, path: str | Path | None = None) -> nx.Graph:
    """Graph read by :func:`topologies.files.read_graph`; ``n`` (if given) must match it."""
    if path is None:
        raise TopologyError("graph kind 'file' needs the parameter 'path'")
    g = read_graph(path)
    if n is not None and g.number_of_nodes() != n:
        raise TopologyError(f"graph file {path} has {g.number_of_nodes()} nodes, but n={n}")
    return g


_BUILDERS: dict[str, Callable[..., nx.Graph]] = {
    "complete": _complete,
    "ring": _ring,
    "torus": _torus,
    "regular": _regular,
    "erdos_renyi": _erdos_renyi,
    "barabasi_albert": _barabasi_albert,
    "watts_strogatz": _watts_strogatz,
    "geometric": _geometric,
    "star": _star,
    "file": _file,
}


def _keyword_defaults(builder: Callable[..., nx.Graph]) -> Mapping[str, Any]:
    params = inspect.signature(builder).parameters.values()
    return MappingProxyType({p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY})


GRAPH_KINDS: tuple[str, ...] = tuple(_BUILDERS)
"""The graph kinds :func:`build_graph` knows."""

GRAPH_PARAMS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {kind: _keyword_defaults(builder) for kind, builder in _BUILDERS.items()}
)
"""Per kind, the accepted parameters and their defaults (read-only)."""


# --------------------------------------------------------------------------- public API


def resolve_params(kind: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check ``kind`` and the keys of ``params``; return the params with defaults filled in.

    Raises :class:`TopologyError` naming the unknown kind or key and the accepted ones.
    Values are checked later, by :func:`build_graph`, because some limits depend on ``n``.
    """
    if kind not in GRAPH_PARAMS:
        raise TopologyError(
            f"unknown graph kind {kind!r}; expected one of: {', '.join(GRAPH_KINDS)}"
        )
    accepted = GRAPH_PARAMS[kind]
    params = dict(params or {})
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise TopologyError(
            f"unknown parameter {', '.join(map(repr, unknown))} for graph kind {kind!r}; "
            f"accepted: {allowed}"
        )
    return {**accepted, **params}


def build_graph(kind: str, n: int | None, *, seed: int = 0, **params: Any) -> nx.Graph:
    """Build a graph of ``kind`` with nodes ``0..n-1``, deterministic under ``seed``.

    ``n`` may be ``None`` only for ``kind="file"`` (take the file's node count). Raises
    :class:`TopologyError` for an unknown kind or parameter, a value out of range, or a
    shape that cannot exist (an odd ``n * k`` regular graph, a prime-sized torus...).
    """
    resolved = resolve_params(kind, params)
    if n is None and kind != "file":
        raise TopologyError(f"graph kind {kind!r} needs the number of peers n")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TopologyError(f"seed must be an integer, got {seed!r}")
    g = _BUILDERS[kind](n, seed, **resolved)
    g.graph.update(kind=kind, seed=seed, params=resolved)
    return g


def torus_shape(n: int, *, rows: int | None = None, cols: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of a 2-D torus of ``n`` peers, both at least 3 so every degree is 4.

    Given neither, takes the most square factorisation of ``n``; given one, derives the
    other. Raises :class:`TopologyError` when no such shape exists, suggesting sizes that work.
    """
    _check_n(n, "torus", minimum=9)
    for name, value in (("rows", rows), ("cols", cols)):
        if value is not None:
            _check_int(name, value, minimum=3, maximum=n)
    if rows is not None and cols is not None:
        if rows * cols != n:
            raise TopologyError(f"torus rows * cols must equal n, got {rows} * {cols} != {n}")
        return rows, cols
    given = rows if rows is not None else cols
    if given is not None:
        other, rest = divmod(n, given)
        if rest or other < 3:
            raise TopologyError(f"torus of n={n} peers cannot have {given} rows or columns")
        return (given, other) if rows is not None else (other, given)
    shape = _square_factors(n)
    if shape is None:
        below = next(m for m in range(n - 1, 8, -1) if _square_factors(m))
        above = next(m for m in range(n + 1, 2 * n + 9) if _square_factors(m))
        raise TopologyError(
            f"no 2-D torus of n={n} peers with at least 3 rows and 3 columns; "
            f"try n={below} or n={above}, or give rows and cols"
        )
    return shape


# --------------------------------------------------------------------------- checks


def _square_factors(n: int) -> tuple[int, int] | None:
    for rows in range(math.isqrt(n), 2, -1):
        if n % rows == 0:
            return rows, n // rows
    return None


def _check_n(n: object, kind: str, *, minimum: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool):
        raise TopologyError(f"number of peers n must be an integer, got {n!r}")
    if n < minimum:
        raise TopologyError(f"graph kind {kind!r} needs n >= {minimum}, got n={n}")


def _check_int(name: str, value: object, *, minimum: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TopologyError(f"parameter {name!r} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise TopologyError(f"parameter {name!r} must be in [{minimum}, {maximum}], got {value}")


def _check_float(name: str, value: object, *, minimum: float, maximum: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise TopologyError(f"parameter {name!r} must be a number, got {value!r}")
    if not minimum <= value <= maximum:
        raise TopologyError(f"parameter {name!r} must be in [{minimum}, {maximum}], got {value}")
