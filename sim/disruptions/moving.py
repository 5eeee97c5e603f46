"""Disruptions that unfold round by round: links degrading, peers moving out of range.

The one-off kinds (:mod:`sim.disruptions.kinds`) change the network once when they fire.
These two fire once too, then keep acting at every round the system completes, through an
engine progress listener, until they are done: a :class:`DegradeAction` after
``over_rounds`` steps, a :class:`MobilityAction` at ``until_round`` (or the end of the run).
Both change the network only through the runtime's primitives and the network's
conditions (:meth:`sim.network.Network.set_link`), and both are deterministic under the
scenario's seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from sim.disruptions.action import DisruptionAction, Outcome
from sim.disruptions.config import Degrade, Edge, Mobility
from sim.disruptions.targets import check_peers, edge, seed_for
from sim.errors import DisruptionError

if TYPE_CHECKING:
    from sim.disruptions.runtime import DisruptionRuntime

__all__ = ["DegradeAction", "MobilityAction"]


class DegradeAction(DisruptionAction):
    """Links whose loss, latency and rate worsen linearly over ``over_rounds`` rounds."""

    kind = "degrade"
    spec: Degrade

    def __init__(self, spec: Any, index: int) -> None:
        super().__init__(spec, index)
        self.links: list[Edge] = []
        #: each link's (latency, loss, rate) when the degradation began
        self._start: dict[Edge, tuple[float, float, float]] = {}
        self._first_round = 0
        self._done = False

    def prepare(self, runtime: DisruptionRuntime) -> None:
        if self.spec.peers is not None:
            check_peers(self.spec.peers, runtime.graph, "peers")

    def _choose(self, runtime: DisruptionRuntime) -> list[Edge]:
        links = sorted(edge(u, v) for u, v in runtime.graph.edges())
        spec = self.spec
        if spec.peers is not None:
            chosen = set(spec.peers)
            return [link for link in links if link[0] in chosen or link[1] in chosen]
        if spec.fraction is not None:
            rng = np.random.default_rng(seed_for(runtime.seed, self.index))
            count = max(1, round(spec.fraction * len(links)))
            picked = rng.choice(len(links), size=min(count, len(links)), replace=False)
            return [links[i] for i in sorted(picked.tolist())]
        return links

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        network = runtime.network
        self.links = self._choose(runtime)
        for u, v in self.links:
            now = network.link_conditions(u, v)
            rate = now.bandwidth if now.bandwidth is not None else max(network.uplink(u), network.uplink(v))
            self._start[(u, v)] = (now.latency, now.loss, rate)
        self._first_round = runtime.engine.progress()
        self._step(runtime, 1)
        if not self._done:
            runtime.engine.on_progress(lambda progress: self._on_round(runtime, progress))
        return Outcome()

    def _on_round(self, runtime: DisruptionRuntime, progress: int) -> None:
        if not self._done:
            self._step(runtime, progress - self._first_round + 1)

    def _step(self, runtime: DisruptionRuntime, step: int) -> None:
        """Set every chosen link to ``step / over_rounds`` of the way to the end values."""
        spec = self.spec
        share = min(1.0, step / spec.over_rounds)
        for link, (latency, loss, rate) in self._start.items():
            runtime.network.set_link(
                *link,
                latency=None if spec.latency_factor is None else latency * (1 + (spec.latency_factor - 1) * share),
                loss=None if spec.loss is None else loss + (spec.loss - loss) * share,
                bandwidth=None if spec.bandwidth_factor is None else rate * (1 - (1 - spec.bandwidth_factor) * share),
            )  # fmt: skip
        runtime.engine.records["degrade.steps"] += 1.0
        self._done = share >= 1.0


class MobilityAction(DisruptionAction):
    """Peers moving by random waypoint; links up only within radio range."""

    kind = "mobility"
    spec: Mobility

    def __init__(self, spec: Any, index: int) -> None:
        super().__init__(spec, index)
        self.positions = np.zeros((0, 2))
        self.waypoints = np.zeros((0, 2))
        self.movers = np.zeros(0, dtype=np.int64)
        self.edges = np.zeros((0, 2), dtype=np.int64)
        self.held: set[Edge] = set()  # links out of range that this disruption holds down
        self._rng = np.random.default_rng(0)
        self._done = False

    def prepare(self, runtime: DisruptionRuntime) -> None:
        positions = nx.get_node_attributes(runtime.graph, "pos")
        n = runtime.graph.number_of_nodes()
        if len(positions) != n:
            raise DisruptionError("needs peers with positions: a geometric topology")
        self.positions = np.array([positions[i] for i in range(n)], dtype=np.float64)
        self.edges = np.array(sorted(edge(u, v) for u, v in runtime.graph.edges()), dtype=np.int64)
        self.edges = self.edges.reshape(-1, 2)

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        n = len(self.positions)
        self._rng = np.random.default_rng(seed_for(runtime.seed, self.index))
        count = max(1, round(self.spec.fraction * n))
        self.movers = np.sort(self._rng.choice(n, size=min(count, n), replace=False))
        self.waypoints = self._rng.random((n, 2))
        cut, restored = self._follow_range(runtime)
        runtime.engine.on_progress(lambda progress: self._on_round(runtime, progress))
        return Outcome(cut=cut, restored=restored)

    def _on_round(self, runtime: DisruptionRuntime, progress: int) -> None:
        if self._done:  # one move per round completed
            return
        until = self.spec.until_round
        if until is not None and progress > until:
            self._done = True  # links stay as the last move left them
            return
        self._move()
        for peer in self.movers.tolist():  # region outages drawn later see where peers are
            runtime.graph.nodes[peer]["pos"] = (float(self.positions[peer, 0]), float(self.positions[peer, 1]))
        cut, restored = self._follow_range(runtime)
        records = runtime.engine.records
        records["mobility.links_cut"] += float(len(cut))
        records["mobility.links_restored"] += float(len(restored))

    def _move(self) -> None:
        """Every mover goes ``speed`` toward its waypoint; one reached draws the next."""
        movers = self.movers
        here, there = self.positions[movers], self.waypoints[movers]
        gap = there - here
        distance = np.hypot(gap[:, 0], gap[:, 1])
        arrived = distance <= self.spec.speed
        step = np.where(arrived[:, None], gap, gap * (self.spec.speed / np.maximum(distance, 1e-12))[:, None])
        self.positions[movers] = here + step
        if arrived.any():
            fresh = self._rng.random((int(arrived.sum()), 2))
            self.waypoints[movers[arrived]] = fresh

    def _follow_range(self, runtime: DisruptionRuntime) -> tuple[tuple[Edge, ...], tuple[Edge, ...]]:
        """Hold down the links out of range; give back the held ones in range again."""
        if not len(self.edges):
            return (), ()
        ends = self.positions[self.edges[:, 0]] - self.positions[self.edges[:, 1]]
        in_range = np.hypot(ends[:, 0], ends[:, 1]) <= self.spec.radius
        cut: list[Edge] = []
        restored: list[Edge] = []
        for (u, v), reachable in zip(self.edges.tolist(), in_range.tolist(), strict=True):
            link = (u, v)
            if not reachable and link not in self.held:
                self.held.add(link)
                if runtime.cut_link(link):
                    cut.append(link)
            elif reachable and link in self.held:
                self.held.discard(link)
                if runtime.restore_link(link):
                    restored.append(link)
        return tuple(cut), tuple(restored)
