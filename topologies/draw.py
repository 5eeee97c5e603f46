"""Draw a peer graph to PNG, before or after a disruption.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global state, no
display needed), imported inside :func:`draw_graph` only: ``import topologies`` must not
need matplotlib (DESIGN.md: topologies import matplotlib only lazily, for drawing).
Nodes and edges are drawn as one scatter and one line collection each, so graphs of a
few thousand peers render in seconds.

To compare a graph before and after a disruption, draw both from the same positions:
pass ``pos=layout(g)`` (:mod:`topologies.positions`) to both calls, or mark the lost
peers and links with ``removed`` and ``removed_edges`` on the original graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from topologies.positions import Position, layout

__all__ = ["draw_graph"]

_LABEL_LIMIT = 50
_ALIVE = "#1f77b4"
_HIGHLIGHT = "#d62728"
_REMOVED = "#757575"


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

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

    kept: list[tuple[Any, Any]] = []
    lost: list[tuple[Any, Any]] = []
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
    alive = [v for v in g if v not in removed and v not in highlight]
    marked = [v for v in g if v in highlight and v not in removed]
    gone = [v for v in g if v in removed]
    styles: tuple[tuple[list[Any], dict[str, Any]], ...] = (
        (alive, {"c": _ALIVE, "marker": "o", "s": size, "label": None}),
        (
            marked,
            {"c": _HIGHLIGHT, "marker": "o", "s": size, "label": f"highlighted ({len(marked)})"},
        ),
        (gone, {"c": _REMOVED, "marker": "x", "s": 1.5 * size, "label": f"removed ({len(gone)})"}),
    )
    for nodes, style in styles:
        if nodes:
            xy = np.array([pos[v] for v in nodes])
            ax.scatter(xy[:, 0], xy[:, 1], zorder=2, linewidths=1.5, **style)
    if marked or gone:
        ax.legend(loc="lower right", fontsize=8, frameon=False)
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
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.93 if title else 0.98)
    fig.savefig(path, format="png")
    return path
