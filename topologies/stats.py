"""Summary statistics of a peer graph, as printed by ``p2pfl topo`` and saved with runs."""

from __future__ import annotations

from typing import Any

import networkx as nx

from topologies.connectivity import component_sizes
from topologies.mixing import metropolis_hastings, spectral_gap

__all__ = ["DIAMETER_LIMIT", "graph_stats"]

DIAMETER_LIMIT = 2000
"""Above this many peers the diameter is skipped (reported as ``None``): it costs many BFS."""


def graph_stats(g: nx.Graph) -> dict[str, Any]:
    """Plain-Python statistics of ``g`` (JSON-serialisable).

    Keys: ``n``, ``edges``, ``degree_min``, ``degree_mean``, ``degree_max``,
    ``components``, ``largest_component``, ``diameter`` (of the largest component;
    ``None`` when ``n > DIAMETER_LIMIT`` or the graph is empty), ``clustering`` (average
    clustering coefficient) and ``spectral_gap`` (of the Metropolis-Hastings matrix, which
    says how fast D-PSGD-style averaging mixes; 0 when disconnected).
    """
    n = g.number_of_nodes()
    degrees = [d for _, d in g.degree()]
    sizes = component_sizes(g)
    diameter = None
    if 0 < n <= DIAMETER_LIMIT:
        largest = g.subgraph(max(nx.connected_components(g), key=len))
        diameter = int(nx.diameter(largest, usebounds=True)) if len(largest) > 1 else 0
    return {
        "n": n,
        "edges": g.number_of_edges(),
        "degree_min": min(degrees, default=0),
        "degree_mean": sum(degrees) / n if n else 0.0,
        "degree_max": max(degrees, default=0),
        "components": len(sizes),
        "largest_component": sizes[0] if sizes else 0,
        "diameter": diameter,
        "clustering": float(nx.average_clustering(g)) if n else 0.0,
        "spectral_gap": spectral_gap(metropolis_hastings(g)) if n else 0.0,
    }
