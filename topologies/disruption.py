"""Choose what a disruption takes out: peers, links, a region, a partition.

These functions only *choose*; the simulator applies the choice at a virtual time or
round. Every random choice is drawn from ``numpy.random.default_rng(seed)``, so a
scenario names its disruption by a seed and replays it exactly.

A count may be given as an ``int`` (that many) or a ``float`` in ``[0, 1]`` (that share of
the pool, rounded to the nearest integer). Peers and links come back as lists, in the
order a strategy ranks them (highest degree first...), so the simulator can also fail
them one after another.

:class:`Battery` and :func:`churn_trace` (battery drain and join/leave traces) live in
their own modules and are re-exported here, with the rest of the disruption toolkit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Literal

import networkx as nx
import numpy as np

from topologies.battery import Battery
from topologies.churn import ChurnEvent, churn_trace
from topologies.errors import TopologyError

__all__ = [
    "LINK_STRATEGIES",
    "PARTITION_METHODS",
    "PEER_STRATEGIES",
    "Battery",
    "ChurnEvent",
    "churn_trace",
    "component_stats",
    "cut_edges",
    "partition_groups",
    "region_outage",
    "select_links",
    "select_peers",
]

PeerStrategy = Literal["random", "degree", "betweenness"]
LinkStrategy = Literal["random", "bridges_first"]
PartitionMethod = Literal["spatial", "random", "spectral"]
Edge = tuple[int, int]

PEER_STRATEGIES: tuple[str, ...] = ("random", "degree", "betweenness")
LINK_STRATEGIES: tuple[str, ...] = ("random", "bridges_first")
PARTITION_METHODS: tuple[str, ...] = ("spatial", "random", "spectral")

EXACT_BETWEENNESS_LIMIT = 1000
"""Above this many peers betweenness is estimated from ``BETWEENNESS_PIVOTS`` sampled sources."""
BETWEENNESS_PIVOTS = 500


# --------------------------------------------------------------------------- peers


def select_peers(
    g: nx.Graph,
    count_or_fraction: int | float,
    strategy: PeerStrategy = "random",
    *,
    seed: int = 0,
    candidates: Iterable[int] | None = None,
    recompute: bool = False,
) -> list[int]:
    """Pick peers to fail from ``candidates`` (default: all peers), ranked by ``strategy``.

    ``"random"``: a uniform sample. ``"degree"`` / ``"betweenness"``: highest first, as
    measured on the whole graph ``g`` before any failure (a targeted attack on hubs or on
    the peers most shortest paths cross); ties are broken at random under ``seed``.
    ``candidates`` restricts the pool, e.g. to data-holders or to relay-only peers, and a
    fraction is a share of that pool.

    ``recompute=True`` is the adaptive attack: peers are taken one at a time, each the
    highest-ranked on what is left of ``g`` once the earlier picks are removed (an
    attacker who re-measures the network after every loss hits harder than one ranking
    it once). It costs one ranking per pick; with ``"random"`` it changes nothing.
    """
    _check_choice("peer strategy", strategy, PEER_STRATEGIES)
    pool = sorted(g.nodes) if candidates is None else sorted(set(candidates))
    missing = [p for p in pool if p not in g]
    if missing:
        raise TopologyError(f"candidate peers not in the graph: {missing[:10]}")
    count = _resolve_count(count_or_fraction, len(pool), "peers")
    rng = np.random.default_rng(seed)
    order = [pool[i] for i in rng.permutation(len(pool))]
    if recompute and strategy != "random":
        return _adaptive_order(g, order, count, strategy, seed)
    if strategy == "degree":
        order.sort(key=lambda p: -g.degree(p))
    elif strategy == "betweenness":
        score = _betweenness(g, seed)
        order.sort(key=lambda p: -score[p])
    return order[:count]


def region_outage(g: nx.Graph, center: tuple[float, float], radius: float) -> set[int]:
    """Peers whose ``"pos"`` lies within ``radius`` of ``center`` (boundary included,
    with a 1e-12 relative allowance so that a point on the circle is not lost to rounding).

    Models a region going dark (flood, power cut) on a geometric map; needs every node
    to have ``"pos"``, as :func:`build_graph` gives geometric graphs.
    """
    if radius < 0:
        raise TopologyError(f"region radius must be >= 0, got {radius}")
    pos = _positions(g, "a region outage")
    cx, cy = center
    reach = radius + 1e-12 * max(radius, 1.0)  # a point on the circle stays on it after rounding
    return {v for v, (x, y) in pos.items() if math.hypot(x - cx, y - cy) <= reach}


# --------------------------------------------------------------------------- links


def select_links(
    g: nx.Graph,
    count_or_fraction: int | float,
    *,
    seed: int = 0,
    strategy: LinkStrategy = "random",
) -> list[Edge]:
    """Pick links to break, each as ``(u, v)`` with ``u < v``.

    ``"random"``: a uniform sample. ``"bridges_first"``: links whose loss disconnects the
    graph come first (in random order), then random others: the worst case for mixing.
    A fraction is a share of all links.
    """
    _check_choice("link strategy", strategy, LINK_STRATEGIES)
    edges = sorted(_edge(u, v) for u, v in g.edges if u != v)
    count = _resolve_count(count_or_fraction, len(edges), "links")
    rng = np.random.default_rng(seed)
    order = [edges[i] for i in rng.permutation(len(edges))]
    if strategy == "bridges_first":
        bridges = {_edge(u, v) for u, v in nx.bridges(g)}
        order.sort(key=lambda e: e not in bridges)
    return order[:count]


# --------------------------------------------------------------------------- partitions


def partition_groups(
    g: nx.Graph,
    parts: int,
    *,
    seed: int = 0,
    method: PartitionMethod = "spatial",
) -> list[set[int]]:
    """Split the peers into ``parts`` disjoint groups of near-equal size (a network split).

    All methods bisect recursively, each cut along an ordering of the peers:
    ``"spatial"`` along the wider coordinate of ``"pos"`` (west/east, then north/south...),
    so each group is a contiguous region; ``"spectral"`` along the Fiedler vector (the cut
    crossing few links: how a sparse network tends to break); ``"random"`` a shuffle.
    Pair with :func:`cut_edges` to get the links to drop, and restore them to heal.
    """
    _check_choice("partition method", method, PARTITION_METHODS)
    if not isinstance(parts, int) or isinstance(parts, bool) or not 1 <= parts <= max(len(g), 1):
        raise TopologyError(f"parts must be an integer in [1, {len(g)}], got {parts!r}")
    rng = np.random.default_rng(seed)
    if method == "spatial":
        pos = _positions(g, "a spatial partition")

        def order(nodes: list[int]) -> list[int]:
            xy = np.array([pos[v] for v in nodes])
            axis = int(np.argmax(np.ptp(xy, axis=0)))
            return [nodes[i] for i in np.lexsort((np.array(nodes), xy[:, axis]))]

    elif method == "spectral":

        def order(nodes: list[int]) -> list[int]:
            return _fiedler_order(g.subgraph(nodes), seed)

    else:

        def order(nodes: list[int]) -> list[int]:
            return [nodes[i] for i in rng.permutation(len(nodes))]

    return [set(group) for group in _bisect(sorted(g.nodes), parts, order)]


def cut_edges(g: nx.Graph, groups: Sequence[Collection[int]]) -> list[Edge]:
    """Links whose endpoints lie in different groups, as sorted ``(u, v)`` with ``u < v``.

    Peers in no group form one more implicit group, so ``cut_edges(g, [region])`` gives
    the links that isolate ``region`` from the rest. Groups must be disjoint.
    """
    group_of: dict[int, int] = {}
    for gid, group in enumerate(groups):
        for v in group:
            if v in group_of:
                raise TopologyError(f"peer {v} is in more than one group")
            group_of[v] = gid
    rest = len(groups)
    return sorted(_edge(u, v) for u, v in g.edges if group_of.get(u, rest) != group_of.get(v, rest))


# --------------------------------------------------------------------------- connectivity


def component_stats(g: nx.Graph, alive: Iterable[int]) -> dict[str, Any]:
    """Connectivity among the ``alive`` peers (links to dead peers do not count).

    Returns ``components`` (count), ``largest`` (size of the largest, 0 if none alive),
    ``sizes`` (largest first), ``isolated`` (alive peers with no alive neighbour) and
    ``component_of`` (peer -> component id; id 0 is the largest component, ties broken
    by smallest peer id), enough to report accuracy per component over time.
    """
    alive_set = set(alive)
    components = sorted(
        nx.connected_components(g.subgraph(alive_set)), key=lambda c: (-len(c), min(c))
    )
    component_of = {v: cid for cid, comp in enumerate(components) for v in comp}
    sizes = [len(c) for c in components]
    return {
        "components": len(components),
        "largest": sizes[0] if sizes else 0,
        "sizes": sizes,
        "isolated": sum(1 for s in sizes if s == 1),
        "component_of": component_of,
    }


# --------------------------------------------------------------------------- helpers


def _resolve_count(count_or_fraction: int | float, pool: int, what: str) -> int:
    value = count_or_fraction
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError(f"count of {what} must be an int or a fraction, got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise TopologyError(f"fraction of {what} must be in [0, 1], got {value}")
        return round(value * pool)
    if not 0 <= value <= pool:
        raise TopologyError(f"cannot pick {value} {what} out of {pool}")
    return value


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TopologyError(f"unknown {what} {value!r}; expected one of: {', '.join(allowed)}")


def _edge(u: int, v: int) -> Edge:
    return (u, v) if u <= v else (v, u)


def _positions(g: nx.Graph, purpose: str) -> dict[int, tuple[float, float]]:
    pos = nx.get_node_attributes(g, "pos")
    if len(pos) != g.number_of_nodes():
        raise TopologyError(f"{purpose} needs a 'pos' attribute on every peer (a geometric graph)")
    return {v: (float(xy[0]), float(xy[1])) for v, xy in pos.items()}


def _betweenness(g: nx.Graph, seed: int) -> dict[int, float]:
    n = g.number_of_nodes()
    pivots = None if n <= EXACT_BETWEENNESS_LIMIT else BETWEENNESS_PIVOTS
    return nx.betweenness_centrality(g, k=pivots, seed=seed)


def _adaptive_order(
    g: nx.Graph, order: list[int], count: int, strategy: PeerStrategy, seed: int
) -> list[int]:
    """Take ``count`` peers of ``order`` one by one, each ranked on the graph left so far.

    ``order`` is the candidates in their seeded tie-breaking order: among equal scores
    the earliest wins, as in the one-shot ranking.
    """
    remaining = nx.Graph(g)
    left = list(order)
    chosen: list[int] = []
    for _ in range(count):
        if strategy == "degree":
            score: dict[int, float] = {p: float(remaining.degree(p)) for p in left}
        else:
            score = _betweenness(remaining, seed)
        best = max(range(len(left)), key=lambda i: (score[left[i]], -i))
        peer = left.pop(best)
        chosen.append(peer)
        remaining.remove_node(peer)
    return chosen


def _bisect(
    nodes: list[int], parts: int, order: Callable[[list[int]], list[int]]
) -> list[list[int]]:
    """Split ``nodes`` into ``parts`` groups of near-equal size, cutting along ``order``."""
    if parts == 1:
        return [nodes]
    left_parts = parts // 2
    ordered = order(nodes)
    cut = round(len(nodes) * left_parts / parts)
    return _bisect(sorted(ordered[:cut]), left_parts, order) + _bisect(
        sorted(ordered[cut:]), parts - left_parts, order
    )


def _fiedler_order(sub: nx.Graph, seed: int) -> list[int]:
    """Peers ordered along the Fiedler vector; a disconnected graph by component instead."""
    components = sorted(nx.connected_components(sub), key=lambda c: (-len(c), min(c)))
    if len(components) > 1:
        return [v for comp in components for v in sorted(comp)]
    if sub.number_of_nodes() <= 2:
        return sorted(sub.nodes)
    vector = nx.fiedler_vector(sub, seed=seed, method="tracemin_lu")
    value = dict(zip(sub.nodes, vector, strict=True))  # the vector follows list(sub) order
    return sorted(sub.nodes, key=lambda v: (value[v], v))
