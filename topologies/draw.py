"""Draw a peer graph to PNG, before or after a disruption.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global state, no
display needed). Nodes and edges are drawn as one scatter and one line collection each,
so graphs of a few thousand peers render in about a second.

To compare a graph before and after a disruption, draw both from the same positions:
pass ``pos=layout(g)`` to both calls, or mark the lost peers and links with ``removed``
and ``removed_edges`` on the original graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import networkx as nx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

__all__ = ["draw_graph", "layout"]

Position = tuple[float, float]

_LABEL_LIMIT = 50
_ALIVE = "#1f77b4"
_HIGHLIGHT = "#d62728"
_REMOVED = "#9e9e9e"


def layout(g: nx.Graph, *, seed: int = 0) -> dict[int, Position]:
    """Node positions: the ``"pos"`` attributes when every node has one, else a spring layout.

    The spring layout is seeded, so the same graph is always drawn the same way.
    """
    pos = nx.get_node_attributes(g, "pos")
    if len(pos) != g.number_of_nodes():
        pos = nx.spring_layout(g, seed=seed)
    return {node: (float(xy[0]), float(xy[1])) for node, xy in pos.items()}


def draw_graph(
    g: nx.Graph,
    path: str | Path,
    *,
    title: str | None = None,
    highlight: set[int] | None = None,
    removed: set[int] | None = None,
    removed_edges: Iterable[tuple[int, int]] | None = None,
    pos: Mapping[int, Position] | None = None,
    dpi: int = 120,
) -> Path:
    """Write a PNG of ``g`` to ``path`` (parent folders created) and return the path.

    ``highlight`` peers are drawn in red; ``removed`` peers as grey crosses, and their
    links (and any ``removed_edges``) as faint dashed lines. Node size shrinks with ``n``
    and labels are written only up to 50 peers. ``pos`` overrides :func:`layout`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    highlight = set(highlight or ())
    removed = set(removed or ())
    lost_links = {frozenset(e) for e in removed_edges or ()}
    pos = dict(pos) if pos is not None else layout(g)
    n = g.number_of_nodes()

    fig = Figure(figsize=(7, 7), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)

    kept, lost = [], []
    for u, v in g.edges:
        segment = (pos[u], pos[v])
        broken = u in removed or v in removed or frozenset((u, v)) in lost_links
        (lost if broken else kept).append(segment)
    width = 1.0 if n <= 100 else 0.4
    ax.add_collection(LineCollection(kept, colors="#555555", linewidths=width, alpha=0.6, zorder=1))
    ax.add_collection(
        LineCollection(
            lost, colors=_REMOVED, linewidths=width, alpha=0.5, linestyles="dashed", zorder=1
        )
    )

    size = float(np.clip(6000.0 / max(n, 1), 4.0, 300.0))
    groups = (
        ([v for v in g if v not in removed and v not in highlight], _ALIVE, "o"),
        ([v for v in g if v in highlight and v not in removed], _HIGHLIGHT, "o"),
        ([v for v in g if v in removed], _REMOVED, "x"),
    )
    for nodes, colour, marker in groups:
        if nodes:
            xy = np.array([pos[v] for v in nodes])
            ax.scatter(xy[:, 0], xy[:, 1], s=size, c=colour, marker=marker, zorder=2, linewidths=1)
    if n <= _LABEL_LIMIT:
        for v in g:
            ax.annotate(
                str(v),
                pos[v],
                ha="center",
                va="center",
                fontsize=7,
                zorder=3,
                color="white" if v not in removed else "black",
            )
    ax.autoscale_view()
    fig.savefig(path, format="png")
    return path
