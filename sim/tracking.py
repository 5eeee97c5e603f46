"""Optional experiment tracking for the simulator: a run's rows as TensorBoard scalars.

The tracker now lives in :mod:`p2pfl.tracking`, shared with the node; this module
re-exports it so that ``sim`` code and older imports keep working. With the extra
(``pip install 'p2pfl-gossip[tracking]'``), ``p2pfl sim --tensorboard`` (or ``sim.run(...,
tensorboard=True)``) writes event files into ``<run folder>/tensorboard/`` as the rows
are measured, every numeric column a scalar with the round as its step.
"""

from __future__ import annotations

from p2pfl.tracking import (
    TensorBoardTracker,
    TrackingUnavailable,
    require_tensorboard,
    tensorboard_writer,
)

__all__ = ["TensorBoardTracker", "TrackingUnavailable", "require_tensorboard", "tensorboard_writer"]
