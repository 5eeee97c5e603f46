"""The simulator's in-memory network: who can reach whom, how fast, and what is lost.

Each peer has one uplink of ``bandwidth`` bytes/s; messages it sends queue on it one after
another (serialisation delay), then travel with the link's latency. Latency is fixed per
link, with an optional deterministic jitter, so runs with one seed are identical.

Conditions can differ by place: a peer's own uplink rate and access (last-mile) latency
and loss (:meth:`Network.set_peer`: a region of slow or badly connected devices; access
latency adds to every message to or from the peer, access loss compounds with the link's),
and a link's latency, loss and rate cap (:meth:`Network.set_link`: a long or lossy radio
link; a link's rate caps what its sender's uplink gives it). They
can change during a run (gradual degradation, :mod:`sim.disruptions`); a message already on
its way keeps the conditions it left with. With none set, a message costs what it did
before they existed: one dictionary test.

In ``graph`` mode only topology edges carry traffic (a disaster that removes a link
removes that path); in ``overlay`` mode any peer reaches any other, as over the internet,
and topology edges only describe who knows whom.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import networkx as nx
import numpy as np


@dataclass(slots=True)  # not frozen: made for every message (see protocols.base)
class Delivery:
    """Outcome of handing a message to the network."""

    #: when the receiver gets it; ``None`` if it never arrives
    arrival: float | None
    #: the message had no route at all (dead link / not neighbours in graph mode)
    unroutable: bool = False


class Network:
    def __init__(
        self,
        graph: nx.Graph,
        *,
        latency: float,
        bandwidth: float,
        loss: float = 0.0,
        latency_jitter: float = 0.0,
        mode: str = "graph",
        seed: int = 0,
    ) -> None:
        if mode not in ("graph", "overlay"):
            raise ValueError(f"network mode must be 'graph' or 'overlay', got {mode!r}")
        self.n = graph.number_of_nodes()
        self.latency = latency
        self.bandwidth = bandwidth
        self.loss = loss
        self.jitter = latency_jitter
        self.mode = mode
        self.seed = seed
        self.links: set[tuple[int, int]] = {_key(u, v) for u, v in graph.edges()}
        self.failed_links: set[tuple[int, int]] = set()
        # A list, not an array: read and written once per message, and numpy scalars would
        # make every event time downstream an np.float64 (slower to add, compare and hash).
        self.uplink_free_at: list[float] = [0.0] * self.n
        self._loss_rng = np.random.default_rng([seed, 0x1055])
        self._latency_cache: dict[tuple[int, int], float] = {}
        #: per-link (latency, loss, rate cap) where set; None: the defaults
        self._link_conditions: dict[tuple[int, int], LinkConditions] = {}
        #: per-peer uplink rate where set (bytes/s)
        self._uplink: dict[int, float] = {}
        #: per-peer access (latency added, loss) where set
        self._access: dict[int, tuple[float, float]] = {}
        self._custom = False  # any of the three above set: the slower path of transmit

    # -- conditions by place (regions, links) ------------------------------------------
    def set_peer(
        self,
        peer: int,
        *,
        bandwidth: float | None = None,
        latency: float | None = None,
        loss: float | None = None,
    ) -> None:
        """``peer``'s uplink rate (bytes/s) and access latency and loss; ``None`` keeps it."""
        if bandwidth is not None:
            if not bandwidth > 0:
                raise ValueError(f"peer {peer}: uplink bandwidth must be > 0, got {bandwidth!r}")
            self._uplink[peer] = float(bandwidth)
        if latency is not None or loss is not None:
            old_latency, old_loss = self._access.get(peer, (0.0, 0.0))
            new = (
                old_latency if latency is None else float(latency),
                old_loss if loss is None else float(loss),
            )
            if new[0] < 0 or not 0 <= new[1] < 1:
                raise ValueError(f"peer {peer}: latency must be >= 0 and loss in [0, 1), got {new}")
            self._access[peer] = new
        self._custom = True

    def uplink(self, peer: int) -> float:
        return self._uplink.get(peer, self.bandwidth)

    def set_link(
        self,
        u: int,
        v: int,
        *,
        latency: float | None = None,
        loss: float | None = None,
        bandwidth: float | None = None,
    ) -> None:
        """The link ``u``-``v`` (both ways) gets these conditions; ``None`` keeps the current."""
        key = _key(u, v)
        current = self._link_conditions.get(key) or LinkConditions(
            self.link_latency(u, v), self.loss, None
        )
        updated = LinkConditions(
            current.latency if latency is None else float(latency),
            current.loss if loss is None else float(loss),
            current.bandwidth if bandwidth is None else float(bandwidth),
        )
        if updated.latency < 0 or not 0 <= updated.loss < 1:
            raise ValueError(f"link {key}: latency must be >= 0 and loss in [0, 1), got {updated}")
        if updated.bandwidth is not None and not updated.bandwidth > 0:
            raise ValueError(f"link {key}: bandwidth must be > 0, got {updated.bandwidth!r}")
        self._link_conditions[key] = updated
        self._custom = True

    def link_conditions(self, u: int, v: int) -> LinkConditions:
        """What the link ``u``-``v`` is like now (latency, loss, rate cap or None)."""
        found = self._link_conditions.get(_key(u, v))
        return found if found is not None else LinkConditions(self.link_latency(u, v), self.loss, None)

    # -- topology changes (disruptions) ---------------------------------------------
    def fail_link(self, u: int, v: int) -> None:
        self.failed_links.add(_key(u, v))

    def restore_link(self, u: int, v: int) -> None:
        self.failed_links.discard(_key(u, v))

    def add_link(self, u: int, v: int) -> None:
        self.links.add(_key(u, v))

    def has_route(self, u: int, v: int) -> bool:
        key = _key(u, v)
        if key in self.failed_links:
            return False
        return self.mode == "overlay" or key in self.links

    # -- transmission ------------------------------------------------------------------
    def link_latency(self, u: int, v: int) -> float:
        """The latency the link was built with (see :meth:`link_conditions` for now's)."""
        if self.jitter == 0.0:
            return self.latency
        key = _key(u, v)
        cached = self._latency_cache.get(key)
        if cached is None:
            digest = hashlib.blake2b(f"{self.seed}:{key[0]}:{key[1]}".encode(), digest_size=8)
            unit = int.from_bytes(digest.digest(), "little") / 2**64
            cached = self.latency * (1.0 + self.jitter * (2.0 * unit - 1.0))
            self._latency_cache[key] = cached
        return cached

    def transmit(self, now: float, sender: int, receiver: int, nbytes: int) -> Delivery:
        """Queue ``nbytes`` on the sender's uplink; say when (if ever) it arrives."""
        # ``has_route``, inlined: this runs for every message (40,000 a round at 10,000 peers)
        key = (sender, receiver) if sender <= receiver else (receiver, sender)
        if key in self.failed_links or (self.mode != "overlay" and key not in self.links):
            return Delivery(None, unroutable=True)
        if self._custom:
            return self._transmit_with_conditions(now, sender, receiver, key, nbytes)
        start = max(now, self.uplink_free_at[sender])
        done_sending = start + nbytes / self.bandwidth
        self.uplink_free_at[sender] = done_sending
        if self.loss > 0.0 and self._loss_rng.random() < self.loss:
            return Delivery(None)
        return Delivery(done_sending + self.link_latency(sender, receiver))


    def _transmit_with_conditions(
        self, now: float, sender: int, receiver: int, key: tuple[int, int], nbytes: int
    ) -> Delivery:
        link = self._link_conditions.get(key)
        rate = self._uplink.get(sender, self.bandwidth)
        if link is not None and link.bandwidth is not None:
            rate = min(rate, link.bandwidth)
        start = max(now, self.uplink_free_at[sender])
        done_sending = start + nbytes / rate
        self.uplink_free_at[sender] = done_sending
        loss = self.loss if link is None else link.loss
        latency = self.link_latency(sender, receiver) if link is None else link.latency
        access = self._access
        if access:
            for end in (sender, receiver):
                extra = access.get(end)
                if extra is not None:
                    latency += extra[0]
                    loss = 1.0 - (1.0 - loss) * (1.0 - extra[1])
        if loss > 0.0 and self._loss_rng.random() < loss:
            return Delivery(None)
        return Delivery(done_sending + latency)


@dataclass(frozen=True, slots=True)
class LinkConditions:
    """A link's one-way latency (s), loss probability and rate cap (bytes/s, None: none)."""

    latency: float
    loss: float
    bandwidth: float | None


def _key(u: int, v: int) -> tuple[int, int]:
    return (u, v) if u <= v else (v, u)
