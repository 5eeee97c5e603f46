"""Whom a node talks to: a topology file of peer ids, liveness pings, mDNS discovery.

The first two run over the in-memory transport; the mDNS test runs real libp2p hosts on
127.0.0.1 (py-libp2p's zeroconf-based mDNS, multicast on this machine's interfaces).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import networkx as nx
import pytest
import torch

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.neighbours import PeerGraph, TopologyFileError, choose_neighbours
from p2pfl.node import CONTROL, Node
from p2pfl.protocols.base import Event, PeerDown, PeerUp, SendFailed
from p2pfl.protocols.dpsgd import DPSGD
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from p2pfl.wire import decode
from topologies import metropolis_hastings

pytestmark = pytest.mark.timeout(120)


def base_config(tmp_path, index: int, n: int, bootstrap: list[str], **network) -> dict:
    return {
        "seed": 3,
        "rounds": 12,
        "state_dir": str(tmp_path / f"node{index}"),
        "peer_index": index,
        "num_peers": n,
        "data": {"dataset": "digits", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
        "protocol": {"name": "dpsgd", "local_steps": 10, "round_timeout": 5.0},
        "network": {
            "bootstrap": bootstrap,
            "min_peers": n - 1,
            "discovery_timeout": 20.0,
            **network,
        },
    }


def identities(n: int) -> list[Identity]:
    return [Identity.generate(bytes([40 + i]) * 32) for i in range(n)]


def memory_addr(peer: str) -> str:
    return f"/memory/{peer}/p2p/{peer}"


class RecordingTransport(MemoryTransport):
    """Remembers to whom each protocol (non-control) message went."""

    def __init__(self, network: MemoryNetwork, peer_id: str) -> None:
        super().__init__(network, peer_id)
        self.model_sends: Counter[str] = Counter()

    async def send(self, peer: str, data: bytes, *, timeout: float) -> None:
        await super().send(peer, data, timeout=timeout)
        if decode(data).protocol != CONTROL:
            self.model_sends[peer] += 1


# -------------------------------------------------------------------- the graph file


def test_peer_graph_reads_an_edge_list_and_weights_like_the_simulator(tmp_path):
    path = tmp_path / "graph.txt"
    path.write_text("# a kite: degrees 3, 3, 2, 2, 1\nA B\nA C, 1.0\nB;C\nA D\nD E\nE\nB A\nC C\n")
    graph = PeerGraph.from_file(path)
    assert graph.peers() == ["A", "B", "C", "D", "E"]
    assert graph.neighbours("A") == ["B", "C", "D"] and graph.degree("E") == 1
    # the same numbers as topologies.metropolis_hastings over the same graph
    g = nx.Graph([(0, 1), (0, 2), (1, 2), (0, 3), (3, 4)])
    matrix = metropolis_hastings(g).toarray()
    for i, peer in enumerate(graph.peers()):
        row = graph.metropolis_hastings(peer)
        for j, other in enumerate(graph.peers()):
            expected = matrix[i, j]
            if other in row:
                assert math.isclose(row[other], expected)
            elif other != peer:
                assert expected == 0
        assert math.isclose(1 - sum(row.values()), matrix[i, i])
    graph.write(tmp_path / "again.txt")
    assert PeerGraph.from_file(tmp_path / "again.txt").edges() == graph.edges()
    # with a graph: the graph's neighbours, discovered or not
    assert choose_neighbours("D", ["A", "B"], graph=graph) == ["A", "E"]
    # k random: a function of the seed and the set of known peers only
    two = choose_neighbours("A", ["A", "B", "C", "D"], max_neighbours=2, seed=1)
    assert len(two) == 2 and two == choose_neighbours(
        "A", ["D", "C", "B"], max_neighbours=2, seed=1
    )


def test_a_graph_file_that_does_not_name_the_node_is_refused(tmp_path):
    (tmp_path / "g.txt").write_text("x y\n")
    ident = identities(1)[0]
    raw = base_config(tmp_path, 0, 1, [], topology_file=str(tmp_path / "g.txt"))
    config = NodeConfig.model_validate(raw)
    with pytest.raises(TopologyFileError, match="is not in the graph"):
        Node(config, MemoryTransport(MemoryNetwork(), ident.peer_id), ident)
    missing = NodeConfig.model_validate(
        {**raw, "network": {**raw["network"], "topology_file": "nope.txt"}}
    )
    with pytest.raises(TopologyFileError, match="not found"):
        Node(missing, MemoryTransport(MemoryNetwork(), ident.peer_id), ident)


def test_ring_of_four_from_a_file_talks_only_to_ring_neighbours(tmp_path):
    ids = identities(4)
    peers = [ident.peer_id for ident in ids]
    ring = PeerGraph((peers[i], peers[(i + 1) % 4]) for i in range(4))
    ring.write(tmp_path / "ring.txt")
    network = MemoryNetwork(seed=0)
    nodes = []
    for i, ident in enumerate(ids):
        bootstrap = [] if i == 0 else [memory_addr(peers[0])]  # peer 2 is not 0's neighbour
        raw = base_config(tmp_path, i, 4, bootstrap, topology_file=str(tmp_path / "ring.txt"))
        nodes.append(
            Node(NodeConfig.model_validate(raw), RecordingTransport(network, ident.peer_id), ident)
        )

    async def scenario() -> list[dict]:
        return await asyncio.wait_for(asyncio.gather(*(node.run() for node in nodes)), 100)

    statuses = asyncio.run(scenario())
    for i, (node, status) in enumerate(zip(nodes, statuses, strict=True)):
        ring_neighbours = sorted([peers[(i - 1) % 4], peers[(i + 1) % 4]])
        assert status["neighbours"] == ring_neighbours
        assert status["rounds_done"] == 12
        assert status["accuracy"] >= 0.8, status["accuracy"]
        transport, protocol = node.transport, node.protocol
        assert isinstance(transport, RecordingTransport) and isinstance(protocol, DPSGD)
        assert sorted(transport.model_sends) == ring_neighbours
        assert all(count == 12 for count in transport.model_sends.values())
        assert protocol.weights == pytest.approx({p: 1 / 3 for p in ring_neighbours})


# -------------------------------------------------------------------- liveness pings


class WatchedNode(Node):
    """A node whose liveness events and finished rounds a test can wait on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[Event] = []
        self.changed = asyncio.Event()

    def _handle(self, event: Event) -> None:
        if isinstance(event, PeerDown | PeerUp | SendFailed):
            self.events.append(event)
            self.changed.set()
        super()._handle(event)

    def _on_round(self, finished: int, model: torch.Tensor) -> None:
        super()._on_round(finished, model)
        self.changed.set()

    async def until(self, condition, timeout: float) -> None:
        while not condition():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), timeout)


def test_pings_notice_a_dead_link_with_no_send_pending_and_its_recovery(tmp_path):
    ids = identities(3)
    peers = [ident.peer_id for ident in ids]
    network = MemoryNetwork(seed=1)
    nodes = []
    for i, ident in enumerate(ids):
        raw = base_config(
            tmp_path,
            i,
            3,
            [] if i == 0 else [memory_addr(peers[0])],
            ping_interval=0.05,
            ping_timeout=1.0,
            ping_failures=2,
        )
        # after round 0 every node waits (pacing) before training again: no send is pending
        raw.update(rounds=1000, min_round_interval=600.0)
        nodes.append(
            WatchedNode(
                NodeConfig.model_validate(raw), MemoryTransport(network, ident.peer_id), ident
            )
        )
    watcher, victim = nodes[0], peers[1]

    def liveness(kind: type[PeerDown | PeerUp]) -> list[str]:
        return [e.peer for e in watcher.events if isinstance(e, kind)]

    async def scenario() -> None:
        runs = asyncio.gather(*(node.run() for node in nodes))
        try:
            for node in nodes:
                await node.until(lambda node=node: node.rounds_done >= 1, 60)
            assert watcher.events == []
            network.cut(peers[0], victim)
            await watcher.until(lambda: victim in liveness(PeerDown), 10)
            assert watcher.transport.stats()["send_failures"] == 0  # found by pings alone
            dpsgd = watcher.protocol
            assert isinstance(dpsgd, DPSGD)
            assert victim not in dpsgd.alive
            assert watcher.status()["peers_down"] == [victim]
            assert peers[2] not in liveness(PeerDown)  # a healthy link stays up
            network.restore(peers[0], victim)
            await watcher.until(lambda: victim in liveness(PeerUp), 10)
            dpsgd = watcher.protocol
            assert isinstance(dpsgd, DPSGD)
            assert victim in dpsgd.alive and watcher.status()["peers_down"] == []
        finally:
            for node in nodes:
                node.stop()
            await asyncio.wait_for(runs, 30)

    asyncio.run(scenario())


# -------------------------------------------------------------------- mDNS


@pytest.mark.slow
def test_nodes_find_each_other_by_mdns_without_bootstrap(tmp_path):
    from p2pfl.transport.libp2p import Libp2pTransport

    ids = identities(3)
    nodes = []
    for i, ident in enumerate(ids):
        raw = base_config(tmp_path, i, 3, [], mdns=True)
        raw.update(rounds=2)
        raw["network"]["listen"] = ["/ip4/127.0.0.1/tcp/0"]
        transport = Libp2pTransport(ident.libp2p_keypair, mdns=True)
        nodes.append(Node(NodeConfig.model_validate(raw), transport, ident))

    async def scenario() -> list[dict]:
        return await asyncio.wait_for(asyncio.gather(*(node.run() for node in nodes)), 90)

    statuses = asyncio.run(scenario())
    everyone = sorted(ident.peer_id for ident in ids)
    for ident, status in zip(ids, statuses, strict=True):
        assert status["known_peers"] == [p for p in everyone if p != ident.peer_id]
        assert status["rounds_done"] == 2
