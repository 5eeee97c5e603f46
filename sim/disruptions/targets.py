"""Small pure helpers for picking what a disruption hits: pools of peers, checks, seeds.

Kept apart from the kinds (:mod:`sim.disruptions.kinds`) because the preview of the
command line and the runtime use them too, and none of them needs a simulation.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import networkx as nx
import numpy as np

from sim.disruptions.config import Edge
from sim.errors import DisruptionError

__all__ = ["Targets", "check_peers", "edge", "peer_pool", "seed_for"]


@dataclass(frozen=True, slots=True)
class Targets:
    """What an instantaneous disruption hits: peers going down, links failing."""

    peers: tuple[int, ...] = ()
    links: tuple[Edge, ...] = ()


def peer_pool(graph: nx.Graph, among: str, relays: Collection[int]) -> set[int]:
    """The peers an ``among`` (all, data_holders, relays) setting draws from."""
    if among == "relays":
        return set(relays)
    if among == "data_holders":
        return set(graph.nodes) - set(relays)
    return set(graph.nodes)


def check_peers(peers: Iterable[int], graph: nx.Graph, key: str) -> None:
    """Refuse peers that are not nodes of ``graph`` (``key`` names the setting)."""
    missing = sorted(p for p in peers if p not in graph)
    if missing:
        raise DisruptionError(f"{key}: peers not in the graph: {missing[:10]}")


def edge(u: int, v: int) -> Edge:
    """A link with its ends in order, as the network stores it."""
    return (u, v) if u <= v else (v, u)


def seed_for(seed: int, index: int, stream: int = 0) -> int:
    """An independent seed per disruption (and per use within one).

    32 bits, because some networkx routines (the Fiedler vector) seed numpy's legacy
    ``RandomState``, which takes nothing larger.
    """
    return int(np.random.SeedSequence([seed, 0xD15A, index, stream]).generate_state(1)[0])
