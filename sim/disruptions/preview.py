"""One-line disruptions, as ``p2pfl topo --disrupt`` takes them: parsed, applied, drawn.

The command line previews what a disruption would take out of a graph without running a
simulation; it shares the schema (:mod:`sim.disruptions.config`) and the way each kind
picks its targets (:mod:`sim.disruptions.kinds`) with the simulator.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from pydantic import TypeAdapter, ValidationError

from sim.disruption_metrics import connectivity_row, draw_disruption
from sim.disruptions.config import DISRUPTION_KINDS, Disruption
from sim.disruptions.kinds import ACTIONS, choose_targets
from sim.disruptions.targets import seed_for
from sim.errors import DisruptionError

__all__ = ["parse_disruption", "preview_disruption"]


def parse_disruption(text: str) -> Any:
    """Read a one-line disruption, ``kind:key=value,key=value``, as ``p2pfl topo --disrupt``
    takes it, e.g. ``region_outage:center=0.5,0.5,radius=0.25`` or
    ``crash:count=5,strategy=degree``. A comma-separated token without ``=`` continues the
    previous key's value (``center=0.5,0.5``). It fires at time 0 unless it says otherwise.
    """
    kind, _, rest = text.partition(":")
    values: dict[str, list[Any]] = {}
    key: str | None = None
    for token in filter(None, (t.strip() for t in rest.split(","))):
        if "=" in token:
            key, value = (part.strip() for part in token.split("=", 1))
            values[key] = [_scalar(value)]
        elif key is None:
            raise DisruptionError(f"--disrupt {text!r}: expected key=value after {kind!r}:")
        else:
            values[key].append(_scalar(token))
    raw: dict[str, Any] = {"kind": kind.strip()}
    raw.update({k: v[0] if len(v) == 1 else v for k, v in values.items()})
    if "at_round" not in raw and "at_time" not in raw:
        raw["at_time"] = 0.0
    try:
        return TypeAdapter(Disruption).validate_python(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in DISRUPTION_KINDS)
        raise DisruptionError(
            f"--disrupt {text!r}: {where + ': ' if where else ''}{first['msg']}"
        ) from None


def _scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def preview_disruption(
    graph: nx.Graph,
    text: str,
    *,
    seed: int = 0,
    before: Path | None = None,
    after: Path | None = None,
) -> str:
    """Apply a one-line disruption (see :func:`parse_disruption`) to ``graph`` and draw it
    before (hit peers in red) and after (lost peers and links greyed) to PNG; return a
    one-line summary of what it took and how the graph broke up."""
    spec = parse_disruption(text)
    drawable = [kind for kind, action in ACTIONS.items() if action.hits_graph]
    if spec.kind not in drawable:
        raise DisruptionError(
            f"--disrupt: only {', '.join(drawable)} can be drawn, not {spec.kind}"
        )
    targets = choose_targets(spec, graph, seed=seed_for(seed, 0))
    dead, cut = set(targets.peers), set(targets.links)
    draw_disruption(
        graph,
        label=spec.label,
        dead_after=dead,
        failed_after=cut,
        before_path=before,
        after_path=after,
    )
    alive = np.ones(graph.number_of_nodes(), dtype=bool)
    alive[list(dead)] = False
    row = connectivity_row(graph, alive, cut, (), ())
    return (
        f"{spec.label}: {len(dead)} peers and {len(cut)} links lost; "
        f"{row['components']} components "
        f"among {int(alive.sum())} peers left, largest {row['largest_component']}, "
        f"{row['isolated_peers']} isolated"
    )
