"""Write ``digits.npz`` (scikit-learn's 8x8 digits as 1x8x8 images) for the custom example.

    python examples/custom/make_npz.py [OUT_DIR]

Any ``.npz`` with ``x_train`` (N, C, H, W) floats, ``y_train`` (N,) integer labels and the
same for ``x_test``/``y_test`` works the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def write(folder: Path) -> Path:
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:360], order[360:]
    path = folder / "digits.npz"
    np.savez_compressed(path, x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    print(f"wrote {write(out)}")
