"""The project's error base: every error p2pfl, sim and topologies raise derives from
:class:`P2PFLError`, so a caller can catch the project's errors in one clause.

Each concrete error keeps its other, standard base (``ConfigError`` is also a
``ValueError``, ``UnsupportedVersion`` an ``ImportError``...), so existing ``except``
clauses keep working.

The class itself is defined in :mod:`topologies.errors`: ``topologies`` is the lowest
layer and may not import ``p2pfl`` (DESIGN.md), yet its ``TopologyError`` must derive from
the base too. It is re-exported here, the place to import it from; importing it loads
neither networkx nor scipy (``topologies`` loads its names lazily).
"""

from __future__ import annotations

from topologies.errors import P2PFLError

__all__ = ["P2PFLError"]
