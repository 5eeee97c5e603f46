"""Optional experiment tracking: measurements as TensorBoard scalars.

Off by default and behind an extra (``pip install 'p2pfl-gossip[tracking]'``, which adds the
``tensorboard`` package that ``torch.utils.tensorboard`` needs). Both drivers use it, so
it lives here rather than in ``sim`` (``p2pfl`` never imports ``sim``):

- the simulator (``p2pfl sim --tensorboard``, ``sim.run(..., tensorboard=True)``) writes
  its rows into ``<run folder>/tensorboard/``;
- a node (``p2pfl node --tensorboard``, ``tensorboard = true`` in its TOML) writes its
  per-round measurements into ``<state_dir>/tensorboard/``.

Every numeric column becomes a scalar with the round as its step, so ``tensorboard
--logdir runs`` shows every run (or every node's state directory) side by side.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError

__all__ = ["TensorBoardTracker", "TrackingUnavailable", "require_tensorboard", "tensorboard_writer"]


class TrackingUnavailable(P2PFLError, ImportError):
    """The tracking package is not installed; the message says how to get it."""


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard``, or TrackingUnavailable naming the extra to install."""
    try:
        importlib.import_module("tensorboard")
        return importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise TrackingUnavailable(
            "TensorBoard tracking needs the tensorboard package: pip install 'p2pfl-gossip[tracking]' "
            "(or pip install tensorboard)"
        ) from None


def tensorboard_writer(log_dir: Path) -> Any:
    """A ``SummaryWriter`` writing event files into ``log_dir``."""
    return require_tensorboard().SummaryWriter(log_dir=str(log_dir))


class TensorBoardTracker:
    """Each row's numeric columns as scalars at step ``round``; flushed per row, so what
    a run measured is in the event files even if it is interrupted."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer = tensorboard_writer(log_dir)

    def __call__(self, row: dict[str, Any]) -> None:
        step = int(row.get("round", 0))
        for key, value in row.items():
            if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
