"""Connectivity checks that fail with a message a user can act on."""

from __future__ import annotations

import networkx as nx

from topologies.errors import DisconnectedGraphError

__all__ = ["component_sizes", "require_connected"]

_SIZES_SHOWN = 6


def component_sizes(g: nx.Graph) -> list[int]:
    """Sizes of the connected components of ``g``, largest first."""
    return sorted((len(c) for c in nx.connected_components(g)), reverse=True)


def require_connected(g: nx.Graph, purpose: str) -> None:
    """Raise :class:`DisconnectedGraphError` unless ``g`` is connected.

    ``purpose`` names what needs connectivity (a protocol, a metric), so the one-line
    message says why the graph is rejected, e.g.
    ``graph has 3 connected components (sizes 10, 4, 2); D-PSGD needs a connected graph``.
    A graph without nodes is rejected too: no protocol can run on it.
    """
    if g.number_of_nodes() == 0:
        raise DisconnectedGraphError(f"graph has no peers; {purpose} needs a connected graph")
    sizes = component_sizes(g)
    if len(sizes) == 1:
        return
    shown = ", ".join(str(s) for s in sizes[:_SIZES_SHOWN])
    if len(sizes) > _SIZES_SHOWN:
        shown += f", ... ({len(sizes) - _SIZES_SHOWN} more)"
    raise DisconnectedGraphError(
        f"graph has {len(sizes)} connected components (sizes {shown}); "
        f"{purpose} needs a connected graph"
    )
