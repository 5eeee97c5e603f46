"""Split a dataset among peers: who holds which training samples.

A partition is a list of sorted int64 index arrays, one per peer, into the shared training
set. Every scheme is a pure function of its arguments and ``seed``, so two runs (or two
drivers) that partition alike give every peer the same data.

- ``iid``: a uniform random split into near-equal parts.
- ``dirichlet``: label skew; each class is split among peers in Dirichlet(alpha)
  proportions, so small ``alpha`` leaves peers with few classes.
- ``shards``: pathological label skew (McMahan et al.); samples sorted by label are cut
  into ``num_peers * shards_per_peer`` single-label shards, each peer gets
  ``shards_per_peer`` of them at random.
- ``by_source``: every natural source (writer, device) goes whole to one peer.

The first three schemes are disjoint and cover every sample; ``by_source`` covers every
sample too, with parts as uneven as the sources are.
"""

from __future__ import annotations

import numpy as np

from p2pfl.errors import P2PFLError

__all__ = ["PARTITION_SCHEMES", "PartitionError", "label_distribution", "partition"]

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "by_source")

class PartitionError(P2PFLError, ValueError):
    """The training set cannot be cut as asked: too few samples (or shards, or sources) for
    the peers. A configuration problem (peers, scheme), not a bug: callers name the keys."""


# Dirichlet draws that leave a peer under ``min_size`` are redrawn this many times, then
# repaired (see ``_top_up``): with thousands of peers, a fully valid draw may never come.
_DIRICHLET_TRIES = 20


def partition(
    labels: np.ndarray,
    num_peers: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_peer: int = 2,
    sources: np.ndarray | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Indices of the samples each of ``num_peers`` peers holds, by ``scheme``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if num_peers < 1:
        raise ValueError(f"num_peers must be >= 1, got {num_peers}")
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}"
        )
    n = len(labels)
    if scheme != "by_source" and n < num_peers * min_size:
        raise PartitionError(f"{n} samples cannot give {num_peers} peers at least {min_size} each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_peers)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_peers, alpha, min_size, rng)
    elif scheme == "shards":
        parts = _shards(labels, num_peers, shards_per_peer, rng)
    else:
        parts = _by_source(sources, n, num_peers, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    labels: np.ndarray, num_peers: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    owner = np.empty(len(labels), dtype=np.int64)
    for _ in range(_DIRICHLET_TRIES):
        for idx in by_class:
            shares = rng.dirichlet(np.full(num_peers, alpha))
            cuts = np.minimum((np.cumsum(shares)[:-1] * len(idx)).astype(np.int64), len(idx))
            bounds = np.concatenate([[0], cuts, [len(idx)]])
            owner[idx] = np.repeat(np.arange(num_peers), np.diff(bounds))
        if np.bincount(owner, minlength=num_peers).min() >= min_size:
            break
    else:
        return _top_up(_group_by_owner(owner, num_peers), min_size, rng)
    return _group_by_owner(owner, num_peers)


def _group_by_owner(owner: np.ndarray, num_peers: int) -> list[np.ndarray]:
    """Sample indices grouped by the peer that owns them."""
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_peers))[:-1])


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest parts to those under ``min_size``.

    Changes as little of the Dirichlet draw as it can: only the shortfall moves, always
    taken from whichever part is currently largest.
    """
    parts = [rng.permutation(p) for p in parts]
    sizes = np.array([len(p) for p in parts])
    for peer in np.flatnonzero(sizes < min_size):
        while len(parts[peer]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))
            take = min(min_size - len(parts[peer]), len(parts[donor]) - min_size)
            parts[peer] = np.concatenate([parts[peer], parts[donor][:take]])
            parts[donor] = parts[donor][take:]
    return parts


def _shards(
    labels: np.ndarray, num_peers: int, shards_per_peer: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if shards_per_peer < 1:
        raise ValueError(f"shards_per_peer must be >= 1, got {shards_per_peer}")
    num_shards = num_peers * shards_per_peer
    n = len(labels)
    if num_shards > n:
        raise PartitionError(f"{n} samples cannot make {num_shards} non-empty shards")
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]  # by label, random within
    classes, counts = np.unique(labels, return_counts=True)
    if num_shards >= len(classes):
        # Single-label shards: each class gets shards in proportion to its size (>= 1).
        per_class = _apportion(counts, num_shards)
        shards: list[np.ndarray] = []
        start = 0
        for count, k in zip(counts, per_class, strict=True):
            shards.extend(np.array_split(order[start : start + count], k))
            start += count
    else:  # fewer shards than classes: shards must straddle labels
        shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_peers, shards_per_peer)
    return [np.concatenate([shards[s] for s in row]) for row in deal]


def _apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` into integer shares proportional to ``counts``, each in [1, count]."""
    k = np.ones(len(counts), dtype=np.int64)
    remaining = total - len(counts)
    exact = counts / counts.sum() * remaining
    k += np.floor(exact).astype(np.int64)
    left = total - int(k.sum())
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    k[order[:left]] += 1
    # A class cannot have more shards than samples: pass the excess to roomier classes.
    while np.any(k > counts):
        over = k > counts
        excess = int((k - counts)[over].sum())
        k[over] = counts[over]
        room = np.flatnonzero(k < counts)
        k[room[np.argsort(-(counts[room] / k[room]), kind="stable")[:excess]]] += 1
    return k


def _by_source(
    sources: np.ndarray | None, n: int, num_peers: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if sources is None:
        raise ValueError("by_source partitioning needs the dataset's sources")
    sources = np.asarray(sources)
    if sources.shape != (n,):
        raise ValueError(f"sources must have one entry per sample ({n}), got shape {sources.shape}")
    ids = np.unique(sources)
    if len(ids) < num_peers:
        raise PartitionError(f"{len(ids)} sources cannot give {num_peers} peers a whole source each")
    peer_of_source = np.empty(len(ids), dtype=np.int64)
    for peer, group in enumerate(np.array_split(rng.permutation(len(ids)), num_peers)):
        peer_of_source[group] = peer
    return _group_by_owner(peer_of_source[np.searchsorted(ids, sources)], num_peers)


def label_distribution(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int, *, normalize: bool = False
) -> np.ndarray:
    """Per-peer label counts, shape ``(peers, num_classes)``; rows sum to 1 if ``normalize``."""
    labels = np.asarray(labels)
    counts = np.stack(
        [np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts]
    ).astype(np.float64 if normalize else np.int64)
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        counts = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return counts
