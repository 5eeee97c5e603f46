"""Peer graphs for decentralized learning: generators, mixing matrices, statistics,
drawings and disruption choices (who fails, which links break, where the network splits).

Pure graph logic on networkx, numpy and scipy: it knows nothing of models, protocols or
the simulator, which import it. Nodes are always the ints ``0..n-1``: peer ``i`` is node ``i``.
"""

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
