"""Disruption choices on small hand-checked graphs: each does what it says."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from topologies import (
    Battery,
    ChurnEvent,
    TopologyError,
    build_graph,
    churn_trace,
    component_stats,
    cut_edges,
    partition_groups,
    region_outage,
    select_links,
    select_peers,
)
from topologies.disruption import PartitionMethod


def two_triangles() -> nx.Graph:
    """Triangles {0, 1, 2} and {3, 4, 5} joined by the bridge (2, 3)."""
    return nx.Graph([(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)])


def placed(points: dict[int, tuple[float, float]]) -> nx.Graph:
    g = nx.Graph()
    for v, xy in points.items():
        g.add_node(v, pos=xy)
    return g


# --------------------------------------------------------------------------- peers


def test_degree_strategy_picks_the_hub_of_a_star() -> None:
    star = build_graph("star", 10)
    assert select_peers(star, 1, "degree", seed=5) == [0]
    assert select_peers(star, 3, "degree")[0] == 0


def test_betweenness_strategy_picks_the_bridge_ends_then_the_rest() -> None:
    g = two_triangles()
    assert set(select_peers(g, 2, "betweenness", seed=1)) == {2, 3}
    path = nx.path_graph(7)
    assert select_peers(path, 1, "betweenness") == [3]


def test_candidates_restrict_the_pool() -> None:
    star = build_graph("star", 10)
    relays = range(1, 10)
    picked = select_peers(star, 4, "degree", seed=2, candidates=relays)
    assert len(picked) == 4 and 0 not in picked
    assert set(select_peers(star, 1.0, candidates=[3, 5])) == {3, 5}
    with pytest.raises(TopologyError, match="not in the graph"):
        select_peers(star, 1, candidates=[42])


def test_random_selection_is_seeded_distinct_and_sized_by_fraction() -> None:
    g = build_graph("ring", 40)
    a = select_peers(g, 0.25, seed=9)
    assert a == select_peers(g, 0.25, seed=9)
    assert a != select_peers(g, 0.25, seed=10)
    assert len(a) == 10 == len(set(a))
    assert select_peers(g, 0) == []


def test_ties_are_broken_by_seed_not_by_id() -> None:
    ring = build_graph("ring", 30)  # every peer has degree 2
    firsts = {select_peers(ring, 1, "degree", seed=s)[0] for s in range(10)}
    assert len(firsts) > 1


def test_bad_counts_and_strategies_are_rejected() -> None:
    g = build_graph("ring", 5)
    with pytest.raises(TopologyError, match="cannot pick 6 peers out of 5"):
        select_peers(g, 6)
    with pytest.raises(TopologyError, match=r"fraction of peers must be in \[0, 1\]"):
        select_peers(g, 1.5)
    with pytest.raises(TopologyError, match="unknown peer strategy 'closeness'"):
        select_peers(g, 1, "closeness")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- region


def test_region_outage_takes_exactly_the_points_within_the_radius() -> None:
    g = placed({0: (0.5, 0.5), 1: (0.6, 0.5), 2: (0.5, 0.8), 3: (0.9, 0.9), 4: (0.21, 0.5)})
    assert region_outage(g, (0.5, 0.5), 0.3) == {0, 1, 2, 4}  # (0.5, 0.8) sits on the circle
    assert region_outage(g, (0.5, 0.5), 0.05) == {0}
    assert region_outage(g, (0.0, 0.0), 0.1) == set()


def test_region_outage_on_a_geometric_graph_matches_brute_force() -> None:
    g = build_graph("geometric", 200, seed=4)
    hit = region_outage(g, (0.3, 0.7), 0.2)
    pos = nx.get_node_attributes(g, "pos")
    assert hit == {v for v, (x, y) in pos.items() if (x - 0.3) ** 2 + (y - 0.7) ** 2 <= 0.04}
    assert 0 < len(hit) < 200


def test_region_outage_needs_positions() -> None:
    with pytest.raises(TopologyError, match="'pos' attribute"):
        region_outage(build_graph("ring", 5), (0, 0), 1)


# --------------------------------------------------------------------------- links


def test_bridges_first_breaks_the_bridge_first() -> None:
    g = two_triangles()
    for seed in range(5):
        assert select_links(g, 1, seed=seed, strategy="bridges_first") == [(2, 3)]


def test_random_links_are_normalised_seeded_and_sized() -> None:
    g = build_graph("complete", 8)
    links = select_links(g, 0.5, seed=3)
    assert len(links) == 14 == len(set(links))
    assert all(u < v and g.has_edge(u, v) for u, v in links)
    assert links == select_links(g, 0.5, seed=3)
    with pytest.raises(TopologyError, match="unknown link strategy"):
        select_links(g, 1, strategy="longest")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- partitions


def test_spatial_partition_splits_west_from_east() -> None:
    points = {v: (0.1 * (v % 10), 0.05 * (v // 10)) for v in range(20)}  # wide 10 x 2 grid
    g = placed(points)
    west, east = partition_groups(g, 2, method="spatial")
    assert west == {v for v in range(20) if v % 10 < 5}
    assert east == {v for v in range(20) if v % 10 >= 5}


def test_spectral_partition_finds_the_sparse_cut() -> None:
    g = nx.barbell_graph(6, 0)  # two K6 joined by one edge (5, 6)
    groups = partition_groups(g, 2, method="spectral", seed=0)
    assert sorted(map(sorted, groups)) == [list(range(6)), list(range(6, 12))]
    assert cut_edges(g, groups) == [(5, 6)]


@pytest.mark.parametrize("method", ["spatial", "random", "spectral"])
def test_partitions_are_disjoint_covering_balanced_and_seeded(method: PartitionMethod) -> None:
    g = build_graph("geometric", 50, seed=1)
    groups = partition_groups(g, 3, seed=2, method=method)
    assert sorted(len(p) for p in groups) == [16, 17, 17]
    assert set().union(*groups) == set(range(50))
    assert sum(map(len, groups)) == 50
    assert groups == partition_groups(g, 3, seed=2, method=method)
    assert partition_groups(g, 1, method=method) == [set(range(50))]


def test_cutting_the_partition_disconnects_the_groups() -> None:
    g = build_graph("geometric", 80, seed=3)
    groups = partition_groups(g, 4, seed=0, method="spatial")
    cut = cut_edges(g, groups)
    split = g.copy()
    split.remove_edges_from(cut)
    for comp in nx.connected_components(split):
        assert sum(1 for group in groups if comp <= group) == 1


def test_cut_edges_treats_unlisted_peers_as_the_rest() -> None:
    g = two_triangles()
    assert cut_edges(g, [{0, 1}]) == [(0, 2), (1, 2)]
    assert cut_edges(g, [{0, 1, 2}, {3, 4, 5}]) == [(2, 3)]
    with pytest.raises(TopologyError, match="peer 2 is in more than one group"):
        cut_edges(g, [{0, 2}, {2, 3}])


def test_partition_errors() -> None:
    with pytest.raises(TopologyError, match="parts must be"):
        partition_groups(build_graph("ring", 5), 6, method="random")
    with pytest.raises(TopologyError, match="'pos' attribute"):
        partition_groups(build_graph("ring", 5), 2, method="spatial")


# --------------------------------------------------------------------------- churn


def test_churn_trace_is_sorted_alternating_and_within_horizon() -> None:
    trace = churn_trace(20, seed=1, horizon=100.0, mean_session=10.0, mean_downtime=5.0)
    assert trace == sorted(trace, key=lambda e: (e.time, e.peer))
    assert all(isinstance(e, ChurnEvent) and 0 < e.time < 100.0 for e in trace)
    for peer in range(20):
        kinds = [e.kind for e in trace if e.peer == peer]
        assert kinds == ["leave", "join"] * (len(kinds) // 2) + ["leave"] * (len(kinds) % 2)
    assert trace == churn_trace(20, seed=1, horizon=100.0, mean_session=10.0, mean_downtime=5.0)


def test_churn_sessions_have_the_requested_mean() -> None:
    trace = churn_trace(200, seed=0, horizon=1000.0, mean_session=10.0, mean_downtime=5.0)
    sessions, downtimes = [], []
    for peer in range(200):
        times = [0.0] + [e.time for e in trace if e.peer == peer]
        gaps = np.diff(times)
        sessions += list(gaps[0::2])
        downtimes += list(gaps[1::2])
    assert np.mean(sessions) == pytest.approx(10.0, rel=0.05)
    assert np.mean(downtimes) == pytest.approx(5.0, rel=0.05)


def test_a_peers_trace_does_not_depend_on_n_and_peers_can_be_excluded() -> None:
    small = churn_trace(5, seed=3, horizon=50, mean_session=4, mean_downtime=2)
    large = churn_trace(50, seed=3, horizon=50, mean_session=4, mean_downtime=2)
    assert [e for e in small if e.peer == 2] == [e for e in large if e.peer == 2]
    some = churn_trace(5, seed=3, horizon=50, mean_session=4, mean_downtime=2, peers=[1, 3])
    assert {e.peer for e in some} == {1, 3}
    with pytest.raises(TopologyError):
        churn_trace(5, seed=3, horizon=50, mean_session=0, mean_downtime=2)


# --------------------------------------------------------------------------- battery


def test_battery_depletes_at_the_right_step() -> None:
    battery = Battery(capacity_j=1.0, drain_per_step_j=0.1)
    for _ in range(9):
        battery.consume(steps=1)
        assert not battery.depleted
    battery.consume(steps=1)  # 10 x 0.1 J: empty despite float rounding
    assert battery.depleted and battery.level_j == 0.0


def test_battery_drains_for_radio_and_idle_and_never_goes_negative() -> None:
    battery = Battery(
        capacity_j=100.0,
        drain_per_step_j=1.0,
        drain_per_byte_sent_j=1e-6,
        idle_drain_per_s_j=0.5,
        drain_per_byte_received_j=2e-7,
    )
    assert battery.cost(steps=2, bytes_sent=1_000_000, seconds=10, bytes_received=5_000_000) == 9.0
    assert battery.consume(bytes_sent=10_000_000) == pytest.approx(90.0)
    assert battery.consume(seconds=60) == pytest.approx(60.0)
    assert battery.consume(steps=1000) == 0.0 and battery.depleted


def test_battery_validates_its_numbers() -> None:
    assert Battery(capacity_j=5.0, level_j=2.0).level_j == 2.0
    with pytest.raises(TopologyError, match="drain_per_step_j must be >= 0"):
        Battery(capacity_j=5.0, drain_per_step_j=-1)
    with pytest.raises(TopologyError, match="level_j"):
        Battery(capacity_j=5.0, level_j=6.0)
    with pytest.raises(TopologyError):
        Battery(capacity_j=5.0).consume(steps=-1)


# --------------------------------------------------------------------------- components


def test_component_stats_among_alive_peers() -> None:
    path = nx.path_graph(7)  # 0-1-2-3-4-5-6
    stats = component_stats(path, alive={0, 1, 3, 4, 6})
    assert stats["components"] == 3
    assert stats["largest"] == 2 and stats["sizes"] == [2, 2, 1]
    assert stats["isolated"] == 1
    assert stats["component_of"] == {0: 0, 1: 0, 3: 1, 4: 1, 6: 2}


def test_component_stats_after_removing_a_star_hub() -> None:
    star = build_graph("star", 6)
    alive = set(star) - set(select_peers(star, 1, "degree"))
    stats = component_stats(star, alive)
    assert (stats["components"], stats["largest"], stats["isolated"]) == (5, 1, 5)
    assert component_stats(star, set()) == {
        "components": 0,
        "largest": 0,
        "sizes": [],
        "isolated": 0,
        "component_of": {},
    }
