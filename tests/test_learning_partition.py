"""Partitioners: sizes, disjointness, coverage, determinism, and the skew each promises."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.learning import PARTITION_SCHEMES, label_distribution, load_dataset, partition


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_dataset("digits").train_labels


def _check_disjoint_and_covering(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a sample is held by two peers"
    assert np.array_equal(np.sort(joined), np.arange(n)), "some sample is held by no peer"
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "parts are returned sorted"


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    dist = label_distribution(labels, parts, 10, normalize=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(dist > 0, dist * np.log(dist), 0.0).sum(axis=1)
    return float(ent.mean())


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_disjoint_covering_deterministic(labels: np.ndarray, scheme: str) -> None:
    parts = partition(labels, 12, scheme, seed=3)
    assert len(parts) == 12
    _check_disjoint_and_covering(parts, len(labels))
    again = partition(labels, 12, scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 12, scheme, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_and_labels(labels: np.ndarray) -> None:
    parts = partition(labels, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    dist = label_distribution(labels, parts, 10)
    assert dist.shape == (10, 10)
    assert dist.sum() == len(labels)
    assert np.all(dist > 0)  # every peer sees every class


def test_dirichlet_skew_grows_as_alpha_falls(labels: np.ndarray) -> None:
    skewed = _mean_entropy(labels, partition(labels, 10, "dirichlet", seed=0, alpha=0.1))
    mild = _mean_entropy(labels, partition(labels, 10, "dirichlet", seed=0, alpha=1.0))
    uniform = _mean_entropy(labels, partition(labels, 10, "dirichlet", seed=0, alpha=100.0))
    assert skewed < mild < uniform
    assert uniform > 0.95 * np.log(10)


def test_dirichlet_min_size_with_many_peers() -> None:
    # 300 samples among 250 peers at alpha=0.05: a draw where every peer gets a sample
    # essentially never comes, so the repair step must kick in.
    labels = np.random.default_rng(0).integers(0, 10, size=300)
    parts = partition(labels, 250, "dirichlet", seed=1, alpha=0.05, min_size=1)
    _check_disjoint_and_covering(parts, 300)
    assert min(len(p) for p in parts) >= 1
    parts = partition(labels, 20, "dirichlet", seed=1, alpha=0.05, min_size=10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ValueError, match="at least"):
        partition(labels, 31, "dirichlet", seed=0, min_size=10)


@pytest.mark.parametrize("shards_per_peer", [1, 2, 3])
def test_shards_limit_labels_per_peer(labels: np.ndarray, shards_per_peer: int) -> None:
    parts = partition(labels, 20, "shards", seed=0, shards_per_peer=shards_per_peer)
    _check_disjoint_and_covering(parts, len(labels))
    dist = label_distribution(labels, parts, 10)
    assert np.all((dist > 0).sum(axis=1) <= shards_per_peer)
    sizes = [len(p) for p in parts]
    assert max(sizes) <= 1.5 * min(sizes)


def test_shards_with_fewer_shards_than_classes(labels: np.ndarray) -> None:
    parts = partition(labels, 2, "shards", seed=0, shards_per_peer=2)
    _check_disjoint_and_covering(parts, len(labels))


def test_by_source_keeps_sources_whole() -> None:
    ds = load_dataset("synthetic")
    sources = ds.sources
    assert sources is not None
    parts = partition(ds.train_labels, 3, "by_source", seed=0, sources=sources)
    _check_disjoint_and_covering(parts, len(sources))
    owner = {}
    for peer, p in enumerate(parts):
        for s in np.unique(sources[p]):
            assert s not in owner, "a source was split between peers"
            owner[s] = peer
    assert sorted(owner) == sorted(np.unique(sources))
    again = partition(ds.train_labels, 3, "by_source", seed=0, sources=sources)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_bad_arguments(labels: np.ndarray) -> None:
    assert set(PARTITION_SCHEMES) == {"iid", "dirichlet", "shards", "by_source"}
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(labels, 4, "round_robin", seed=0)
    with pytest.raises(ValueError, match="sources"):
        partition(labels, 4, "by_source", seed=0)
    with pytest.raises(ValueError, match="whole source"):
        partition(labels, 9, "by_source", seed=0, sources=np.arange(len(labels)) % 8)
    with pytest.raises(ValueError, match="alpha"):
        partition(labels, 4, "dirichlet", seed=0, alpha=0.0)
