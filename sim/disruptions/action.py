"""The base of every kind of disruption: what an action is, and what one firing changed.

Apart from :mod:`sim.disruptions.kinds` (the one-off kinds and the registry) so that kinds
kept in modules of their own (:mod:`sim.disruptions.moving`) share it without an import
circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sim.disruptions.config import Edge
from sim.errors import DisruptionError

if TYPE_CHECKING:
    from sim.disruptions.runtime import DisruptionRuntime

__all__ = ["DisruptionAction", "Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one firing changed, as the runtime logs it."""

    down: tuple[int, ...] = ()
    up: tuple[int, ...] = ()
    cut: tuple[Edge, ...] = ()
    restored: tuple[Edge, ...] = ()
    lost_data: tuple[int, ...] = ()


class DisruptionAction:
    """The behaviour of one ``[[disruptions]]`` table (``spec``, at ``index`` in the list)."""

    kind: ClassVar[str]
    #: a one-off hit on the graph's peers or links: drawn before/after, previewable
    hits_graph: ClassVar[bool] = False
    #: needs to see every handled event and its effects (battery drain)
    watches_work: ClassVar[bool] = False

    spec: Any

    def __init__(self, spec: Any, index: int) -> None:
        self.spec = spec
        self.index = index

    @property
    def reason(self) -> str:
        """Why a peer is down or a link cut because of this disruption (one per table)."""
        return f"{self.kind}:{self.index}"

    def prepare(self, runtime: DisruptionRuntime) -> None:
        """Checks against the graph made before the run (errors come at once); set-up."""

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        """Carry the disruption out now; return what changed."""
        raise NotImplementedError

    def undo(self, runtime: DisruptionRuntime) -> Outcome:
        """Give back what :meth:`fire` took (for ``recover`` / ``heal``)."""
        raise DisruptionError(f"{self.kind} cannot be undone")
