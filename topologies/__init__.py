"""Peer graphs for decentralized learning: generators, mixing matrices, statistics,
drawings and disruption choices (who fails, which links break, where the network splits).

Pure graph logic on networkx, numpy and scipy: it knows nothing of models, protocols or
the simulator, which import it. Nodes are always the ints ``0..n-1``: peer ``i`` is node ``i``.

Names load on first use (PEP 562), so ``import topologies`` (or ``topologies.errors``,
which ``p2pfl.errors`` re-exports) costs nothing until a graph function is needed, and
matplotlib loads only when something is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from topologies.lazy import lazy_exports

_EXPORTS = {
    "Battery": "topologies.battery",
    "ChurnEvent": "topologies.churn",
    "churn_trace": "topologies.churn",
    "component_sizes": "topologies.connectivity",
    "require_connected": "topologies.connectivity",
    "LINK_STRATEGIES": "topologies.disruption",
    "PARTITION_METHODS": "topologies.disruption",
    "PEER_STRATEGIES": "topologies.disruption",
    "component_stats": "topologies.disruption",
    "cut_edges": "topologies.disruption",
    "partition_groups": "topologies.disruption",
    "region_outage": "topologies.disruption",
    "select_links": "topologies.disruption",
    "select_peers": "topologies.disruption",
    "draw_graph": "topologies.draw",
    "DisconnectedGraphError": "topologies.errors",
    "TopologyError": "topologies.errors",
    "read_graph": "topologies.files",
    "GRAPH_KINDS": "topologies.generators",
    "GRAPH_PARAMS": "topologies.generators",
    "build_graph": "topologies.generators",
    "resolve_params": "topologies.generators",
    "torus_shape": "topologies.generators",
    "is_doubly_stochastic": "topologies.mixing",
    "is_row_stochastic": "topologies.mixing",
    "metropolis_hastings": "topologies.mixing",
    "spectral_gap": "topologies.mixing",
    "uniform": "topologies.mixing",
    "layout": "topologies.positions",
    "graph_stats": "topologies.stats",
}

__all__ = [
    "GRAPH_KINDS",
    "GRAPH_PARAMS",
    "LINK_STRATEGIES",
    "PARTITION_METHODS",
    "PEER_STRATEGIES",
    "Battery",
    "ChurnEvent",
    "DisconnectedGraphError",
    "TopologyError",
    "build_graph",
    "churn_trace",
    "component_sizes",
    "component_stats",
    "cut_edges",
    "draw_graph",
    "graph_stats",
    "is_doubly_stochastic",
    "is_row_stochastic",
    "layout",
    "metropolis_hastings",
    "partition_groups",
    "read_graph",
    "region_outage",
    "require_connected",
    "resolve_params",
    "select_links",
    "select_peers",
    "spectral_gap",
    "torus_shape",
    "uniform",
]

if TYPE_CHECKING:
    from topologies.battery import Battery
    from topologies.churn import ChurnEvent, churn_trace
    from topologies.connectivity import component_sizes, require_connected
    from topologies.disruption import (
        LINK_STRATEGIES,
        PARTITION_METHODS,
        PEER_STRATEGIES,
        component_stats,
        cut_edges,
        partition_groups,
        region_outage,
        select_links,
        select_peers,
    )
    from topologies.draw import draw_graph
    from topologies.errors import DisconnectedGraphError, TopologyError
    from topologies.files import read_graph
    from topologies.generators import (
        GRAPH_KINDS,
        GRAPH_PARAMS,
        build_graph,
        resolve_params,
        torus_shape,
    )
    from topologies.mixing import (
        is_doubly_stochastic,
        is_row_stochastic,
        metropolis_hastings,
        spectral_gap,
        uniform,
    )
    from topologies.positions import layout
    from topologies.stats import graph_stats


if not TYPE_CHECKING:  # a type checker reads the imports above (and so catches a typo)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
