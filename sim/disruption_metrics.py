"""What a disruption does to the network, measured over time, plotted and drawn.

Disaster studies ask whether the peers that are left can still learn together: how many
pieces the network broke into, how big the biggest piece is, and how accurate the models
are inside and outside it. These columns are added to the metrics rows only for
scenarios with disruptions (or ``sim.connectivity = true``): computing components costs
O(peers + links) per evaluation, which 10k-peer runs without disruptions should not pay.

Connectivity is measured on the topology graph among the *alive* peers, without the
links that are currently failed. In ``overlay`` network mode the graph says who knows
whom, which is still who a peer exchanges models with.

matplotlib is imported when a figure is made, not with this module: the scenario's
configuration imports the disruptions package, which must stay cheap to import.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from topologies import component_stats, draw_graph, layout

__all__ = ["CONNECTIVITY_COLUMNS", "connectivity_row", "draw_disruption", "plot_disruption_run"]

CONNECTIVITY_COLUMNS = [
    "components",
    "largest_component",
    "largest_component_frac",
    "alive_frac",
    "isolated_peers",
    "links_failed",
    "peers_depleted",
    "acc_largest_component",
    "acc_outside_largest",
    "acc_isolated",
    "acc_component_min",
    "acc_by_component",
]
"""Columns added to the metrics rows; ``acc_*`` are means over evaluated peers (NaN if none).
The runtime adds :data:`sim.metrics.ALL_DEVICES_COLUMNS` too (dead peers' last models)."""

_COMPONENTS_LISTED = 8


def connectivity_row(
    graph: nx.Graph,
    alive: np.ndarray,
    failed_links: Collection[tuple[int, int]],
    peers: Sequence[int],
    accuracy: Sequence[float] | np.ndarray | Any,
) -> dict[str, Any]:
    """Connectivity of the alive peers and accuracy per connected component.

    ``alive`` is a boolean mask over peers; ``peers`` and ``accuracy`` are the peers the
    evaluator measured and their accuracies, aligned (a sample of peers is fine:
    components without a measured peer are left out of the accuracy columns).
    ``acc_by_component`` lists ``size:accuracy`` of the largest components, largest first.
    """
    n = graph.number_of_nodes()
    alive = np.asarray(alive, dtype=bool)
    alive_nodes = [int(p) for p in np.flatnonzero(alive)]
    cut = [e for e in failed_links if graph.has_edge(*e)]
    view = nx.restricted_view(graph, [], cut) if cut else graph
    stats = component_stats(view, alive_nodes)
    component_of: dict[int, int] = stats["component_of"]
    sizes: list[int] = stats["sizes"]

    acc = np.asarray(accuracy, dtype=np.float64).reshape(-1)
    measured = [int(p) for p in peers][: acc.size] if len(peers) == acc.size else []
    by_component: dict[int, list[float]] = {}
    for peer, value in zip(measured, acc, strict=False):
        cid = component_of.get(peer)
        if cid is not None:
            by_component.setdefault(cid, []).append(float(value))
    means = {cid: float(np.mean(values)) for cid, values in by_component.items()}
    outside = [v for cid, values in by_component.items() if cid != 0 for v in values]
    isolated = [v for cid, values in by_component.items() if sizes[cid] == 1 for v in values]
    listed = ";".join(
        f"{sizes[cid]}:{means[cid]:.4f}" for cid in sorted(means)[:_COMPONENTS_LISTED]
    )
    return {
        "components": stats["components"],
        "largest_component": stats["largest"],
        "largest_component_frac": stats["largest"] / n if n else float("nan"),
        "alive_frac": len(alive_nodes) / n if n else float("nan"),
        "isolated_peers": stats["isolated"],
        "links_failed": len(cut),
        "acc_largest_component": means.get(0, float("nan")),
        "acc_outside_largest": _mean(outside),
        "acc_isolated": _mean(isolated),
        "acc_component_min": min(means.values()) if means else float("nan"),
        "acc_by_component": listed,
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# ------------------------------------------------------------------------------ plots


def _mark(ax: Any, events: Sequence[tuple[float, str]], *, labels: bool) -> None:
    for at, label in events:
        ax.axvline(at, color="red", linestyle="--", linewidth=1, alpha=0.8)
        if labels:
            ax.annotate(
                label, (at, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -4),
                textcoords="offset points", rotation=90, va="top", color="red", fontsize=7,
            )  # fmt: skip


def plot_disruption_run(
    rows: list[dict[str, Any]],
    out_dir: Path,
    *,
    title: str,
    events: Sequence[tuple[float, str]] = (),
) -> list[Path]:
    """``disruption.png``: accuracy (alive peers, all devices with the dead ones' last
    models, largest component, outside it, isolated, and
    peers without data when there are relays) over
    rounds above connectivity (largest component and alive peers as shares of all peers,
    number of components), with each disruption marked by a labelled vertical line."""
    if not rows or "components" not in rows[0]:
        return []
    rounds = [r["round"] for r in rows]

    def column(name: str) -> list[float]:
        return [float(r.get(name, float("nan"))) for r in rows]

    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 6.4), sharex=True)
    top.plot(rounds, column("acc_mean"), marker="o", markersize=3, label="all alive peers (mean)")
    top.fill_between(rounds, column("acc_min"), column("acc_max"), alpha=0.15, label="min-max")
    if any("acc_mean_all" in r for r in rows):  # dead devices with their last model
        top.plot(rounds, column("acc_mean_all"), linestyle="--", label="all devices (mean)")
    top.plot(rounds, column("acc_largest_component"), linestyle="-", label="largest component")
    top.plot(rounds, column("acc_outside_largest"), linestyle="-.", label="outside largest")
    top.plot(
        rounds,
        column("acc_isolated"),
        linestyle=":",
        marker="x",
        markersize=4,
        label="isolated peers",
    )
    if any("acc_without_data" in r for r in rows):  # relay-only peers, measured apart
        top.plot(rounds, column("acc_without_data"), linestyle="--", label="peers without data")
    top.set(ylabel="test accuracy", title=title, ylim=(0, 1))
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=7)
    _mark(top, events, labels=True)

    bottom.plot(
        rounds,
        column("largest_component_frac"),
        marker="o",
        markersize=3,
        label="largest component / all peers",
    )
    bottom.plot(rounds, column("alive_frac"), linestyle="--", label="alive / all peers")
    bottom.set(xlabel="round", ylabel="share of peers", ylim=(0, 1.05))
    bottom.grid(alpha=0.3)
    counts = bottom.twinx()
    counts.step(rounds, column("components"), where="post", color="tab:green", label="components")
    counts.set_ylabel("components", color="tab:green")
    counts.set_ylim(bottom=0)
    lines = bottom.get_legend_handles_labels()
    more = counts.get_legend_handles_labels()
    bottom.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left", fontsize=7)
    _mark(bottom, events, labels=False)
    fig.tight_layout()
    path = out_dir / "disruption.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def draw_disruption(
    graph: nx.Graph,
    out_dir: Path | None = None,
    *,
    label: str,
    dead_before: Collection[int] = (),
    failed_before: Collection[tuple[int, int]] = (),
    dead_after: Collection[int] = (),
    failed_after: Collection[tuple[int, int]] = (),
    before_path: Path | None = None,
    after_path: Path | None = None,
) -> list[Path]:
    """Draw the graph just before a disruption (the peers it takes out in red) and just
    after (lost peers as grey crosses, lost links dashed), from the same positions.

    Writes ``graph_before.png`` / ``graph_after.png`` in ``out_dir``, or to the explicit
    paths; a path left ``None`` (with no ``out_dir``) is not drawn.
    """
    if out_dir is not None:
        before_path = before_path or out_dir / "graph_before.png"
        after_path = after_path or out_dir / "graph_after.png"
    pos = layout(graph)
    hit = set(dead_after) - set(dead_before)
    paths = []
    if before_path is not None:
        paths.append(
            draw_graph(
                graph, before_path, pos=pos, title=f"before: {label} (red: hit)",
                highlight=hit, removed=set(dead_before), removed_edges=failed_before,
            )
        )  # fmt: skip
    if after_path is not None:
        stats = component_stats(
            nx.restricted_view(graph, [], [e for e in failed_after if graph.has_edge(*e)]),
            set(graph.nodes) - set(dead_after),
        )
        paths.append(
            draw_graph(
                graph, after_path, pos=pos,
                title=f"after: {label} ({stats['components']} components, largest {stats['largest']})",
                removed=set(dead_after), removed_edges=failed_after,
            )
        )  # fmt: skip
    return paths


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
