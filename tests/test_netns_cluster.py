"""Real nodes behind two NATs with bootstrap and peer exchange only (tests/netns.py).

A public node (bootstrap) and two homes behind their own masquerading routers, two
nodes in each home; no NAT traversal: a node can reach the public node and its own LAN,
nothing in the other home. The run is D-PSGD on digits over the graph those links allow
(the public node with everyone, each home a clique; the same file on every node), so
its result does not depend on who met whom first: the same config and keys on
127.0.0.1 must give the same accuracy. How each pair is connected is read from the
kernel's socket tables (``tcp_links``). With the DHT and the relay, across the homes
too: test_netns_relay.py. Needs root and ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.identity import Identity
from tests.netns import (
    Internet,
    Nodes,
    assert_met_neighbours,
    finished_accuracies,
    graph_edges,
    home_layout,
    loopback_accuracies,
    netns_names,
    place_nodes,
    run_and_observe,
    unavailable_reason,
    write_run,
)

REASON = unavailable_reason()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"netns: {REASON}"),
    pytest.mark.timeout(240),
    pytest.mark.slow,
]

ROUNDS = 20
PER_HOME = 2
#: same graph, config, keys and seed: D-PSGD's result is the same up to float rounding
#: when every model arrives in time (asserted: no round closed by its timer)
ACCURACY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("keys")
    return [root / f"key{i}" for i in range(len(home_layout(PER_HOME)))]


@pytest.fixture(scope="module")
def on_loopback(keys: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The accuracies of the same config, keys and graph on 127.0.0.1."""
    layout = home_layout(PER_HOME)
    edges = graph_edges(layout, cross_homes=False)
    return loopback_accuracies(tmp_path_factory.mktemp("loopback") / "run", keys, edges, layout, ROUNDS)


def test_nodes_behind_two_nats_converge_as_on_loopback(
    keys: list[Path], on_loopback: list[float], tmp_path: Path
) -> None:
    layout = home_layout(PER_HOME)
    peer_ids = [Identity.load_or_create(key).peer_id for key in keys]
    edges = graph_edges(layout, cross_homes=False)  # no NAT traversal: no pair across homes

    with Internet(homes=2) as net:
        places = place_nodes(net, layout)
        config = write_run(tmp_path / "netns", peer_ids, edges, rounds=ROUNDS)
        nodes = Nodes(tmp_path / "netns", config, places, keys)
        try:
            nodes.start_all()
            links = run_and_observe(net, nodes, 200).links  # TCP connections, at any time
            accuracies = finished_accuracies(nodes, ROUNDS, edges)
        finally:
            nodes.close()
        made = set(net.namespaces)
    assert made and not made & set(netns_names()), "namespaces left after close"

    assert_met_neighbours(nodes, peer_ids, edges)  # in discovery: bootstrap, then peer exchange
    # how each neighbouring pair ended up connected: in this graph every pair is direct
    # (the public node dialled out through the NATs, home nodes over their LAN) ...
    kinds = {edge: ("direct" if edge in links else "relayed") for edge in edges}
    assert kinds == {edge: "direct" for edge in edges}, kinds
    # ... and nobody got a connection into the other home (its NAT lets none in)
    for a, b in links:
        assert layout[a][0] == layout[b][0] or "pub" in (layout[a][0], layout[b][0]), (a, b)

    assert min(accuracies) >= 0.8, accuracies
    assert accuracies == pytest.approx(on_loopback, abs=ACCURACY_TOLERANCE), (accuracies, on_loopback)
