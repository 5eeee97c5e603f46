"""Exceptions raised by :mod:`topologies`, and the project's root error class.

:class:`P2PFLError` is the one base every error of the project derives from (``except
P2PFLError`` catches anything p2pfl, sim or topologies raise on purpose). It is defined
here, in the lowest layer, because ``topologies`` may not import ``p2pfl`` (DESIGN.md's
dependency direction) while everything may import ``topologies``; :mod:`p2pfl.errors`
re-exports it, and that is where the rest of the code and users import it from. This
module imports nothing, and ``topologies/__init__`` loads its names lazily, so importing
the base costs nothing.

The topology errors also derive from :class:`ValueError` so that a configuration layer
can catch one type and turn any bad graph description into a one-line message.
"""

from __future__ import annotations

__all__ = ["DisconnectedGraphError", "P2PFLError", "TopologyError"]


class P2PFLError(Exception):
    """Base of every error the project raises on purpose (see the module docstring)."""


class TopologyError(P2PFLError, ValueError):
    """A graph could not be built, read or used as asked (bad kind, parameter, file...)."""


class DisconnectedGraphError(TopologyError):
    """A graph is not connected where the caller needs it to be (e.g. D-PSGD mixing)."""
