"""The simulator's in-memory network: who can reach whom, how fast, and what is lost.

Each peer has one uplink of ``bandwidth`` bytes/s; messages it sends queue on it one after
another (serialisation delay), then travel with the link's latency. Latency is fixed per
link, with an optional deterministic jitter, so runs with one seed are identical.

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
        start = max(now, self.uplink_free_at[sender])
        done_sending = start + nbytes / self.bandwidth
        self.uplink_free_at[sender] = done_sending
        if self.loss > 0.0 and self._loss_rng.random() < self.loss:
            return Delivery(None)
        return Delivery(done_sending + self.link_latency(sender, receiver))


def _key(u: int, v: int) -> tuple[int, int]:
    return (u, v) if u <= v else (v, u)
