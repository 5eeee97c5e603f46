"""Graph generators, file reading, mixing matrices, statistics and drawing."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from topologies import (
    GRAPH_KINDS,
    GRAPH_PARAMS,
    DisconnectedGraphError,
    TopologyError,
    build_graph,
    draw_graph,
    graph_stats,
    is_doubly_stochastic,
    is_row_stochastic,
    layout,
    metropolis_hastings,
    mixing,
    require_connected,
    resolve_params,
    spectral_gap,
    torus_shape,
    uniform,
)

GENERATED = [k for k in GRAPH_KINDS if k != "file"]
RANDOM_KINDS = ["regular", "erdos_renyi", "barabasi_albert", "watts_strogatz", "geometric"]


def degrees(g: nx.Graph) -> set[int]:
    return {d for _, d in g.degree()}


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("kind", GENERATED)
def test_every_kind_labels_nodes_0_to_n_minus_1(kind: str) -> None:
    g = build_graph(kind, 36, seed=3)
    assert sorted(g.nodes) == list(range(36))
    assert all(type(v) is int for v in g.nodes)
    assert nx.number_of_selfloops(g) == 0
    assert g.graph["kind"] == kind and g.graph["seed"] == 3


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_random_kinds_are_deterministic_under_seed(kind: str) -> None:
    a, b = build_graph(kind, 40, seed=7), build_graph(kind, 40, seed=7)
    c = build_graph(kind, 40, seed=8)
    assert sorted(a.edges) == sorted(b.edges)
    assert sorted(a.edges) != sorted(c.edges)


def test_complete_ring_star_degrees() -> None:
    assert degrees(build_graph("complete", 12)) == {11}
    ring = build_graph("ring", 12)
    assert degrees(ring) == {2} and nx.is_connected(ring)
    star = build_graph("star", 12)
    assert star.degree(0) == 11
    assert all(star.degree(v) == 1 for v in range(1, 12))


def test_torus_is_4_regular_connected_and_wraps() -> None:
    g = build_graph("torus", 20)  # 4 x 5
    assert degrees(g) == {4} and nx.is_connected(g)
    assert g.has_edge(0, 4)  # first and last column of row 0
    assert g.has_edge(0, 15)  # first and last row of column 0
    assert g.graph["params"] == {"rows": None, "cols": None}
    g = build_graph("torus", 18, rows=3)
    assert degrees(g) == {4} and g.number_of_edges() == 36


def test_torus_shape_factorises_and_explains_impossible_sizes() -> None:
    assert torus_shape(36) == (6, 6)
    assert torus_shape(12) == (3, 4)
    assert torus_shape(12, cols=3) == (4, 3)
    with pytest.raises(TopologyError, match=r"n=13 .*try n=12 or n=15"):
        torus_shape(13)
    with pytest.raises(TopologyError, match="rows \\* cols must equal n"):
        torus_shape(12, rows=3, cols=5)
    with pytest.raises(TopologyError, match="n >= 9"):
        build_graph("torus", 8)


def test_regular_graph_has_degree_k() -> None:
    assert degrees(build_graph("regular", 20, k=3)) == {3}
    with pytest.raises(TopologyError, match="n \\* k even"):
        build_graph("regular", 21, k=3)


def test_barabasi_albert_edge_count_and_connectivity() -> None:
    for m in (1, 2, 3):
        g = build_graph("barabasi_albert", 50, seed=1, m=m)
        assert g.number_of_edges() == (50 - m) * m
        assert nx.is_connected(g)


def test_watts_strogatz_keeps_mean_degree_k() -> None:
    g = build_graph("watts_strogatz", 40, k=6, p=0.2)
    assert g.number_of_edges() == 40 * 6 // 2
    assert degrees(build_graph("watts_strogatz", 40, k=6, p=0.0)) == {6}
    with pytest.raises(TopologyError, match="even k"):
        build_graph("watts_strogatz", 40, k=5)


def test_erdos_renyi_extremes_and_default_p() -> None:
    assert build_graph("erdos_renyi", 15, p=1.0).number_of_edges() == 15 * 14 // 2
    assert build_graph("erdos_renyi", 15, p=0.0).number_of_edges() == 0
    g = build_graph("erdos_renyi", 200, seed=0)
    assert g.graph["params"] == {"p": None}
    expected = 2 * math.log(200) / 200 * 200 * 199 / 2
    assert 0.8 * expected < g.number_of_edges() < 1.2 * expected


def test_geometric_positions_and_radius() -> None:
    g = build_graph("geometric", 60, seed=2, radius=0.25)
    pos = nx.get_node_attributes(g, "pos")
    assert len(pos) == 60
    assert all(isinstance(p, tuple) and 0 <= p[0] <= 1 and 0 <= p[1] <= 1 for p in pos.values())
    for u in range(60):
        for v in range(u + 1, 60):
            assert g.has_edge(u, v) == (math.dist(pos[u], pos[v]) <= 0.25)


def test_unknown_kind_and_parameter_name_what_is_accepted() -> None:
    with pytest.raises(TopologyError, match="unknown graph kind 'mesh'.*ring.*torus"):
        build_graph("mesh", 10)
    with pytest.raises(
        TopologyError, match="unknown parameter 'q' .*'barabasi_albert'.*accepted: m"
    ):
        build_graph("barabasi_albert", 10, q=2)
    with pytest.raises(TopologyError, match="accepted: none"):
        build_graph("ring", 10, k=2)
    with pytest.raises(TopologyError, match="'m' must be an integer"):
        build_graph("barabasi_albert", 10, m=1.5)
    with pytest.raises(TopologyError, match="'p' must be in"):
        build_graph("erdos_renyi", 10, p=1.5)
    with pytest.raises(TopologyError, match="n >= 3"):
        build_graph("ring", 2)
    assert issubclass(TopologyError, ValueError)


def test_params_table_matches_kinds_and_fills_defaults() -> None:
    assert set(GRAPH_PARAMS) == set(GRAPH_KINDS)
    assert GRAPH_PARAMS["watts_strogatz"] == {"k": 4, "p": 0.1}
    assert resolve_params("watts_strogatz", {"p": 0.3}) == {"k": 4, "p": 0.3}
    with pytest.raises(TypeError):
        GRAPH_PARAMS["ring"]["x"] = 1  # type: ignore[index]


# --------------------------------------------------------------------------- files


def test_edge_list_file_is_relabelled_keeping_labels(tmp_path) -> None:
    path = tmp_path / "peers.txt"
    path.write_text(
        "# a comment\nalice bob 0.5\nbob,carol\ncarol alice  # trailing\ndave\nalice alice\n"
    )
    g = build_graph("file", 4, path=str(path))
    assert sorted(g.nodes) == [0, 1, 2, 3]
    labels = nx.get_node_attributes(g, "label")
    assert labels == {0: "alice", 1: "bob", 2: "carol", 3: "dave"}
    assert sorted(g.edges) == [(0, 1), (0, 2), (1, 2)]  # self-loop dropped, dave isolated
    assert build_graph("file", None, path=path).number_of_nodes() == 4


def test_numeric_edge_list_keeps_numeric_order(tmp_path) -> None:
    original = build_graph("barabasi_albert", 30, seed=4)
    path = tmp_path / "ba.edges"
    nx.write_edgelist(original, path, data=False)
    g = build_graph("file", 30, path=path)
    assert {int(g.nodes[v]["label"]) for v in g} == set(range(30))
    assert all(int(g.nodes[v]["label"]) == v for v in g)
    assert sorted(g.edges) == sorted(tuple(sorted(e)) for e in original.edges)


def test_graphml_round_trip_with_positions(tmp_path) -> None:
    original = nx.Graph()
    for name, (x, y) in {"n-a": (0.1, 0.2), "n-b": (0.5, 0.5), "n-c": (0.9, 0.1)}.items():
        original.add_node(name, x=x, y=y, role="relay")
    original.add_edges_from([("n-a", "n-b"), ("n-b", "n-c")])
    path = tmp_path / "map.graphml"
    nx.write_graphml(original, path)
    g = build_graph("file", 3, path=path)
    assert [g.nodes[v]["label"] for v in range(3)] == ["n-a", "n-b", "n-c"]
    assert g.nodes[2]["pos"] == (0.9, 0.1) and g.nodes[0]["role"] == "relay"
    assert sorted(g.edges) == [(0, 1), (1, 2)]


def test_file_errors_are_topology_errors(tmp_path) -> None:
    with pytest.raises(TopologyError, match="needs the parameter 'path'"):
        build_graph("file", 3)
    with pytest.raises(TopologyError, match="not found"):
        build_graph("file", 3, path=tmp_path / "missing.txt")
    with pytest.raises(TopologyError, match="is a folder; expected an edge list or a GraphML file"):
        build_graph("file", 3, path=tmp_path)
    path = tmp_path / "two.txt"
    path.write_text("0 1\n")
    with pytest.raises(TopologyError, match="has 2 nodes, but n=5"):
        build_graph("file", 5, path=path)
    bad = tmp_path / "bad.graphml"
    bad.write_text("<graphml><graph")
    with pytest.raises(TopologyError, match="cannot read GraphML"):
        build_graph("file", None, path=bad)


# --------------------------------------------------------------------------- connectivity


def test_require_connected_names_components_and_purpose() -> None:
    g = nx.disjoint_union_all([nx.path_graph(10), nx.path_graph(4), nx.path_graph(2)])
    with pytest.raises(DisconnectedGraphError) as err:
        require_connected(g, "D-PSGD")
    assert str(err.value) == (
        "graph has 3 connected components (sizes 10, 4, 2); D-PSGD needs a connected graph"
    )
    assert isinstance(err.value, TopologyError)
    require_connected(build_graph("ring", 5), "D-PSGD")
    with pytest.raises(DisconnectedGraphError, match="no peers"):
        require_connected(nx.Graph(), "gossip")


def test_require_connected_truncates_long_size_lists() -> None:
    g = nx.empty_graph(9)
    with pytest.raises(
        DisconnectedGraphError,
        match=r"9 connected components \(sizes 1, 1, 1, 1, 1, 1, \.\.\. \(3 more\)\)",
    ):
        require_connected(g, "x")


# --------------------------------------------------------------------------- mixing


@pytest.mark.parametrize("kind", GENERATED)
def test_mixing_matrices_are_stochastic(kind: str) -> None:
    g = build_graph(kind, 25 if kind != "torus" else 36, seed=5)
    mh, un = metropolis_hastings(g), uniform(g)
    assert isinstance(mh, sp.csr_matrix) and isinstance(un, sp.csr_matrix)
    assert is_row_stochastic(mh) and is_row_stochastic(un)
    assert is_doubly_stochastic(mh)
    assert abs(mh - mh.T).max() < 1e-15


def test_metropolis_hastings_weights_by_hand() -> None:
    g = nx.path_graph(3)  # degrees 1, 2, 1
    w = metropolis_hastings(g).toarray()
    third = 1 / 3
    assert np.allclose(w, [[2 * third, third, 0], [third, third, third], [0, third, 2 * third]])


def test_uniform_is_not_symmetric_off_regular_graphs() -> None:
    star = build_graph("star", 5)
    w = uniform(star).toarray()
    assert np.allclose(w[0], 0.2) and np.allclose(w[1], [0.5, 0.5, 0, 0, 0])
    assert not is_doubly_stochastic(w)
    assert is_doubly_stochastic(uniform(build_graph("ring", 8)))


def test_stochastic_checks_reject_negative_and_unbalanced() -> None:
    assert not is_row_stochastic(np.array([[1.5, -0.5], [0.5, 0.5]]))
    assert not is_row_stochastic(np.array([[0.5, 0.4], [0.5, 0.5]]))


def test_complete_graph_mixes_in_one_step() -> None:
    w = metropolis_hastings(build_graph("complete", 10))
    assert np.allclose(w.toarray(), np.full((10, 10), 0.1))
    assert spectral_gap(w) == pytest.approx(1.0)


def test_ring_mixes_slower_than_torus() -> None:
    ring = spectral_gap(metropolis_hastings(build_graph("ring", 36)))
    torus = spectral_gap(metropolis_hastings(build_graph("torus", 36)))
    assert 0 < ring < torus < 1
    # MH on a ring is (I + A)/3: eigenvalues (1 + 2 cos(2 pi j / n)) / 3
    assert ring == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / 36)) / 3)


def test_disconnected_graph_has_zero_gap() -> None:
    g = nx.disjoint_union(nx.complete_graph(4), nx.cycle_graph(5))
    assert spectral_gap(metropolis_hastings(g)) == pytest.approx(0.0, abs=1e-12)
    assert spectral_gap(metropolis_hastings(g), dense_limit=0) == pytest.approx(0.0, abs=1e-9)
    assert spectral_gap(sp.csr_matrix(np.ones((1, 1)))) == 1.0


def dense_gap(w: sp.spmatrix) -> float:
    return 1 - np.sort(np.abs(np.linalg.eigvals(w.toarray())))[-2]


@pytest.mark.parametrize("kind", ["ring", "barabasi_albert", "geometric", "star"])
def test_sparse_gap_agrees_with_dense(kind: str) -> None:
    g = build_graph(kind, 80, seed=1)
    for w in (metropolis_hastings(g), uniform(g)):
        assert spectral_gap(w) == pytest.approx(dense_gap(w), abs=1e-9)
        assert spectral_gap(w, dense_limit=0) == pytest.approx(dense_gap(w), abs=1e-8)


def test_sparse_gap_falls_back_when_arpack_stalls(monkeypatch) -> None:
    real_eigsh = spla.eigsh

    def stalling_eigsh(*args, **kwargs):
        if kwargs.get("sigma") is None and kwargs.get("which") == "LM":
            raise spla.ArpackNoConvergence("forced", np.array([]), np.array([]))
        return real_eigsh(*args, **kwargs)

    monkeypatch.setattr(mixing.spla, "eigsh", stalling_eigsh)
    # ring: the second largest eigenvalue sets the gap; K_{5,5}: the smallest one does.
    for g in (build_graph("ring", 90), nx.complete_bipartite_graph(5, 5)):
        w = metropolis_hastings(g)
        assert spectral_gap(w, dense_limit=0) == pytest.approx(dense_gap(w), abs=1e-8)
    assert dense_gap(metropolis_hastings(nx.complete_bipartite_graph(5, 5))) == pytest.approx(1 / 3)


def test_gap_of_a_non_reversible_matrix() -> None:
    w = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    assert spectral_gap(w) == pytest.approx(dense_gap(sp.csr_matrix(w)))


def test_sparse_gap_is_reproducible() -> None:
    w = metropolis_hastings(build_graph("barabasi_albert", 120, seed=2))
    assert spectral_gap(w, dense_limit=0) == spectral_gap(w, dense_limit=0)


# --------------------------------------------------------------------------- stats


def test_graph_stats_of_a_ring() -> None:
    s = graph_stats(build_graph("ring", 10))
    assert s == {
        "n": 10,
        "edges": 10,
        "degree_min": 2,
        "degree_mean": 2.0,
        "degree_max": 2,
        "components": 1,
        "largest_component": 10,
        "diameter": 5,
        "clustering": 0.0,
        "spectral_gap": pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / 10)) / 3),
    }


def test_graph_stats_of_a_disconnected_graph() -> None:
    g = nx.disjoint_union(nx.complete_graph(5), nx.path_graph(3))
    s = graph_stats(g)
    assert (s["components"], s["largest_component"], s["diameter"]) == (2, 5, 1)
    assert s["clustering"] == pytest.approx(5 / 8)
    assert s["spectral_gap"] == pytest.approx(0.0, abs=1e-12)
    assert graph_stats(nx.Graph())["n"] == 0


# --------------------------------------------------------------------------- drawing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_draw_small_graph_with_marks(tmp_path) -> None:
    g = build_graph("barabasi_albert", 20, seed=1)
    out = draw_graph(
        g,
        tmp_path / "sub" / "ba.png",
        title="before",
        highlight={1, 2},
        removed={0},
        removed_edges=[(3, 4)],
    )
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_draw_uses_map_positions_and_scales_to_large_graphs(tmp_path) -> None:
    g = build_graph("geometric", 1500, seed=1)
    assert layout(g)[7] == g.nodes[7]["pos"]
    assert (
        draw_graph(g, tmp_path / "geo.png", removed=set(range(100))).read_bytes()[:8] == PNG_MAGIC
    )


def test_layout_is_seeded_for_small_and_large_graphs() -> None:
    for n in (30, 600):
        g = build_graph("ring", n)
        first, second = layout(g, iterations=10), layout(g, iterations=10)
        assert first == second and set(first) == set(g.nodes)
        assert all(-1.0 <= c <= 1.0 for xy in first.values() for c in xy)
