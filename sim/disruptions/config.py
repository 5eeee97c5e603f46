"""The ``[[disruptions]]`` tables of a scenario: configuration classes only.

Each table is validated here (pydantic, a discriminated union on ``kind``, unknown keys
rejected), so a mistake is one line naming the key. This module holds no behaviour and
imports nothing of the simulator: :mod:`sim.scenario` imports it, and how each kind picks
its targets and fires lives in :mod:`sim.disruptions.kinds` (runtime modules import
configurations, never the reverse).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, NonNegativeInt, model_validator

from p2pfl.config import Strict

__all__ = [
    "DISRUPTION_KINDS",
    "Among",
    "BatteryDrain",
    "Churn",
    "Crash",
    "DataLoss",
    "Degrade",
    "Disruption",
    "DisruptionList",
    "Edge",
    "Heal",
    "Join",
    "LinkFailure",
    "Mobility",
    "Partition",
    "Recover",
    "RegionOutage",
    "undo_target",
]

Edge = tuple[int, int]
Among = Literal["all", "data_holders", "relays"]


class _Disruption(Strict):
    """Fields every disruption has: when it fires and what it is called."""

    #: whether the disruption must say when it fires (battery and churn start at time 0)
    needs_trigger: ClassVar[bool] = True
    #: the kinds an undoing disruption (recover, heal) may undo; () for the others
    undoes: ClassVar[tuple[str, ...]] = ()

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
    recompute: bool = Field(
        False,
        description="rank on the graph left by earlier losses, re-ranking after each pick "
        "(needs strategy degree or betweenness)",
    )

    @model_validator(mode="after")
    def _check_recompute(self) -> Crash:
        if self.recompute and (self.peers is not None or self.strategy == "random"):
            raise ValueError(
                "recompute needs strategy = 'degree' or 'betweenness' (and no explicit peers)"
            )
        return self

    def _describe(self) -> str:
        pool = "" if self.among == "all" else f" {self.among.replace('_', '-')}"
        again = ", recomputed" if self.recompute else ""
        how = (
            ""
            if self.peers is not None or self.strategy == "random"
            else f" ({self.strategy}{again})"
        )
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

    undoes: ClassVar[tuple[str, ...]] = ("crash", "region_outage")

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


class Degrade(_Disruption):
    """Links get worse step by step: over ``over_rounds`` rounds from when it fires, their
    loss rises linearly to ``loss``, their latency to ``latency_factor`` times what it was
    and their rate to ``bandwidth_factor`` times their sender's uplink (a storm, a failing
    relay tower, batteries of radio repeaters running down). Which links: those touching
    ``peers``, a ``fraction`` of all links (drawn with the seed), or every link."""

    kind: Literal["degrade"]
    peers: list[NonNegativeInt] | None = None
    fraction: float | None = Field(None, gt=0, le=1, description="share of all links")
    over_rounds: int = Field(1, ge=1, description="rounds from the first step to the last")
    loss: float | None = Field(None, ge=0, lt=1, description="loss at the end")
    latency_factor: float | None = Field(None, ge=1, description="latency x this at the end")
    bandwidth_factor: float | None = Field(None, gt=0, le=1, description="rate x this at the end")

    @model_validator(mode="after")
    def _check_amount(self) -> Degrade:
        if self.peers is not None and self.fraction is not None:
            raise ValueError("give peers or fraction (or neither: every link), not both")
        if self.loss is None and self.latency_factor is None and self.bandwidth_factor is None:
            raise ValueError("give at least one of loss, latency_factor, bandwidth_factor")
        return self

    def _describe(self) -> str:
        which = (
            f"links of {len(self.peers)} peers" if self.peers is not None
            else f"{self.fraction:.0%} of links" if self.fraction is not None
            else "all links"
        )  # fmt: skip
        return f"degrade {which} over {self.over_rounds} rounds"


class Mobility(_Disruption):
    """Peers move on the geometric map (random waypoint: straight to a point drawn
    uniformly in the unit square at ``speed`` map units per round, then the next); a link
    of the topology is up only while its two ends are within ``radius`` of each other.

    The topology says who knows whom (build it with a radius at least this one: a
    geometric graph of ``topology.params.radius``); mobility says when they are in radio
    range. Peers never learn of strangers they pass. Moves happen once per round, from
    when it fires until ``until_round`` (or the end); links it cut come back when in range."""

    kind: Literal["mobility"]
    speed: float = Field(gt=0, description="map units per round")
    radius: float = Field(gt=0, description="radio range, map units")
    fraction: float = Field(1.0, gt=0, le=1, description="share of the peers that move")
    until_round: NonNegativeInt | None = None

    def _describe(self) -> str:
        return f"mobility speed {self.speed:g} range {self.radius:g}"


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

    undoes: ClassVar[tuple[str, ...]] = ("partition", "link_failure")

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
    | DataLoss
    | Degrade
    | Mobility,
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
    "degrade",
    "mobility",
)


def undo_target(disruptions: Sequence[Any], index: int) -> int | None:
    """Index of the disruption that ``disruptions[index]`` (a recover or heal) undoes."""
    spec = disruptions[index]
    for j in range(index - 1, -1, -1):
        other = disruptions[j]
        if other.kind in spec.undoes and (spec.of is None or other.name == spec.of):
            return j
    return None


def _check_list(disruptions: list[Any]) -> list[Any]:
    names = Counter(d.name for d in disruptions if d.name is not None)
    twice = sorted(n for n, c in names.items() if c > 1)
    if twice:
        raise ValueError(f"disruption names must be unique: {', '.join(twice)}")
    for i, spec in enumerate(disruptions):
        if spec.undoes and undo_target(disruptions, i) is None:
            what = " or ".join(spec.undoes)
            named = f" named {spec.of!r}" if spec.of else ""
            raise ValueError(f"disruptions.{i} ({spec.kind}) has no earlier {what}{named} to undo")
    return disruptions


DisruptionList = Annotated[list[Disruption], AfterValidator(_check_list)]
"""The type of ``Scenario.disruptions``: the union, plus cross-checks of names and ``of``."""
