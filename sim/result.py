"""What a run gives back to Python: its rows, its summary, its folder.

Kept apart from :mod:`sim.api` so that the seed groups (:mod:`sim.seeds`) can return the
same object without importing the notebook API. pandas is optional: ``to_pandas`` loads
it only when asked, and says how to get it when it is missing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SimResult", "require_pandas"]


def require_pandas(what: str) -> Any:
    """The ``pandas`` module, or an ImportError that says it is optional and how to get it."""
    try:
        return importlib.import_module("pandas")
    except ImportError:
        raise ImportError(
            f"{what} needs pandas, which p2pfl does not install: `pip install pandas` "
            "(the same data is available without it as a list of dicts)"
        ) from None


@dataclass
class SimResult:
    """One simulation run: ``rows`` (one dict per evaluation), ``summary`` (as in
    ``summary.json``), ``run_dir`` (None when nothing was written) and the ``scenario``."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path | None
    scenario: Any = field(repr=False, default=None)

    @property
    def status(self) -> str:
        """``completed``, or ``interrupted`` for a run stopped by Ctrl-C."""
        return str(self.summary.get("status", "completed"))

    @property
    def final(self) -> dict[str, Any]:
        """The last row measured (empty if none was)."""
        return self.rows[-1] if self.rows else {}

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame`` (pandas must be installed; it is optional)."""
        pandas = require_pandas("SimResult.to_pandas()")
        return pandas.DataFrame(self.rows)
