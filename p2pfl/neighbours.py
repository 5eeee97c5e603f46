"""Whom a real node exchanges models with: every peer, k random peers, or a peer graph file.

A node learns of peers through bootstrap, peer exchange and (optionally) mDNS; the
*neighbour policy* decides which of them the protocol talks to:

- no policy (``network.max_neighbours = 0``): every discovered peer;
- ``network.max_neighbours = k``: a ring lattice over the discovered peers and the node
  itself, ordered by ``hash(seed, peer id)``: the ``k // 2`` peers after it and the
  ``k // 2`` before it on the ring (plus the opposite peer for an odd ``k`` on an even
  ring). Every node that knows the same set of peers derives the same graph, so the
  relation is symmetric -- D-PSGD waits for every neighbour, and a one-way neighbour
  times out every round -- ``k``-regular and connected. Peers whose known sets differ
  may still disagree; the node settles that at run time (``p2pfl.node``, ``unlink``);
- ``network.topology_file``: an explicit graph naming peer ids, shared by every peer.
  A node's neighbours are its graph neighbours, and D-PSGD mixes with weights that
  every peer computes identically from the file's degrees (Metropolis-Hastings,
  ``1 / (max(deg_i, deg_j) + 1)``, own weight ``1 - sum``), so the mixing matrix is
  symmetric and doubly stochastic exactly as in the simulator.

The file is an edge list like the simulator's (``topologies.read_graph``), with peer ids
for node names: one edge ``<peer id> <peer id>`` per line, whitespace, comma or
semicolon separated (further columns are ignored), a line with one peer id declares a
peer without edges, ``#`` starts a comment. Direction, duplicate edges and self-loops
are dropped. This module reads it without networkx: a node needs no graph library.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from p2pfl.config import ConfigError
from topologies.weights import metropolis_hastings_weight

__all__ = ["PeerGraph", "TopologyFileError", "check_member", "choose_neighbours"]

_SEPARATORS = re.compile(r"[\s,;]+")


class TopologyFileError(ConfigError):
    """A topology file that cannot be used; the message names the file and the problem."""


class PeerGraph:
    """An undirected simple graph whose nodes are peer ids."""

    def __init__(self, edges: Iterable[tuple[str, str]] = (), peers: Iterable[str] = ()) -> None:
        self._adjacent: dict[str, set[str]] = {peer: set() for peer in peers}
        for a, b in edges:
            self._adjacent.setdefault(a, set())
            self._adjacent.setdefault(b, set())
            if a != b:
                self._adjacent[a].add(b)
                self._adjacent[b].add(a)

    @classmethod
    def parse(cls, text: str) -> PeerGraph:
        edges: list[tuple[str, str]] = []
        peers: list[str] = []
        for line in text.splitlines():
            tokens = [t for t in _SEPARATORS.split(line.split("#", 1)[0]) if t]
            if len(tokens) == 1:
                peers.append(tokens[0])
            elif len(tokens) >= 2:
                edges.append((tokens[0], tokens[1]))
        return cls(edges, peers)

    @classmethod
    def from_file(cls, path: str | Path) -> PeerGraph:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TopologyFileError(f"topology file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise TopologyFileError(f"cannot read topology file {path}: {error}") from None
        graph = cls.parse(text)
        if not graph._adjacent:
            raise TopologyFileError(f"topology file {path} names no peers")
        return graph

    def write(self, path: str | Path) -> None:
        """Write the graph as an edge list :meth:`from_file` reads back."""
        lines = [f"{a} {b}" for a, b in self.edges()]
        lines += [peer for peer in self.peers() if not self._adjacent[peer]]
        Path(path).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

    def __contains__(self, peer: object) -> bool:
        return peer in self._adjacent

    def __len__(self) -> int:
        return len(self._adjacent)

    def peers(self) -> list[str]:
        return sorted(self._adjacent)

    def edges(self) -> list[tuple[str, str]]:
        return sorted((a, b) for a, near in self._adjacent.items() for b in near if a < b)

    def neighbours(self, peer: str) -> list[str]:
        return sorted(self._adjacent[peer])

    def degree(self, peer: str) -> int:
        return len(self._adjacent[peer])

    def metropolis_hastings(self, peer: str) -> dict[str, float]:
        """``peer``'s row of the Metropolis-Hastings matrix, without its own weight."""
        deg = self.degree(peer)
        return {j: metropolis_hastings_weight(deg, self.degree(j)) for j in self.neighbours(peer)}

    def uniform(self, peer: str) -> dict[str, float]:
        """``1 / (deg + 1)`` for every neighbour (row-stochastic only)."""
        share = 1.0 / (self.degree(peer) + 1.0)
        return {j: share for j in self.neighbours(peer)}

    def mixing_weights(self, peer: str, scheme: str) -> dict[str, float]:
        if scheme == "metropolis_hastings":
            return self.metropolis_hastings(peer)
        if scheme == "uniform":
            return self.uniform(peer)
        raise ValueError(f"unknown mixing scheme {scheme!r}")


def choose_neighbours(
    peer_id: str,
    known: Iterable[str],
    *,
    graph: PeerGraph | None = None,
    max_neighbours: int = 0,
    seed: int = 0,
) -> list[str]:
    """The policy of the module docstring; the result is sorted.

    With a graph, the neighbours are the graph's whether or not they were discovered
    yet (the graph is the agreement; one not found yet is treated as down until it
    answers). Otherwise: the known peers, or with ``max_neighbours`` the node's
    neighbours on the ring lattice over them (:func:`ring_lattice_neighbours`).
    """
    if graph is not None:
        return graph.neighbours(peer_id)
    peers = sorted(set(known) - {peer_id})
    if max_neighbours and len(peers) > max_neighbours:
        peers = ring_lattice_neighbours(peer_id, peers, max_neighbours, seed=seed)
    return peers


def ring_position(peer_id: str, seed: int) -> bytes:
    """A peer's place on the ring: the same on every node (no process-salted ``hash``),
    and not chosen by the peer (its id is a public key; the seed is shared)."""
    return hashlib.sha256(f"{seed}:{peer_id}".encode()).digest()


def ring_lattice_neighbours(peer_id: str, others: Iterable[str], k: int, *, seed: int) -> list[str]:
    """``peer_id``'s neighbours on the k-regular ring lattice over it and ``others``.

    Symmetric by construction: ``b`` is within ``k // 2`` steps of ``a`` on the ring
    exactly when ``a`` is within ``k // 2`` steps of ``b``, and so is "opposite". For an
    odd ``k`` on an odd ring there is no opposite peer: the degree is ``k - 1``.
    """
    ring = sorted({peer_id, *others}, key=lambda peer: (ring_position(peer, seed), peer))
    n, me = len(ring), ring.index(peer_id)
    if k >= n - 1:
        return sorted(set(ring) - {peer_id})
    offsets = {step for half in range(1, k // 2 + 1) for step in (half, n - half)}
    if k % 2 and n % 2 == 0:
        offsets.add(n // 2)
    return sorted(ring[(me + step) % n] for step in offsets)


def check_member(graph: PeerGraph, peer_id: str, source: str) -> None:
    """Refuse a graph that does not name this peer (a wrong file or a wrong key)."""
    if peer_id not in graph:
        raise TopologyFileError(
            f"{source}: this node's peer id {peer_id} is not in the graph "
            f"({len(graph)} peers; is it the right file, and the right key file?)"
        )
