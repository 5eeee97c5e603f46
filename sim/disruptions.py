"""Disasters and disruptions in a simulation: declared in the scenario, fired in virtual time.

A scenario lists its disruptions as an array of tables::

    [[disruptions]]
    kind = "crash"            # crash | recover | link_failure | region_outage | partition
    at_round = 20             #   | heal | battery | churn | join | data_loss
    count = 8
    strategy = "degree"
    among = "relays"

Each table is validated here (pydantic, a discriminated union on ``kind``, unknown keys
rejected), so a mistake is one line naming the key. Whom a disruption takes out is
chosen by the pure functions of :mod:`topologies.disruption`, seeded by the scenario
seed and the disruption's position in the list, so a scenario replays exactly.

Peers are never told that a neighbour died: like a real node, they find out when a send
fails or a timeout fires (the engine turns sends to dead peers and over failed links
into ``SendFailed``). What a real node *does* see is a connection coming up: a peer that
recovers or joins dials the neighbours it knows, and a healed link reconnects its two
ends, so those raise ``PeerUp`` on both sides (the dialled peer one link latency later,
the dialler on the answer, one more latency later).

A peer can be down for several reasons at once (inside an outage region *and* churned
out): it comes back only when every reason is lifted, and never once its battery is empty.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import networkx as nx
import numpy as np
from pydantic import (
    AfterValidator,
    Field,
    NonNegativeInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from p2pfl.config import Strict
from p2pfl.protocols.base import Effect, Event, MessageReceived, Send, Train
from sim.disruption_metrics import connectivity_row, draw_disruption, plot_disruption_run
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
    from sim.runner import Simulation

__all__ = [
    "DISRUPTION_KINDS",
    "BatteryDrain",
    "Change",
    "Churn",
    "Crash",
    "DataLoss",
    "Disruption",
    "DisruptionError",
    "DisruptionList",
    "DisruptionRuntime",
    "Heal",
    "Join",
    "LinkFailure",
    "Partition",
    "Recover",
    "RegionOutage",
    "choose_targets",
    "install_disruptions",
    "parse_disruption",
    "preview_disruption",
]

logger = logging.getLogger("p2pfl.sim")

Edge = tuple[int, int]
Among = Literal["all", "data_holders", "relays"]


class DisruptionError(ValueError):
    """A disruption that cannot apply to this scenario's graph; one line for the user."""


# =============================================================================== schema


class _Disruption(Strict):
    """Fields every disruption has: when it fires and what it is called."""

    #: whether the disruption must say when it fires (battery and churn start at time 0)
    needs_trigger: ClassVar[bool] = True

    at_round: NonNegativeInt | None = Field(
        None, description="fire once the system has completed this many rounds"
    )
    at_time: float | None = Field(None, ge=0, description="fire at this virtual time, seconds")
    name: str | None = Field(
        None, min_length=1, description="label on plots; what a later recover/heal `of` names"
    )

    @model_validator(mode="after")
    def _check_trigger(self) -> _Disruption:
        if self.at_round is not None and self.at_time is not None:
            raise ValueError("give at_round or at_time, not both")
        if self.needs_trigger and self.at_round is None and self.at_time is None:
            raise ValueError("needs at_round or at_time (when it fires)")
        return self

    @property
    def label(self) -> str:
        """The name, or a short description, e.g. ``crash 8 relays (degree)``."""
        return self.name or self._describe()

    def _describe(self) -> str:
        return str(getattr(self, "kind", "disruption"))


def _exactly_one(model: Strict, *names: str) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of {', '.join(names)}"
            + (f" (got {', '.join(given)})" if given else "")
        )


def _amount_text(count: int | None, fraction: float | None, peers: Sequence[Any] | None) -> str:
    if peers is not None:
        return f"{len(peers)}"
    return f"{count}" if count is not None else f"{fraction:.0%}"


class _PeerSelection(_Disruption):
    """A disruption that picks peers: ``count``, ``fraction`` of ``among``, or ``peers``."""

    count: NonNegativeInt | None = None
    fraction: float | None = Field(None, ge=0, le=1, description="share of the `among` pool")
    peers: list[NonNegativeInt] | None = Field(None, description="exactly these peers")
    among: Among = "all"

    @model_validator(mode="after")
    def _check_amount(self) -> _PeerSelection:
        _exactly_one(self, "count", "fraction", "peers")
        return self


class _TargetedSelection(_PeerSelection):
    """Peer selection that can also target the most connected or most central peers."""

    strategy: Literal["random", "degree", "betweenness"] = "random"


class Crash(_TargetedSelection):
    """Peers stop at once (device destroyed, power lost); neighbours notice on failed sends."""

    kind: Literal["crash"]

    def _describe(self) -> str:
        pool = "" if self.among == "all" else f" {self.among.replace('_', '-')}"
        how = "" if self.peers is not None or self.strategy == "random" else f" ({self.strategy})"
        return f"crash {_amount_text(self.count, self.fraction, self.peers)}{pool}{how}"


class DataLoss(_TargetedSelection):
    """Peers lose their training data (storage destroyed) but stay up and keep relaying.

    The counterpart of a crash for separating the two harms: a crash of data-holders
    loses their data *and* their links, a crash of relays only links, this only data.
    """

    kind: Literal["data_loss"]
    among: Among = "data_holders"

    def _describe(self) -> str:
        return f"{_amount_text(self.count, self.fraction, self.peers)} lose data"


class Recover(_Disruption):
    """The peers an earlier crash or region outage took out come back (and greet neighbours)."""

    kind: Literal["recover"]
    of: str | None = Field(None, description="name of the crash/region_outage; default the latest")

    def _describe(self) -> str:
        return f"recover {self.of}" if self.of else "recover"


class LinkFailure(_Disruption):
    """Links break; sends over them fail until a `heal`."""

    kind: Literal["link_failure"]
    count: NonNegativeInt | None = None
    fraction: float | None = Field(None, ge=0, le=1, description="share of all links")
    links: list[tuple[NonNegativeInt, NonNegativeInt]] | None = Field(
        None, description="exactly these"
    )
    strategy: Literal["random", "bridges_first"] = "random"

    @model_validator(mode="after")
    def _check_amount(self) -> LinkFailure:
        _exactly_one(self, "count", "fraction", "links")
        return self

    def _describe(self) -> str:
        how = "" if self.links is not None or self.strategy == "random" else f" ({self.strategy})"
        return f"cut {_amount_text(self.count, self.fraction, self.links)} links{how}"


class RegionOutage(_Disruption):
    """Every peer within ``radius`` of ``center`` goes dark (needs a geometric graph)."""

    kind: Literal["region_outage"]
    center: tuple[float, float]
    radius: float = Field(ge=0)

    def _describe(self) -> str:
        x, y = self.center
        return f"outage r={self.radius:g} at ({x:g}, {y:g})"


class Partition(_Disruption):
    """The network splits into ``parts`` groups: every link between groups fails."""

    kind: Literal["partition"]
    parts: int = Field(2, ge=2)
    method: Literal["spectral", "spatial", "random"] = "spectral"

    def _describe(self) -> str:
        return f"split in {self.parts}"


class Heal(_Disruption):
    """The links an earlier partition or link failure cut come back; their ends reconnect."""

    kind: Literal["heal"]
    of: str | None = Field(
        None, description="name of the partition/link_failure; default the latest"
    )

    def _describe(self) -> str:
        return f"heal {self.of}" if self.of else "heal"


class BatteryDrain(_Disruption):
    """Battery-powered peers: training, radio and idling drain them; empty means gone.

    Each chosen peer gets a :class:`topologies.Battery` whose capacity is
    ``capacity_j`` times a uniform draw in ``1 +- heterogeneity`` (devices differ). The
    battery starts draining when this disruption fires (default: time 0). Relay peers
    hold no data, so local training costs them nothing.
    """

    needs_trigger: ClassVar[bool] = False

    kind: Literal["battery"]
    capacity_j: float = Field(gt=0, description="full charge, joules")
    drain_per_step_j: float = Field(0.0, ge=0, description="per local SGD step")
    drain_per_byte_sent_j: float = Field(0.0, ge=0)
    drain_per_byte_received_j: float = Field(0.0, ge=0)
    idle_drain_per_s_j: float = Field(0.0, ge=0, description="per second of being on")
    heterogeneity: float = Field(0.0, ge=0, lt=1, description="capacity spread: 1 +- this")
    count: NonNegativeInt | None = None
    fraction: float | None = Field(
        None, ge=0, le=1, description="share of `among` on battery; default all"
    )
    among: Among = "all"

    @model_validator(mode="after")
    def _check_amount(self) -> BatteryDrain:
        if self.count is not None and self.fraction is not None:
            raise ValueError("give count or fraction, not both")
        return self

    def _describe(self) -> str:
        return "batteries"


class Churn(_Disruption):
    """Peers leave and rejoin: an explicit ``trace`` or one drawn from exponential sessions.

    Times in the trace are relative to when this disruption fires (default: time 0).
    A drawn trace churns ``count`` / ``fraction`` of the ``among`` pool (default all),
    with mean online session ``mean_session`` and mean downtime ``mean_downtime``,
    up to ``horizon`` seconds.
    """

    needs_trigger: ClassVar[bool] = False

    kind: Literal["churn"]
    trace: list[tuple[float, NonNegativeInt, Literal["leave", "join"]]] | None = Field(
        None, description="[[time, peer, 'leave'|'join'], ...]"
    )
    mean_session: float | None = Field(None, gt=0)
    mean_downtime: float | None = Field(None, gt=0)
    horizon: float | None = Field(None, gt=0)
    count: NonNegativeInt | None = None
    fraction: float | None = Field(None, ge=0, le=1)
    among: Among = "all"

    @model_validator(mode="after")
    def _check_source(self) -> Churn:
        drawn = ("mean_session", "mean_downtime", "horizon")
        if self.trace is not None:
            extra = [n for n in (*drawn, "count", "fraction") if getattr(self, n) is not None]
            if extra:
                raise ValueError(f"a churn trace cannot also have {', '.join(extra)}")
        elif any(getattr(self, n) is None for n in drawn):
            raise ValueError("give a trace, or mean_session, mean_downtime and horizon")
        if self.count is not None and self.fraction is not None:
            raise ValueError("give count or fraction, not both")
        return self

    def _describe(self) -> str:
        return "churn"


class Join(_PeerSelection):
    """Peers that are not there at the start and join late (they greet their neighbours)."""

    kind: Literal["join"]

    def _describe(self) -> str:
        return f"{_amount_text(self.count, self.fraction, self.peers)} join"


Disruption = Annotated[
    Crash
    | Recover
    | LinkFailure
    | RegionOutage
    | Partition
    | Heal
    | BatteryDrain
    | Churn
    | Join
    | DataLoss,
    Field(discriminator="kind"),
]
DISRUPTION_KINDS: tuple[str, ...] = (
    "crash",
    "recover",
    "link_failure",
    "region_outage",
    "partition",
    "heal",
    "battery",
    "churn",
    "join",
    "data_loss",
)

#: which kinds a ``recover`` / ``heal`` may undo
_UNDOES: dict[str, tuple[str, ...]] = {
    "recover": ("crash", "region_outage"),
    "heal": ("partition", "link_failure"),
}


def _undo_target(disruptions: Sequence[Any], index: int) -> int | None:
    """Index of the disruption that ``disruptions[index]`` (a recover or heal) undoes."""
    spec = disruptions[index]
    kinds = _UNDOES[spec.kind]
    for j in range(index - 1, -1, -1):
        other = disruptions[j]
        if other.kind in kinds and (spec.of is None or other.name == spec.of):
            return j
    return None


def _check_list(disruptions: list[Any]) -> list[Any]:
    names = Counter(d.name for d in disruptions if d.name is not None)
    twice = sorted(n for n, c in names.items() if c > 1)
    if twice:
        raise ValueError(f"disruption names must be unique: {', '.join(twice)}")
    for i, spec in enumerate(disruptions):
        if spec.kind in _UNDOES and _undo_target(disruptions, i) is None:
            what = " or ".join(_UNDOES[spec.kind])
            named = f" named {spec.of!r}" if spec.of else ""
            raise ValueError(f"disruptions.{i} ({spec.kind}) has no earlier {what}{named} to undo")
    return disruptions


DisruptionList = Annotated[list[Disruption], AfterValidator(_check_list)]
"""The type of ``Scenario.disruptions``: the union, plus cross-checks of names and ``of``."""


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
    if spec.kind not in _TOPOLOGY_KINDS:
        raise DisruptionError(
            f"--disrupt: only {', '.join(_TOPOLOGY_KINDS)} can be drawn, not {spec.kind}"
        )
    targets = choose_targets(spec, graph, seed=_seed(seed, 0))
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
        f"{spec.label}: {len(dead)} peers and {len(cut)} links lost; {row['components']} components "
        f"among {int(alive.sum())} peers left, largest {row['largest_component']}, "
        f"{row['isolated_peers']} isolated"
    )


# =============================================================================== choices


@dataclass(frozen=True, slots=True)
class Targets:
    """What an instantaneous disruption hits: peers going down, links failing."""

    peers: tuple[int, ...] = ()
    links: tuple[Edge, ...] = ()


def choose_targets(
    spec: Any,
    graph: nx.Graph,
    *,
    seed: int,
    alive: Collection[int] | None = None,
    relays: Collection[int] = (),
) -> Targets:
    """Pick the peers or links that ``spec`` (crash, region_outage, link_failure,
    partition) takes out of ``graph``, deterministically under ``seed``.

    ``alive`` (default: every peer) restricts crashes to peers still up, so "crash 8"
    really takes 8 more; a count larger than the pool left takes the whole pool.
    Rankings (degree, betweenness, bridges) are measured on the intact ``graph``.
    """
    alive_set = set(graph.nodes) if alive is None else set(alive)
    try:
        if spec.kind == "crash":
            if spec.peers is not None:
                _check_peers(spec.peers, graph, "peers")
                return Targets(peers=tuple(p for p in spec.peers if p in alive_set))
            pool = _pool(graph, spec.among, relays) & alive_set
            amount: int | float = (
                spec.fraction if spec.count is None else min(spec.count, len(pool))
            )
            chosen = select_peers(graph, amount, spec.strategy, seed=seed, candidates=pool)
            return Targets(peers=tuple(chosen))
        if spec.kind == "region_outage":
            inside = region_outage(graph, spec.center, spec.radius)
            return Targets(peers=tuple(sorted(inside & alive_set)))
        if spec.kind == "link_failure":
            if spec.links is not None:
                missing = [e for e in spec.links if not graph.has_edge(*e)]
                if missing:
                    raise DisruptionError(f"links not in the graph: {missing[:5]}")
                return Targets(links=tuple(_edge(u, v) for u, v in spec.links))
            amount = spec.fraction if spec.count is None else spec.count
            return Targets(
                links=tuple(select_links(graph, amount, seed=seed, strategy=spec.strategy))
            )
        if spec.kind == "partition":
            groups = partition_groups(graph, spec.parts, seed=seed, method=spec.method)
            return Targets(links=tuple(cut_edges(graph, groups)))
    except TopologyError as error:
        raise DisruptionError(str(error)) from None
    raise DisruptionError(f"{spec.kind} is not a one-off disruption of a graph")


def _pool(graph: nx.Graph, among: str, relays: Collection[int]) -> set[int]:
    if among == "relays":
        return set(relays)
    if among == "data_holders":
        return set(graph.nodes) - set(relays)
    return set(graph.nodes)


def _check_peers(peers: Iterable[int], graph: nx.Graph, key: str) -> None:
    missing = sorted(p for p in peers if p not in graph)
    if missing:
        raise DisruptionError(f"{key}: peers not in the graph: {missing[:10]}")


def _edge(u: int, v: int) -> Edge:
    return (u, v) if u <= v else (v, u)


def _seed(seed: int, index: int, stream: int = 0) -> int:
    """An independent seed per disruption (and per use within one).

    32 bits, because some networkx routines (the Fiedler vector) seed numpy's legacy
    ``RandomState``, which takes nothing larger.
    """
    return int(np.random.SeedSequence([seed, 0xD15A, index, stream]).generate_state(1)[0])


# =============================================================================== runtime


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


_TOPOLOGY_KINDS = ("crash", "region_outage", "link_failure", "partition")
_DRAW_LIMIT = 5000
"""Graphs with more peers are not drawn to PNG (a picture of them says little)."""


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
        self.seed = seed
        self.n = self.engine.n
        self.relays = {int(r) for r in simulation.relays}
        self.changes: list[Change] = []
        self.late_joiners: set[int] = set()
        #: the peers each join / battery / churn disruption (by index) applies to
        self.members: dict[int, list[int]] = {}
        self.depleted: set[int] = set()
        self.depleted_at: dict[int, float] = {}
        self.batteries: dict[int, Battery] = {}
        self.snapshot: _Snapshot | None = None
        self._down_for: dict[int, set[str]] = defaultdict(set)
        self._link_holds: Counter[Edge] = Counter()
        self._taken: dict[int, tuple[int, ...]] = {}
        self._cut: dict[int, tuple[Edge, ...]] = {}
        self._by_round: dict[int, list[int]] = defaultdict(list)
        self._battery_since: dict[int, float] = {}
        self._battery_check: dict[int, int] = defaultdict(int)
        self._has_data = simulation.data_sizes > 0

    # -- set-up ----------------------------------------------------------------------
    def install(self) -> None:
        """Validate against the graph, withhold late joiners, and schedule every firing."""
        for index, spec in enumerate(self.specs):
            self._prepare(index, spec)
        for index, spec in enumerate(self.specs):
            if spec.at_round is not None and spec.at_round > 0:
                self._by_round[spec.at_round].append(index)
            else:
                at = spec.at_time if spec.at_time is not None else 0.0
                self.engine.schedule(at, self._firing(index))
        if self._by_round:
            self.engine.on_progress(self._on_progress)
        if any(spec.kind == "battery" for spec in self.specs):
            self.engine.on_handled(self._on_handled)

    def _prepare(self, index: int, spec: Any) -> None:
        """Checks that need the graph, made before the run so errors come at once."""
        where = f"disruptions.{index} ({spec.kind})"
        try:
            if spec.kind in ("region_outage", "partition") and (
                spec.kind == "region_outage" or spec.method == "spatial"
            ):
                if len(nx.get_node_attributes(self.graph, "pos")) != self.n:
                    raise DisruptionError("needs a geometric graph (peers with positions)")
            if spec.kind in ("crash", "join", "data_loss") and spec.peers is not None:
                _check_peers(spec.peers, self.graph, "peers")
            if (
                spec.kind in ("crash", "join", "battery", "churn", "data_loss")
                and spec.count is not None
            ):
                pool = _pool(self.graph, spec.among, self.relays)
                if spec.count > len(pool):
                    raise DisruptionError(
                        f"count={spec.count} but only {len(pool)} peers among {spec.among}"
                    )
            if spec.kind == "link_failure" and spec.links is not None:
                choose_targets(spec, self.graph, seed=0)
            if spec.kind == "churn" and spec.trace is not None:
                _check_peers([peer for _, peer, _ in spec.trace], self.graph, "trace")
            if spec.kind == "join":
                joiners = self._members(index, spec)
                for peer in joiners:
                    self._down_for[peer].add(f"join:{index}")
                    self.engine.crash(peer)  # not there yet: sends to it fail
                self.late_joiners.update(joiners)
                self._taken[index] = tuple(joiners)
        except DisruptionError as error:
            raise DisruptionError(f"{where}: {error}") from None

    def _members(self, index: int, spec: Any) -> list[int]:
        """The peers a join/battery/churn/data_loss applies to: explicit, or drawn (seeded)."""
        if getattr(spec, "peers", None) is not None:
            members = sorted(set(spec.peers))
        else:
            pool = _pool(self.graph, spec.among, self.relays)
            if spec.count is None and spec.fraction is None:
                members = sorted(pool)
            else:
                # a count larger than what is left of the pool (an earlier data_loss
                # shrank it) takes the whole pool
                amount = min(spec.count, len(pool)) if spec.count is not None else spec.fraction
                seed = _seed(self.seed, index, 1)
                strategy: PeerStrategy = getattr(spec, "strategy", "random")
                members = sorted(
                    select_peers(self.graph, amount, strategy, seed=seed, candidates=pool)
                )
        self.members[index] = members
        return members

    # -- firing ----------------------------------------------------------------------
    def _on_progress(self, progress: int) -> None:
        for round_ in sorted(r for r in self._by_round if r <= progress):
            for index in self._by_round.pop(round_):
                self._fire(index)

    def _firing(self, index: int) -> Callable[[float], None]:
        """An engine action that fires disruption ``index``."""
        return lambda now: self._fire(index)

    def _fire(self, index: int) -> None:
        spec = self.specs[index]
        engine = self.engine
        round_ = (
            spec.at_round if spec.at_round is not None else min(engine.progress(), engine.rounds)
        )
        before = (self._dead(), set(self.network.failed_links))
        down: list[int] = []
        up: list[int] = []
        cut: list[Edge] = []
        restored: list[Edge] = []
        lost_data: list[int] = []
        reason = f"{spec.kind}:{index}"
        if spec.kind in _TOPOLOGY_KINDS:
            alive = [int(p) for p in np.flatnonzero(engine.alive)]
            targets = choose_targets(
                spec, self.graph, seed=_seed(self.seed, index), alive=alive, relays=self.relays
            )
            down = [p for p in targets.peers if self._take_down(p, reason)]
            cut = [e for e in targets.links if self._cut_link(e)]
            self._taken[index] = tuple(targets.peers)
            self._cut[index] = targets.links
        elif spec.kind in ("recover", "heal"):
            target = _undo_target(self.specs, index)
            assert target is not None  # checked when the scenario was validated
            undo = f"{self.specs[target].kind}:{target}"
            up = [p for p in self._taken.pop(target, ()) if self._bring_up(p, undo)]
            restored = [e for e in self._cut.pop(target, ()) if self._restore_link(e)]
        elif spec.kind == "join":
            up = [p for p in self._taken.pop(index, ()) if self._bring_up(p, reason)]
        elif spec.kind == "data_loss":
            lost_data = self._members(index, spec)
            self._lose_data(lost_data)
        elif spec.kind == "battery":
            self._start_batteries(index, spec)
        elif spec.kind == "churn":
            self._start_churn(index, spec)
        change = Change(
            index, spec.label, spec.kind, float(engine.now), int(round_),
            tuple(down), tuple(up), tuple(cut), tuple(restored), tuple(lost_data),
        )  # fmt: skip
        self.changes.append(change)
        self.simulation.events.append((round_, spec.label))
        if self.snapshot is None and spec.kind in _TOPOLOGY_KINDS:
            self.snapshot = _Snapshot(
                spec.label, *before, self._dead(), set(self.network.failed_links)
            )

    def _dead(self) -> set[int]:
        return {int(p) for p in np.flatnonzero(~self.engine.alive)}

    # -- peers and links ---------------------------------------------------------------
    def _take_down(self, peer: int, reason: str) -> bool:
        """Add a reason for ``peer`` to be down; crash it if it was up. True if it went down."""
        self._down_for[peer].add(reason)
        if not self.engine.alive[peer]:
            return False
        if peer in self.batteries:
            self._drain(peer)  # the idle drain until now
            self._battery_since.pop(peer, None)
        self.engine.crash(peer)
        return True

    def _bring_up(self, peer: int, reason: str) -> bool:
        """Lift one reason; the peer restarts (and greets) once none is left."""
        reasons = self._down_for[peer]
        reasons.discard(reason)
        if reasons or self.engine.alive[peer] or peer in self.depleted:
            return False
        self.engine.recover(peer)
        if peer in self.batteries:
            self._battery_since[peer] = self.engine.now
            self._arm(peer)
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

    def _cut_link(self, link: Edge) -> bool:
        self._link_holds[link] += 1
        if self._link_holds[link] > 1:
            return False
        self.network.fail_link(*link)
        return True

    def _restore_link(self, link: Edge) -> bool:
        self._link_holds[link] -= 1
        if self._link_holds[link] > 0:
            return False
        del self._link_holds[link]
        self.network.restore_link(*link)
        u, v = link
        if self.engine.alive[u] and self.engine.alive[v]:
            self._connect(u, v)
        return True

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

    def _lose_data(self, peers: Iterable[int]) -> None:
        """The peers keep their model and links but have nothing left to train on."""
        executor = self.engine.executor
        for peer in peers:
            executor.samplers[peer] = None
            self.simulation.data_sizes[peer] = 0
            self._has_data[peer] = False
            self.relays.add(peer)  # from now on it only relays

    # -- battery -------------------------------------------------------------------------
    def _start_batteries(self, index: int, spec: BatteryDrain) -> None:
        members = self._members(index, spec)
        rng = np.random.default_rng(_seed(self.seed, index, 2))
        spread = rng.uniform(1 - spec.heterogeneity, 1 + spec.heterogeneity, size=len(members))
        for peer, scale in zip(members, spread, strict=True):
            self.batteries[peer] = Battery(
                capacity_j=spec.capacity_j * float(scale),
                drain_per_step_j=spec.drain_per_step_j,
                drain_per_byte_sent_j=spec.drain_per_byte_sent_j,
                drain_per_byte_received_j=spec.drain_per_byte_received_j,
                idle_drain_per_s_j=spec.idle_drain_per_s_j,
            )
            if self.engine.alive[peer]:
                self._battery_since[peer] = self.engine.now
                self._arm(peer)

    def _on_handled(self, peer: int, event: Event, effects: list[Effect] | None) -> None:
        if peer not in self._battery_since:
            return
        steps = sent = 0
        for effect in effects or ():
            if isinstance(effect, Train) and self._has_data[peer]:
                steps += effect.steps
            elif isinstance(effect, Send):
                sent += effect.message.nbytes()
        received = event.message.nbytes() if isinstance(event, MessageReceived) else 0
        if steps or sent or received:
            self._drain(peer, steps=steps, bytes_sent=sent, bytes_received=received)

    def _drain(
        self, peer: int, *, steps: int = 0, bytes_sent: int = 0, bytes_received: int = 0
    ) -> None:
        """Draw the idle time since the last draw plus this work; crash the peer if empty."""
        since = self._battery_since.get(peer)
        if since is None:
            return
        battery = self.batteries[peer]
        now = self.engine.now
        battery.consume(
            steps=steps, bytes_sent=bytes_sent, bytes_received=bytes_received, seconds=now - since
        )
        self._battery_since[peer] = now
        if battery.depleted:
            del self._battery_since[peer]
            self.depleted.add(peer)
            self.depleted_at[peer] = float(now)
            if self.engine.alive[peer]:
                self._down_for[peer].add("battery")
                self.engine.crash(peer)
            if len(self.depleted) == 1:
                self.simulation.events.append(
                    (min(self.engine.progress(), self.engine.rounds), "first battery empty")
                )
        else:
            self._arm(peer)

    def _arm(self, peer: int) -> None:
        """Schedule the moment idling alone would empty the battery (re-armed on every draw)."""
        battery = self.batteries[peer]
        if battery.idle_drain_per_s_j <= 0:
            return
        self._battery_check[peer] += 1
        ticket = self._battery_check[peer]
        at = self.engine.now + battery.charge / battery.idle_drain_per_s_j

        def check(now: float) -> None:
            if self._battery_check[peer] == ticket:
                self._drain(peer)

        self.engine.schedule(at, check)

    # -- churn ---------------------------------------------------------------------------
    def _start_churn(self, index: int, spec: Churn) -> None:
        start = self.engine.now
        if spec.trace is not None:
            events = sorted((float(t), int(p), kind) for t, p, kind in spec.trace)
        else:
            members = self._members(index, spec)
            assert spec.horizon and spec.mean_session and spec.mean_downtime
            events = [
                (e.time, e.peer, e.kind)
                for e in churn_trace(
                    self.n, seed=_seed(self.seed, index, 3), horizon=spec.horizon,
                    mean_session=spec.mean_session, mean_downtime=spec.mean_downtime, peers=members,
                )
            ]  # fmt: skip
        reason = f"churn:{index}"
        for time, peer, kind in events:
            change = self._take_down if kind == "leave" else self._bring_up
            self.engine.schedule(start + time, _at_time(change, peer, reason))

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
    ask for connectivity metrics. Raises :class:`sim.scenario.ScenarioError` when a
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
        from sim.scenario import ScenarioError

        raise ScenarioError(str(error)) from None
    return runtime


def _at_time(change: Callable[[int, str], bool], peer: int, reason: str) -> Callable[[float], None]:
    """An engine action that applies ``change(peer, reason)`` (a churn event)."""

    def action(now: float) -> None:
        change(peer, reason)

    return action
