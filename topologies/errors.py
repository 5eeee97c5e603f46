"""Exceptions raised by :mod:`topologies`.

Both derive from :class:`ValueError` so that a configuration layer can catch one type
and turn any bad graph description into a one-line message for the user.
"""

from __future__ import annotations

__all__ = ["DisconnectedGraphError", "TopologyError"]


class TopologyError(ValueError):
    """A graph could not be built, read or used as asked (bad kind, parameter, file...)."""


class DisconnectedGraphError(TopologyError):
    """A graph is not connected where the caller needs it to be (e.g. D-PSGD mixing)."""
