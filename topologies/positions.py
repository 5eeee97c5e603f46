"""Where to draw each peer: map positions when the graph has them, a force layout otherwise.

networkx's spring layout is fine for small graphs but takes tens of seconds for a few
thousand peers (its large-graph paths loop in Python or optimise a dense energy); above
:data:`NX_LAYOUT_LIMIT` peers we run Fruchterman-Reingold vectorised in numpy, in its grid
variant (repulsion only between nearby peers, found with a k-d tree): linear in the graph size.
"""

from __future__ import annotations

import networkx as nx
import numpy as np

__all__ = ["NX_LAYOUT_LIMIT", "layout"]

Position = tuple[float, float]

NX_LAYOUT_LIMIT = 500
"""Up to this many peers, networkx's ``spring_layout``; above, the vectorised version here."""


def layout(g: nx.Graph, *, seed: int = 0, iterations: int = 50) -> dict[int, Position]:
    """Node positions: the ``"pos"`` attributes when every node has one, else a force layout.

    The force layout is seeded, so the same graph is always drawn the same way. To draw a
    graph before and after a disruption, compute this once and pass it to both drawings.
    """
    pos = nx.get_node_attributes(g, "pos")
    if len(pos) == g.number_of_nodes():
        return {node: (float(xy[0]), float(xy[1])) for node, xy in pos.items()}
    if g.number_of_nodes() <= NX_LAYOUT_LIMIT:
        pos = nx.spring_layout(g, seed=seed, iterations=iterations)
        return {node: (float(xy[0]), float(xy[1])) for node, xy in pos.items()}
    nodes = list(g.nodes)
    xy = _fruchterman_reingold(g, nodes, seed=seed, iterations=iterations)
    return {node: (float(x), float(y)) for node, (x, y) in zip(nodes, xy, strict=True)}


def _fruchterman_reingold(
    g: nx.Graph, nodes: list[int], *, seed: int, iterations: int
) -> np.ndarray:
    """Fruchterman-Reingold (grid variant) from random points, rescaled to ``[-1, 1]``."""
    from scipy.spatial import cKDTree  # lazily: a run that draws no graph never needs it

    n = len(nodes)
    index = {node: i for i, node in enumerate(nodes)}
    edges = np.array([(index[u], index[v]) for u, v in g.edges if u != v], dtype=np.int64)
    edges = edges.reshape(-1, 2)
    rng = np.random.default_rng(seed)
    xy = rng.random((n, 2))
    k = 1.0 / np.sqrt(n)  # ideal distance between neighbours
    temperature = 0.1
    cooling = temperature / (iterations + 1)
    for _ in range(iterations):
        disp = np.zeros_like(xy)
        # Repulsion only between peers closer than 2k: the grid variant of the original
        # paper; far peers barely push each other, and all pairs would cost O(n^2).
        near = cKDTree(xy).query_pairs(2.0 * k, output_type="ndarray")
        if len(near):
            delta = xy[near[:, 0]] - xy[near[:, 1]]
            push = delta * (k * k / np.maximum(np.einsum("ij,ij->i", delta, delta), 1e-12))[:, None]
            np.add.at(disp, near[:, 0], push)
            np.add.at(disp, near[:, 1], -push)
        if len(edges):
            delta = xy[edges[:, 0]] - xy[edges[:, 1]]
            pull = delta * (np.linalg.norm(delta, axis=1, keepdims=True) / k)
            np.add.at(disp, edges[:, 0], -pull)
            np.add.at(disp, edges[:, 1], pull)
        length = np.maximum(np.linalg.norm(disp, axis=1, keepdims=True), 1e-9)
        xy += disp / length * np.minimum(length, temperature)
        temperature -= cooling
    xy -= xy.mean(axis=0)
    return xy / max(float(np.abs(xy).max()), 1e-9)
