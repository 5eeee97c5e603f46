"""The simulator's user-facing errors, in a leaf module.

:class:`ScenarioError` is raised both while a scenario is read (``sim.scenario``) and while
it is set up on a graph (``sim.disruptions``, ``sim.runner``). Defining it here, apart
from both, lets the runtime modules raise it without importing the scenario module,
which imports their configuration classes: imports in ``sim`` run one way.
"""

from __future__ import annotations

from p2pfl.config import ConfigError
from p2pfl.errors import P2PFLError

__all__ = ["DisruptionError", "ScenarioError"]


class ScenarioError(ConfigError):
    """A scenario that cannot run; the message is one line meant for the user."""


class DisruptionError(P2PFLError, ValueError):
    """A disruption that cannot apply to this scenario's graph; one line for the user."""
