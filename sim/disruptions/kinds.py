"""What each kind of disruption does: how it picks its targets, how it fires, how it is undone.

One class per kind, found by the kind's name in :data:`ACTIONS`; the runtime
(:mod:`sim.disruptions.runtime`) holds one action per ``[[disruptions]]`` table and never
asks which kind it has. An action keeps what it took (the peers it downed, the links it
cut) so that a later ``recover`` or ``heal`` can give exactly that back.

The shared bookkeeping (a peer down for several reasons, a link cut twice, batteries)
stays with the runtime; actions change the network only through its primitives
(``take_down``, ``bring_up``, ``cut_link``, ``restore_link``), so those rules hold
whatever the kind.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import networkx as nx
import numpy as np

from sim.disruptions.action import DisruptionAction, Outcome
from sim.disruptions.config import (
    DISRUPTION_KINDS,
    BatteryDrain,
    Churn,
    Crash,
    DataLoss,
    Edge,
    Heal,
    Join,
    LinkFailure,
    Partition,
    Recover,
    RegionOutage,
    undo_target,
)
from sim.disruptions.moving import DegradeAction, MobilityAction
from sim.disruptions.targets import Targets, check_peers, edge, peer_pool, seed_for
from sim.errors import DisruptionError
from topologies import (
    Battery,
    churn_trace,
    cut_edges,
    partition_groups,
    region_outage,
    select_links,
    select_peers,
)
from topologies.disruption import PeerStrategy
from topologies.errors import TopologyError

if TYPE_CHECKING:
    from sim.disruptions.runtime import DisruptionRuntime

__all__ = ["ACTIONS", "DisruptionAction", "GraphHit", "Outcome", "action_for", "choose_targets"]


# ------------------------------------------------------------------ one-off hits on the graph


class GraphHit(DisruptionAction):
    """A disruption that takes peers or links out at once and can be undone."""

    hits_graph: ClassVar[bool] = True

    def __init__(self, spec: Any, index: int) -> None:
        super().__init__(spec, index)
        self.taken: tuple[int, ...] = ()
        self.cut: tuple[Edge, ...] = ()

    def targets(
        self,
        graph: nx.Graph,
        *,
        seed: int,
        alive: Collection[int] | None = None,
        relays: Collection[int] = (),
        failed_links: Collection[Edge] = (),
    ) -> Targets:
        """The peers or links this disruption takes out of ``graph``, deterministic in ``seed``.

        ``alive`` (default: every peer) restricts peer choices to peers still up, so
        "crash 8" really takes 8 more; a count larger than the pool left takes the whole
        pool. Rankings (degree, betweenness, bridges) are measured on the intact ``graph``,
        except for a crash with ``recompute``: it ranks on the graph that is left (alive
        peers, without ``failed_links``) and re-ranks after each peer it takes.
        """
        alive_set = set(graph.nodes) if alive is None else set(alive)
        try:
            return self._pick(graph, seed, alive_set, relays, failed_links)
        except TopologyError as error:
            raise DisruptionError(str(error)) from None

    def _pick(
        self,
        graph: nx.Graph,
        seed: int,
        alive: set[int],
        relays: Collection[int],
        failed_links: Collection[Edge] = (),
    ) -> Targets:
        raise NotImplementedError

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        alive = [int(p) for p in np.flatnonzero(runtime.engine.alive)]
        targets = self.targets(
            runtime.graph,
            seed=seed_for(runtime.seed, self.index),
            alive=alive,
            relays=runtime.relays,
            failed_links=set(runtime.network.failed_links),
        )
        down = tuple(p for p in targets.peers if runtime.take_down(p, self.reason))
        cut = tuple(e for e in targets.links if runtime.cut_link(e))
        self.taken, self.cut = targets.peers, targets.links
        return Outcome(down=down, cut=cut)

    def undo(self, runtime: DisruptionRuntime) -> Outcome:
        taken, self.taken = self.taken, ()
        cut, self.cut = self.cut, ()
        up = tuple(p for p in taken if runtime.bring_up(p, self.reason))
        restored = tuple(e for e in cut if runtime.restore_link(e))
        return Outcome(up=up, restored=restored)


class CrashAction(GraphHit):
    kind = "crash"
    spec: Crash

    def prepare(self, runtime: DisruptionRuntime) -> None:
        if self.spec.peers is not None:
            check_peers(self.spec.peers, runtime.graph, "peers")
        _check_count(self.spec.count, self.spec.among, runtime)

    def _pick(
        self,
        graph: nx.Graph,
        seed: int,
        alive: set[int],
        relays: Collection[int],
        failed_links: Collection[Edge] = (),
    ) -> Targets:
        spec = self.spec
        if spec.peers is not None:
            check_peers(spec.peers, graph, "peers")
            return Targets(peers=tuple(p for p in spec.peers if p in alive))
        pool = peer_pool(graph, spec.among, relays) & alive
        amount = spec.fraction if spec.count is None else min(spec.count, len(pool))
        assert amount is not None  # the schema asks for exactly one of them
        ranked_on = graph
        if spec.recompute:  # the graph the earlier losses left: alive peers, links up
            ranked_on = nx.Graph(graph.subgraph(alive))
            ranked_on.remove_edges_from(e for e in failed_links if ranked_on.has_edge(*e))
        chosen = select_peers(
            ranked_on, amount, spec.strategy, seed=seed, candidates=pool, recompute=spec.recompute
        )
        return Targets(peers=tuple(chosen))


class RegionOutageAction(GraphHit):
    kind = "region_outage"
    spec: RegionOutage

    def prepare(self, runtime: DisruptionRuntime) -> None:
        _check_geometric(runtime)

    def _pick(
        self,
        graph: nx.Graph,
        seed: int,
        alive: set[int],
        relays: Collection[int],
        failed_links: Collection[Edge] = (),
    ) -> Targets:
        inside = region_outage(graph, self.spec.center, self.spec.radius)
        return Targets(peers=tuple(sorted(inside & alive)))


class LinkFailureAction(GraphHit):
    kind = "link_failure"
    spec: LinkFailure

    def prepare(self, runtime: DisruptionRuntime) -> None:
        if self.spec.links is not None:
            self.targets(runtime.graph, seed=0)  # refuses links that are not in the graph

    def _pick(
        self,
        graph: nx.Graph,
        seed: int,
        alive: set[int],
        relays: Collection[int],
        failed_links: Collection[Edge] = (),
    ) -> Targets:
        spec = self.spec
        if spec.links is not None:
            missing = [e for e in spec.links if not graph.has_edge(*e)]
            if missing:
                raise DisruptionError(f"links not in the graph: {missing[:5]}")
            return Targets(links=tuple(edge(u, v) for u, v in spec.links))
        amount: int | float | None = spec.fraction if spec.count is None else spec.count
        assert amount is not None  # the schema asks for exactly one of them
        return Targets(links=tuple(select_links(graph, amount, seed=seed, strategy=spec.strategy)))


class PartitionAction(GraphHit):
    kind = "partition"
    spec: Partition

    def prepare(self, runtime: DisruptionRuntime) -> None:
        if self.spec.method == "spatial":
            _check_geometric(runtime)

    def _pick(
        self,
        graph: nx.Graph,
        seed: int,
        alive: set[int],
        relays: Collection[int],
        failed_links: Collection[Edge] = (),
    ) -> Targets:
        groups = partition_groups(graph, self.spec.parts, seed=seed, method=self.spec.method)
        return Targets(links=tuple(cut_edges(graph, groups)))


# ------------------------------------------------------------------ undoing


class UndoAction(DisruptionAction):
    """``recover`` / ``heal``: undo the latest earlier disruption it names (or of its kinds)."""

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        target = undo_target(runtime.specs, self.index)
        assert target is not None  # checked when the scenario was validated
        return runtime.actions[target].undo(runtime)


class RecoverAction(UndoAction):
    kind = "recover"
    spec: Recover


class HealAction(UndoAction):
    kind = "heal"
    spec: Heal


# ------------------------------------------------------------------ disruptions of a set of peers


class CohortAction(DisruptionAction):
    """A disruption that applies to a set of peers drawn once (``members``)."""

    spec: Any

    def _explicit(self) -> list[int] | None:
        """Peers the table names itself (``peers = [...]``), if it can."""
        return None

    def _strategy(self) -> PeerStrategy:
        return "random"

    def prepare(self, runtime: DisruptionRuntime) -> None:
        _check_count(self.spec.count, self.spec.among, runtime)

    def members(self, runtime: DisruptionRuntime) -> list[int]:
        """The peers it applies to: explicit, or drawn from ``among`` (seeded); recorded."""
        explicit = self._explicit()
        if explicit is not None:
            members = sorted(set(explicit))
        else:
            spec = self.spec
            pool = peer_pool(runtime.graph, spec.among, runtime.relays)
            if spec.count is None and spec.fraction is None:
                members = sorted(pool)
            else:
                # a count larger than what is left of the pool (an earlier data_loss
                # shrank it) takes the whole pool
                amount = min(spec.count, len(pool)) if spec.count is not None else spec.fraction
                seed = seed_for(runtime.seed, self.index, 1)
                members = sorted(
                    select_peers(
                        runtime.graph, amount, self._strategy(), seed=seed, candidates=pool
                    )
                )
        runtime.members[self.index] = members
        return members


class JoinAction(CohortAction):
    """Peers withheld from the start (sends to them fail) that come up when it fires."""

    kind = "join"
    spec: Join

    def __init__(self, spec: Any, index: int) -> None:
        super().__init__(spec, index)
        self.withheld: tuple[int, ...] = ()

    def _explicit(self) -> list[int] | None:
        return self.spec.peers

    def prepare(self, runtime: DisruptionRuntime) -> None:
        if self.spec.peers is not None:
            check_peers(self.spec.peers, runtime.graph, "peers")
        super().prepare(runtime)
        joiners = self.members(runtime)
        for peer in joiners:
            runtime.withhold(peer, self.reason)  # not there yet: sends to it fail
        runtime.late_joiners.update(joiners)
        self.withheld = tuple(joiners)

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        withheld, self.withheld = self.withheld, ()
        return Outcome(up=tuple(p for p in withheld if runtime.bring_up(p, self.reason)))


class DataLossAction(CohortAction):
    """The peers keep their model and links but have nothing left to train on."""

    kind = "data_loss"
    spec: DataLoss

    def _explicit(self) -> list[int] | None:
        return self.spec.peers

    def _strategy(self) -> PeerStrategy:
        return self.spec.strategy

    def prepare(self, runtime: DisruptionRuntime) -> None:
        if self.spec.peers is not None:
            check_peers(self.spec.peers, runtime.graph, "peers")
        super().prepare(runtime)

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        lost = self.members(runtime)
        runtime.lose_data(lost)
        return Outcome(lost_data=tuple(lost))


class BatteryAction(CohortAction):
    """Gives each member a battery (capacity spread by ``heterogeneity``) that starts draining."""

    kind = "battery"
    watches_work: ClassVar[bool] = True
    spec: BatteryDrain

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        spec = self.spec
        members = self.members(runtime)
        rng = np.random.default_rng(seed_for(runtime.seed, self.index, 2))
        spread = rng.uniform(1 - spec.heterogeneity, 1 + spec.heterogeneity, size=len(members))
        for peer, scale in zip(members, spread, strict=True):
            battery = Battery(
                capacity_j=spec.capacity_j * float(scale),
                drain_per_step_j=spec.drain_per_step_j,
                drain_per_byte_sent_j=spec.drain_per_byte_sent_j,
                drain_per_byte_received_j=spec.drain_per_byte_received_j,
                idle_drain_per_s_j=spec.idle_drain_per_s_j,
            )
            runtime.bank.add(peer, battery, on=bool(runtime.engine.alive[peer]))
        return Outcome()


class ChurnAction(CohortAction):
    """Schedules the leaves and joins of a trace (given, or drawn from exponential sessions)."""

    kind = "churn"
    spec: Churn

    def prepare(self, runtime: DisruptionRuntime) -> None:
        super().prepare(runtime)
        if self.spec.trace is not None:
            check_peers([peer for _, peer, _ in self.spec.trace], runtime.graph, "trace")

    def fire(self, runtime: DisruptionRuntime) -> Outcome:
        spec = self.spec
        engine = runtime.engine
        start = engine.now
        events: Sequence[tuple[float, int, str]]
        if spec.trace is not None:
            events = sorted((float(t), int(p), kind) for t, p, kind in spec.trace)
        else:
            members = self.members(runtime)
            assert spec.horizon and spec.mean_session and spec.mean_downtime
            events = [
                (e.time, e.peer, e.kind)
                for e in churn_trace(
                    runtime.n, seed=seed_for(runtime.seed, self.index, 3), horizon=spec.horizon,
                    mean_session=spec.mean_session, mean_downtime=spec.mean_downtime, peers=members,
                )
            ]  # fmt: skip
        for time, peer, kind in events:
            change = runtime.take_down if kind == "leave" else runtime.bring_up
            engine.schedule(start + time, _at_time(change, peer, self.reason))
        return Outcome()


# ------------------------------------------------------------------ registry


ACTIONS: dict[str, type[DisruptionAction]] = {
    action.kind: action
    for action in (
        CrashAction,
        RecoverAction,
        LinkFailureAction,
        RegionOutageAction,
        PartitionAction,
        HealAction,
        BatteryAction,
        ChurnAction,
        JoinAction,
        DataLossAction,
        DegradeAction,
        MobilityAction,
    )
}
"""The behaviour of each kind of ``[[disruptions]]`` table, by its ``kind``."""

assert tuple(ACTIONS) == DISRUPTION_KINDS, "every kind of the schema needs an action"


def action_for(spec: Any, index: int) -> DisruptionAction:
    """The action that carries out ``spec``, the ``index``-th table of the scenario."""
    return ACTIONS[spec.kind](spec, index)


def choose_targets(
    spec: Any,
    graph: nx.Graph,
    *,
    seed: int,
    alive: Collection[int] | None = None,
    relays: Collection[int] = (),
    failed_links: Collection[Edge] = (),
) -> Targets:
    """Pick the peers or links that ``spec`` (crash, region_outage, link_failure,
    partition) takes out of ``graph``, deterministically under ``seed``
    (see :meth:`GraphHit.targets`)."""
    action = action_for(spec, 0)
    if not isinstance(action, GraphHit):
        raise DisruptionError(f"{spec.kind} is not a one-off disruption of a graph")
    return action.targets(graph, seed=seed, alive=alive, relays=relays, failed_links=failed_links)


# ------------------------------------------------------------------ checks


def _check_count(count: int | None, among: str, runtime: DisruptionRuntime) -> None:
    if count is not None:
        pool = peer_pool(runtime.graph, among, runtime.relays)
        if count > len(pool):
            raise DisruptionError(f"count={count} but only {len(pool)} peers among {among}")


def _check_geometric(runtime: DisruptionRuntime) -> None:
    if len(nx.get_node_attributes(runtime.graph, "pos")) != runtime.n:
        raise DisruptionError("needs a geometric graph (peers with positions)")


def _at_time(change: Callable[[int, str], bool], peer: int, reason: str) -> Callable[[float], None]:
    """An engine action that applies ``change(peer, reason)`` (a churn event)."""

    def action(now: float) -> None:
        change(peer, reason)

    return action
