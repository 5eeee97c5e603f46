"""The asyncio node over the in-memory transport: convergence, crash and resume, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.nodecli import NodeConfigError, load_node_config
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport

pytestmark = pytest.mark.timeout(120)


def node_config(tmp_path, index: int, n: int, bootstrap: list[str], **extra) -> NodeConfig:
    raw = {
        "seed": 5,
        "rounds": 20,
        "state_dir": str(tmp_path / f"node{index}"),
        "peer_index": index,
        "num_peers": n,
        "data": {"dataset": "digits", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
        "protocol": {"name": "dpsgd", "local_steps": 10, "round_timeout": 2.0},
        "network": {"bootstrap": bootstrap, "min_peers": n - 1, "discovery_timeout": 20.0},
    }
    raw.update(extra)
    return NodeConfig.model_validate(raw)


def make_nodes(tmp_path, n: int, network: MemoryNetwork, **extra) -> list[Node]:
    identities = [Identity.generate(bytes([i + 1]) * 32) for i in range(n)]
    first = identities[0].peer_id
    nodes = []
    for i, identity in enumerate(identities):
        bootstrap = [] if i == 0 else [f"/memory/{first}/p2p/{first}"]
        transport = MemoryTransport(network, identity.peer_id)
        nodes.append(Node(node_config(tmp_path, i, n, bootstrap, **extra), transport, identity))
    return nodes


async def run_all(nodes: list[Node]) -> list[dict]:
    return await asyncio.wait_for(asyncio.gather(*(node.run() for node in nodes)), 100)


def test_four_nodes_discover_each_other_and_converge(tmp_path):
    nodes = make_nodes(tmp_path, 4, MemoryNetwork(seed=0))
    trainings = [0] * len(nodes)
    for index, node in enumerate(nodes):
        train = node._train

        def counted(effect, index=index, train=train):
            trainings[index] += 1
            return train(effect)

        node._train = counted  # type: ignore[method-assign]
    statuses = asyncio.run(run_all(nodes))
    # one training started per round: none after the last, whose model nobody waits for
    assert trainings == [20] * len(nodes)
    for status in statuses:
        assert status["rounds_done"] == 20
        assert len(status["neighbours"]) == 3  # peer exchange found everyone
        assert status["accuracy"] >= 0.85, status["accuracy"]
    on_disk = json.loads((tmp_path / "node0" / "status.json").read_text())
    # all rounds done: "finished" (issue 14; "stopped" is a node stopped before the end)
    assert on_disk["state"] == "finished" and on_disk["rounds_done"] == 20
    assert (tmp_path / "node0" / "checkpoint.pt").exists()


def test_node_resumes_from_its_checkpoint(tmp_path):
    network = MemoryNetwork(seed=1)
    nodes = make_nodes(tmp_path, 3, network, rounds=6)

    async def scenario() -> None:
        await run_all(nodes)
        # run the same three peers again for more rounds, from their state directories
        again = []
        for node in nodes:
            config = node.config.model_copy(update={"rounds": 10})
            transport = MemoryTransport(network, node.peer_id)
            again.append(Node(config, transport, node.identity))
        statuses = await run_all(again)
        for status in statuses:
            assert status["resumed_from"] == 6
            assert status["rounds_done"] == 10

    asyncio.run(scenario())


def test_garbage_is_dropped_and_counted(tmp_path):
    network = MemoryNetwork(seed=2)
    nodes = make_nodes(tmp_path, 2, network, rounds=4)
    intruder = Identity.generate(b"\x09" * 32)

    async def scenario() -> None:
        rogue = MemoryTransport(network, intruder.peer_id)
        await rogue.start()
        runs = asyncio.ensure_future(run_all(nodes))
        target = nodes[0].peer_id
        await asyncio.wait_for(nodes[0].listening.wait(), 10)
        await rogue.connect(f"/memory/{target}/p2p/{target}")
        for payload in (b"", b"\x00" * 10, b"garbage" * 100):
            await rogue.send(target, payload, timeout=5)
        statuses = await runs
        await rogue.close()
        dropped = statuses[0]["guard"]["dropped"]
        assert sum(dropped.values()) >= 3, dropped
        assert statuses[0]["rounds_done"] == 4

    asyncio.run(scenario())


def test_bad_node_config_names_the_key(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('rounds = "x"\n')
    with pytest.raises(NodeConfigError, match="rounds: Input should be a valid integer"):
        load_node_config(path, [])
    with pytest.raises(NodeConfigError, match="peer_index=3 must be < num_peers=2"):
        load_node_config(None, ["peer_index=3", "num_peers=2"])


def test_a_hostile_hello_bounds_dials_and_known_peers(tmp_path):
    """Hellos naming over a thousand peers: at most MAX_CONCURRENT_DIALS dials at once, at
    most MAX_KNOWN_PEERS strangers and MAX_ADDRS_PER_PEER addresses each remembered."""
    from p2pfl.node import MAX_ADDRS_PER_PEER, MAX_CONCURRENT_DIALS, MAX_KNOWN_PEERS
    from p2pfl.transport.base import TransportError

    class StalledDials(MemoryTransport):
        active = peak = attempts = 0

        async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
            cls = StalledDials
            cls.active += 1
            cls.attempts += 1
            cls.peak = max(cls.peak, cls.active)
            try:
                await release.wait()
            finally:
                cls.active -= 1
            raise TransportError("unreachable")

    identity = Identity.generate(b"\x01" * 32)
    node = Node(
        node_config(tmp_path, 0, 2, []), StalledDials(MemoryNetwork(), identity.peer_id), identity
    )
    fake = [Identity.generate(i.to_bytes(2, "big") * 16).peer_id for i in range(1, 1400)]

    release = asyncio.Event()  # binds to the loop that first waits on it

    async def scenario() -> None:
        for sender in range(6):  # each hello names 256 peers (the cap per hello) ...
            names = fake[sender * 230 : sender * 230 + 256]
            addrs = {p: [f"/ip4/10.0.0.{k}/tcp/1/p2p/{p}" for k in range(20)] for p in names}
            node._on_hello(fake[-1 - sender], {"addrs": addrs})
        for _ in range(50):  # let every dial task start (no time passes)
            await asyncio.sleep(0)
        assert StalledDials.peak == MAX_CONCURRENT_DIALS
        release.set()
        await asyncio.wait_for(asyncio.gather(*node._tasks), 30)

    asyncio.run(scenario())
    assert StalledDials.peak == MAX_CONCURRENT_DIALS
    assert len(node.known) <= MAX_KNOWN_PEERS + 6  # + the (connected) senders themselves
    assert all(len(a) <= MAX_ADDRS_PER_PEER for a in node.known.values())
    assert StalledDials.attempts <= MAX_KNOWN_PEERS * MAX_ADDRS_PER_PEER


def test_a_robust_rule_too_few_neighbours_can_feed_is_said_and_survived(tmp_path, caplog):
    """Krum with f = 1 needs 5 models a round; three nodes have 3 each. A node learns its
    neighbours only by discovery, so it says so once (a warning naming the key) and runs:
    every round keeps its own model (``too_few_to_aggregate``), none crashes it."""
    nodes = make_nodes(
        tmp_path, 3, MemoryNetwork(seed=3), rounds=3,
        protocol={"name": "dpsgd", "local_steps": 2, "round_timeout": 2.0,
                  "aggregator": "krum", "aggregator_params": {"f": 1}},
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="p2pfl.node"):
        statuses = asyncio.run(run_all(nodes))
    for status in statuses:
        assert status["rounds_done"] == 3 and status["failure"] is None, status
        assert status["counters"]["too_few_to_aggregate"] == 3
    warned = [r.getMessage() for r in caplog.records if "aggregator_params" in r.getMessage()]
    assert len(warned) == 3 and all("at most 3 models a round (2 neighbours" in line for line in warned)
