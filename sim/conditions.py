"""Network conditions by place: regions of peers and single links that differ from the default.

A disaster rarely degrades a network evenly: a rural area sits behind a slow, lossy
satellite uplink, a flooded district keeps a few long radio links. The scenario's
``[network]`` table gives the defaults (one latency, bandwidth and loss for all); these
tables give the exceptions:

```toml
[[network.regions]]              # peers by list, by share, or by place on a geometric map
name = "rural"
center = [0.8, 0.2]              # or peers = [3, 4, 5], or fraction = 0.25
radius = 0.3
bandwidth = 1.25e5               # uplink bytes/s of its peers (default: network.bandwidth)
latency = 0.3                    # access latency added to every message to or from them
loss = 0.05                      # access loss: compounds with the link's own

[[network.links]]                # one link, both ways
between = [3, 7]
latency = 0.5                    # replaces the link's latency
loss = 0.2                       # replaces the link's loss
bandwidth = 6.25e4               # caps the sender's uplink on this link
```

A peer in two regions gets the later region's values for the keys it sets. Region
membership is fixed when the run is built (a ``fraction`` is drawn with the scenario's
seed). How they are applied: :meth:`sim.network.Network.set_peer` and ``set_link``.
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np
from pydantic import Field, model_validator

from p2pfl.config import Strict

__all__ = ["LinkOverride", "RegionConditions", "apply_conditions", "region_members"]


class RegionConditions(Strict):
    """Peers whose uplink and access differ from ``[network]``'s defaults."""

    name: str | None = Field(None, min_length=1)
    peers: list[int] | None = None
    fraction: float | None = Field(None, gt=0, le=1)
    center: tuple[float, float] | None = None
    radius: float | None = Field(None, ge=0)
    bandwidth: float | None = Field(None, gt=0, description="uplink bytes/s of its peers")
    latency: float | None = Field(None, ge=0, description="access latency added, seconds")
    loss: float | None = Field(None, ge=0, lt=1, description="access loss probability")

    @model_validator(mode="after")
    def _check(self) -> RegionConditions:
        ways = [self.peers is not None, self.fraction is not None, self.center is not None]
        if sum(ways) != 1:
            raise ValueError("a region needs exactly one of peers, fraction, or center + radius")
        if (self.center is None) != (self.radius is None):
            raise ValueError("center and radius go together")
        if self.bandwidth is None and self.latency is None and self.loss is None:
            raise ValueError("a region must set at least one of bandwidth, latency, loss")
        return self


class LinkOverride(Strict):
    """One link whose latency, loss or rate differs from the defaults."""

    between: tuple[int, int]
    latency: float | None = Field(None, ge=0)
    loss: float | None = Field(None, ge=0, lt=1)
    bandwidth: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LinkOverride:
        if self.between[0] == self.between[1]:
            raise ValueError(f"between: a link joins two different peers, got {list(self.between)}")
        if self.bandwidth is None and self.latency is None and self.loss is None:
            raise ValueError("a link override must set at least one of latency, loss, bandwidth")
        return self


def region_members(region: RegionConditions, graph: nx.Graph, seed: int, index: int) -> list[int]:
    """The peers of ``region`` (the ``index``-th table) in ``graph``, sorted."""
    n = graph.number_of_nodes()
    where = f"network.regions.{index}"
    if region.peers is not None:
        bad = [p for p in region.peers if not 0 <= p < n]
        if bad:
            raise ValueError(f"{where}.peers: {bad} are not peers of a {n}-peer topology")
        return sorted(set(region.peers))
    if region.fraction is not None:
        rng = np.random.default_rng([seed, 0xC0D1, index])
        count = max(1, round(region.fraction * n))
        return sorted(int(p) for p in rng.choice(n, size=min(count, n), replace=False))
    assert region.center is not None and region.radius is not None
    positions = nx.get_node_attributes(graph, "pos")
    if len(positions) != n:
        raise ValueError(f"{where}: center + radius needs a geometric topology (peers with positions)")
    cx, cy = region.center
    return sorted(
        int(p) for p, (x, y) in positions.items() if math.hypot(x - cx, y - cy) <= region.radius
    )


def apply_conditions(
    network: Any, graph: nx.Graph, regions: list[RegionConditions], links: list[LinkOverride], seed: int
) -> dict[str, list[int]]:
    """Set the regions' and links' conditions on ``network``; the members of each region."""
    members: dict[str, list[int]] = {}
    for index, region in enumerate(regions):
        peers = region_members(region, graph, seed, index)
        members[region.name or f"region {index}"] = peers
        for peer in peers:
            network.set_peer(peer, bandwidth=region.bandwidth, latency=region.latency, loss=region.loss)
    n = graph.number_of_nodes()
    for index, link in enumerate(links):
        u, v = link.between
        if not (0 <= u < n and 0 <= v < n):
            raise ValueError(f"network.links.{index}.between: {[u, v]} are not peers of a {n}-peer topology")
        network.set_link(u, v, latency=link.latency, loss=link.loss, bandwidth=link.bandwidth)
    return members
