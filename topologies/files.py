"""Read a peer graph from a file: a plain edge list or GraphML.

Whatever the file calls its nodes, the graph handed back has nodes ``0..n-1`` (the
label scheme every other part of the project relies on); the file's own identifier of
each node is kept as the node attribute ``"label"`` so results can be mapped back.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import TypeGuard
from xml.etree.ElementTree import ParseError

import networkx as nx

from topologies.errors import TopologyError

__all__ = ["GRAPHML_SUFFIXES", "read_graph"]

GRAPHML_SUFFIXES = (".graphml", ".xml")
"""File suffixes read as GraphML; any other file is read as an edge list."""

_SEPARATORS = re.compile(r"[\s,;]+")


def read_graph(path: str | Path) -> nx.Graph:
    """Read ``path`` as an undirected simple graph with nodes relabelled ``0..n-1``.

    Edge lists: one edge ``u v`` per line (whitespace, comma or semicolon separated;
    further columns such as weights are ignored), a line with a single token declares an
    isolated node, ``#`` starts a comment. GraphML: read with networkx; node and edge
    attributes are kept, and numeric ``x``/``y`` node attributes become ``"pos"``.

    Direction and parallel edges are dropped, and so are self-loops (a peer always mixes
    with itself; a loop would only distort its degree). Nodes are numbered in numeric
    order when every identifier is an integer, otherwise in order of first appearance.
    """
    path = Path(path)
    if path.is_dir():
        raise TopologyError(f"graph file {path} is a folder; expected an edge list or a GraphML file")
    if not path.is_file():
        raise TopologyError(f"graph file not found: {path}")
    if path.suffix.lower() in GRAPHML_SUFFIXES:
        raw = _read_graphml(path)
    else:
        raw = _read_edge_list(path)
    raw.remove_edges_from(list(nx.selfloop_edges(raw)))
    return _relabel(raw)


def _read_graphml(path: Path) -> nx.Graph:
    try:
        g = nx.read_graphml(path)
    except (ParseError, nx.NetworkXError, KeyError, ValueError) as exc:
        raise TopologyError(f"cannot read GraphML file {path}: {exc}") from exc
    simple = nx.Graph()
    simple.add_nodes_from(g.nodes(data=True))
    simple.add_edges_from(g.edges(data=True))
    for _, data in simple.nodes(data=True):
        if "label" in data:  # the file's own label data; "label" will hold the node id
            data["graphml_label"] = data.pop("label")
    return simple


def _read_edge_list(path: Path) -> nx.Graph:
    g = nx.Graph()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TopologyError(f"cannot read edge list {path}: not UTF-8 text") from exc
    except OSError as exc:  # permissions, an I/O error
        raise TopologyError(f"cannot read edge list {path}: {exc.strerror or exc}") from exc
    for line in text.splitlines():
        tokens = [t for t in _SEPARATORS.split(line.split("#", 1)[0]) if t]
        if len(tokens) == 1:
            g.add_node(tokens[0])
        elif len(tokens) >= 2:
            g.add_edge(tokens[0], tokens[1])
    return g


def _relabel(raw: nx.Graph) -> nx.Graph:
    order = _node_order(raw.nodes)
    mapping = {old: new for new, old in enumerate(order)}
    g = nx.Graph()
    for old in order:
        attrs = dict(raw.nodes[old])
        attrs["label"] = old
        x, y = attrs.get("x"), attrs.get("y")
        if _is_number(x) and _is_number(y):
            attrs["pos"] = (float(x), float(y))
        g.add_node(mapping[old], **attrs)
    g.add_edges_from((mapping[u], mapping[v], d) for u, v, d in raw.edges(data=True))
    return g


def _node_order(nodes: Iterable[Hashable]) -> list[Hashable]:
    nodes = list(nodes)
    try:
        return sorted(nodes, key=lambda node: int(str(node)))
    except ValueError:
        return nodes


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
