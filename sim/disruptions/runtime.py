"""Carrying a scenario's disruptions out on a built simulation, and measuring their effect.

The runtime schedules each disruption (at a virtual time, or once the system has
completed a round), keeps the bookkeeping every kind shares (a peer down for several
reasons, a link cut by two disruptions, batteries) and logs each firing. What a firing
does is the kind's own (:mod:`sim.disruptions.kinds`): the runtime never asks which kind
it runs.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from sim.disruption_metrics import connectivity_row, draw_disruption, plot_disruption_run
from sim.disruptions.battery import BatteryBank
from sim.disruptions.config import Edge
from sim.disruptions.kinds import DisruptionAction, action_for
from sim.errors import DisruptionError, ScenarioError
from sim.metrics import all_devices_row
from topologies import Battery

if TYPE_CHECKING:
    from sim.runner import Simulation

__all__ = ["Change", "DisruptionRuntime", "install_disruptions"]

logger = logging.getLogger("p2pfl.sim")

_DRAW_LIMIT = 5000
"""Graphs with more peers are not drawn to PNG (a picture of them says little)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One firing, as written to the run folder's ``disruptions.json``."""

    index: int
    label: str
    kind: str
    time: float
    round: int
    down: tuple[int, ...] = ()
    up: tuple[int, ...] = ()
    cut: tuple[Edge, ...] = ()
    restored: tuple[Edge, ...] = ()
    lost_data: tuple[int, ...] = ()


@dataclass(slots=True)
class _Snapshot:
    """The network just before and just after the first disruption that changed it."""

    label: str
    dead_before: set[int]
    failed_before: set[Edge]
    dead_after: set[int] = field(default_factory=set)
    failed_after: set[Edge] = field(default_factory=set)


class DisruptionRuntime:
    """Carries out a scenario's disruptions on a built simulation and measures their effect.

    Made by :func:`install_disruptions` before any peer starts; the runner asks it for
    extra metric columns at each evaluation (:meth:`measure`) and to write its figures
    and log into the run folder (:meth:`write`).
    """

    def __init__(self, simulation: Simulation, disruptions: Sequence[Any], *, seed: int) -> None:
        self.simulation = simulation
        self.engine = simulation.engine
        self.network = simulation.engine.network
        self.graph: nx.Graph = simulation.graph
        self.specs = list(disruptions)
        self.actions: list[DisruptionAction] = [
            action_for(spec, index) for index, spec in enumerate(self.specs)
        ]
        self.seed = seed
        self.n = self.engine.n
        self.relays = {int(r) for r in simulation.relays}
        self.changes: list[Change] = []
        self.late_joiners: set[int] = set()
        #: the peers each join / battery / churn / data_loss disruption (by index) applies to
        self.members: dict[int, list[int]] = {}
        self.snapshot: _Snapshot | None = None
        self.has_data = simulation.data_sizes > 0
        self.bank = BatteryBank(self.engine, self.has_data, self._battery_empty)
        self._down_for: dict[int, set[str]] = defaultdict(set)
        self._link_holds: Counter[Edge] = Counter()
        self._by_round: dict[int, list[int]] = defaultdict(list)

    @property
    def batteries(self) -> dict[int, Battery]:
        return self.bank.batteries

    @property
    def depleted(self) -> set[int]:
        return self.bank.depleted

    @property
    def depleted_at(self) -> dict[int, float]:
        return self.bank.depleted_at

    # -- set-up ----------------------------------------------------------------------
    def install(self) -> None:
        """Validate against the graph, withhold late joiners, and schedule every firing."""
        for index, action in enumerate(self.actions):
            try:
                action.prepare(self)
            except DisruptionError as error:
                raise DisruptionError(f"disruptions.{index} ({action.kind}): {error}") from None
        for index, spec in enumerate(self.specs):
            if spec.at_round is not None and spec.at_round > 0:
                self._by_round[spec.at_round].append(index)
            else:
                at = spec.at_time if spec.at_time is not None else 0.0
                self.engine.schedule(at, self._firing(index))
        if self._by_round:
            self.engine.on_progress(self._on_progress)
        if any(action.watches_work for action in self.actions):
            self.engine.on_handled(self.bank.on_handled)

    # -- firing ----------------------------------------------------------------------
    def _on_progress(self, progress: int) -> None:
        for round_ in sorted(r for r in self._by_round if r <= progress):
            for index in self._by_round.pop(round_):
                self._fire(index)

    def _firing(self, index: int) -> Callable[[float], None]:
        """An engine action that fires disruption ``index``."""
        return lambda now: self._fire(index)

    def _fire(self, index: int) -> None:
        spec, action = self.specs[index], self.actions[index]
        engine = self.engine
        round_ = (
            spec.at_round if spec.at_round is not None else min(engine.progress(), engine.rounds)
        )
        before = (self._dead(), set(self.network.failed_links))
        outcome = action.fire(self)
        change = Change(
            index, spec.label, spec.kind, float(engine.now), int(round_),
            outcome.down, outcome.up, outcome.cut, outcome.restored, outcome.lost_data,
        )  # fmt: skip
        self.changes.append(change)
        self.simulation.events.append((round_, spec.label))
        if self.snapshot is None and action.hits_graph:
            self.snapshot = _Snapshot(
                spec.label, *before, self._dead(), set(self.network.failed_links)
            )

    def _dead(self) -> set[int]:
        return {int(p) for p in np.flatnonzero(~self.engine.alive)}

    # -- peers and links (the primitives every kind changes the network through) -------
    def withhold(self, peer: int, reason: str) -> None:
        """Keep ``peer`` out from the start (a late joiner): sends to it fail."""
        self._down_for[peer].add(reason)
        self.engine.crash(peer)

    def take_down(self, peer: int, reason: str) -> bool:
        """Add a reason for ``peer`` to be down; crash it if it was up. True if it went down."""
        self._down_for[peer].add(reason)
        if not self.engine.alive[peer]:
            return False
        self.bank.pause(peer)  # the idle drain until now
        self.engine.crash(peer)
        return True

    def bring_up(self, peer: int, reason: str) -> bool:
        """Lift one reason; the peer restarts (and greets) once none is left."""
        reasons = self._down_for[peer]
        reasons.discard(reason)
        if reasons or self.engine.alive[peer] or peer in self.bank.depleted:
            return False
        self.engine.recover(peer)
        self.bank.resume(peer)
        known = self.engine.protocols[peer].neighbours
        for other in known:
            j = self.engine.index.get(other)
            if (
                j is not None
                and j != peer
                and self.engine.alive[j]
                and self.network.has_route(peer, j)
            ):
                self._connect(peer, j)
        return True

    def cut_link(self, link: Edge) -> bool:
        """Hold ``link`` down; it fails when the first hold is taken. True if it failed."""
        self._link_holds[link] += 1
        if self._link_holds[link] > 1:
            return False
        self.network.fail_link(*link)
        return True

    def restore_link(self, link: Edge) -> bool:
        """Release one hold; the link comes back (its ends reconnect) when none is left."""
        self._link_holds[link] -= 1
        if self._link_holds[link] > 0:
            return False
        del self._link_holds[link]
        self.network.restore_link(*link)
        u, v = link
        if self.engine.alive[u] and self.engine.alive[v]:
            self._connect(u, v)
        return True

    def lose_data(self, peers: Iterable[int]) -> None:
        """The peers keep their model and links but have nothing left to train on."""
        executor = self.engine.executor
        for peer in peers:
            executor.samplers[peer] = None
            self.simulation.data_sizes[peer] = 0
            self.has_data[peer] = False
            self.relays.add(peer)  # from now on it only relays

    def _connect(self, dialer: int, other: int) -> None:
        """A connection comes up: ``other`` hears the dial one latency later, the dialer
        the answer one more latency later; both then know the other is up."""
        latency = self.network.link_latency(dialer, other)
        engine = self.engine

        def heard(now: float, to: int, about: int) -> None:
            if engine.alive[to] and engine.alive[about] and self.network.has_route(to, about):
                engine.notify(to, about, up=True)

        engine.schedule(engine.now + latency, lambda now: heard(now, other, dialer))
        engine.schedule(engine.now + 2 * latency, lambda now: heard(now, dialer, other))

    def _battery_empty(self, peer: int) -> None:
        if self.engine.alive[peer]:
            self._down_for[peer].add("battery")
            self.engine.crash(peer)
        if len(self.bank.depleted) == 1:
            self.simulation.events.append(
                (min(self.engine.progress(), self.engine.rounds), "first battery empty")
            )

    # -- measuring and writing -----------------------------------------------------------
    def measure(self) -> dict[str, Any]:
        """Connectivity columns for the current metrics row (see :mod:`sim.disruption_metrics`)."""
        evaluator = self.simulation.evaluator
        peers = getattr(evaluator, "last_peers", ())
        accuracy = getattr(evaluator, "last_accuracy", ())
        row = connectivity_row(
            self.graph, self.engine.alive, self.network.failed_links, peers, accuracy
        )
        row["peers_depleted"] = len(self.depleted)
        # beside the survivors' acc_*: every device, the dead with their last model
        row.update(all_devices_row(getattr(evaluator, "last_all_accuracy", ())))
        if self.relays:  # relays (and peers that lost their data) apart from data-holders
            relay = np.zeros(self.n, dtype=bool)
            relay[list(self.relays)] = True
            acc = np.asarray(accuracy, dtype=np.float64).reshape(-1)
            index = np.asarray(peers, dtype=np.int64)
            if index.size == acc.size and acc.size:
                row["acc_with_data"] = _mean_or_nan(acc[~relay[index]])
                row["acc_without_data"] = _mean_or_nan(acc[relay[index]])
        return row

    def write(self, out_dir: Path, *, title: str) -> list[Path]:
        """``disruptions.json``, ``disruption.png`` and the before/after graph drawings."""
        fired = {change.index for change in self.changes}
        missed = [spec.label for i, spec in enumerate(self.specs) if i not in fired]
        if missed:
            logger.warning("the run ended before these disruptions fired: %s", "; ".join(missed))
        log = {
            "disruptions": [spec.model_dump(mode="json", exclude_none=True) for spec in self.specs],
            "fired": [asdict(change) for change in self.changes],
            "never_fired": missed,
            "members": {str(i): peers for i, peers in sorted(self.members.items())},
            "late_joiners": sorted(self.late_joiners),
            "depleted_at": {str(p): t for p, t in sorted(self.depleted_at.items())},
        }
        path = out_dir / "disruptions.json"
        path.write_text(json.dumps(log, indent=1) + "\n")
        paths = [path]
        paths += plot_disruption_run(
            self.simulation.rows, out_dir, title=title, events=self.simulation.events
        )
        if self.snapshot is not None and self.n <= _DRAW_LIMIT:
            s = self.snapshot
            paths += draw_disruption(
                self.graph, out_dir, label=s.label,
                dead_before=s.dead_before, failed_before=s.failed_before,
                dead_after=s.dead_after, failed_after=s.failed_after,
            )  # fmt: skip
        return paths


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def install_disruptions(simulation: Simulation) -> DisruptionRuntime | None:
    """Set up the scenario's disruptions on a built simulation, before any peer starts.

    Returns ``None`` (and costs nothing) when the scenario has no disruptions and does not
    ask for connectivity metrics. Raises :class:`sim.errors.ScenarioError` when a
    disruption does not fit the graph (a region outage on a graph without positions...).
    """
    scenario = simulation.scenario
    disruptions = getattr(scenario, "disruptions", [])
    if not disruptions and not getattr(scenario.sim, "connectivity", False):
        return None
    runtime = DisruptionRuntime(simulation, disruptions, seed=scenario.seed)
    try:
        runtime.install()
    except DisruptionError as error:
        raise ScenarioError(str(error)) from None
    return runtime
