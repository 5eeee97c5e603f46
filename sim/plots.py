"""PNG plots of a run's metrics (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _accuracy_band(ax: Any, x: Sequence[float], rows: list[dict[str, Any]], label: str) -> None:
    mean = [r["acc_mean"] for r in rows]
    ax.plot(x, mean, marker="o", markersize=3, label=f"{label} mean")
    ax.fill_between(x, [r["acc_min"] for r in rows], [r["acc_max"] for r in rows], alpha=0.2, label=f"{label} min-max")


def plot_run(rows: list[dict[str, Any]], out_dir: Path, *, title: str, events: Sequence[tuple[float, str]] = ()) -> list[Path]:
    """Accuracy vs rounds, accuracy vs bytes, consensus distance; returns the PNG paths."""
    if not rows:
        return []
    paths = []
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _accuracy_band(ax, rounds, rows, "peer accuracy")
    for at, label in events:
        ax.axvline(at, color="red", linestyle="--", linewidth=1)
        ax.annotate(label, (at, 0.02), rotation=90, color="red", fontsize=8)
    ax.set(xlabel="round", ylabel="test accuracy", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    paths.append(_save(fig, out_dir / "accuracy_vs_rounds.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    megabytes = [r["bytes_total"] / 1e6 for r in rows]
    _accuracy_band(ax, megabytes, rows, "peer accuracy")
    ax.set(xlabel="total bytes sent (MB)", ylabel="test accuracy", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    paths.append(_save(fig, out_dir / "accuracy_vs_bytes.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(rounds, [r["consensus_distance"] for r in rows], marker="o", markersize=3)
    ax.set(xlabel="round", ylabel="mean distance to average model", title=f"{title}: consensus", yscale="log")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "consensus_distance.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
