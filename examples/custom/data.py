"""A user-defined dataset for p2pfl: arrays from an ``.npz`` file.

Named in a scenario as ``examples/custom/data.py:load``; p2pfl calls
``load(seed=..., data_dir=...)`` once per process and shares the result among all peers.
It returns the four arrays (see ``p2pfl.plugins.DATASET_CONTRACT``); p2pfl checks them.
``make_npz.py`` writes a ``digits.npz`` to try it with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FILE = "digits.npz"


def load(seed: int, data_dir: str | None) -> dict[str, Any]:
    """``x_train``, ``y_train``, ``x_test``, ``y_test`` from ``<data_dir>/digits.npz``."""
    folder = Path(data_dir) if data_dir else Path(__file__).parent
    if not (folder / FILE).is_file():  # the first thing a new user meets: say what to run
        raise FileNotFoundError(f"{folder / FILE} is missing; write it first: python examples/custom/make_npz.py")
    with np.load(folder / FILE) as arrays:
        return {
            "name": "my-digits",
            "x_train": arrays["x_train"],
            "y_train": arrays["y_train"],
            "x_test": arrays["x_test"],
            "y_test": arrays["y_test"],
        }
