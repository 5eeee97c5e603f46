"""Send timeouts from message size and measured bandwidth (p2pfl.transport.send_budget).

Unit tests of the budget on a fake clock, then three in-process nodes over a memory
network whose links have a bandwidth: a transfer that would not fit a fixed timeout
gets through, and a link that stalls times out for that peer only, at a deadline set
by the measured bandwidth, while every node finishes every round.
"""

from __future__ import annotations

import asyncio
from typing import TypedDict

import pytest

from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.transport.base import TransportError
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from p2pfl.transport.send_budget import MIN_SAMPLE_BYTES, SendBudget
from tests.test_node import node_config


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_timeout_grows_with_size_and_shrinks_with_measured_bandwidth() -> None:
    clock = Clock()
    budget = SendBudget(2.0, floor=10_000, safety=4.0, ceiling=100.0, weight=0.5, clock=clock)
    # nothing measured: the floor bandwidth
    assert budget.timeout("a", 0) == 2.0
    assert budget.timeout("a", 50_000) == pytest.approx(2.0 + 50_000 / 10_000 * 4)
    assert budget.timeout("a", 10**9) == 100.0  # bounded
    # a 100 kB send that took 0.1 s: 1 MB/s measured
    ticket = budget.begin("a", 100_000)
    clock.now += 0.1
    budget.end(ticket, ok=True)
    assert budget.rate("a") == pytest.approx(1_000_000)
    assert budget.timeout("a", 100_000) == pytest.approx(2.0 + 0.1 * 4)
    assert budget.rate("b") is None and budget.timeout("b", 100_000) == pytest.approx(42.0)
    # the link slows to 250 kB/s: the estimate moves half way (weight 0.5)
    ticket = budget.begin("a", 100_000)
    clock.now += 0.4
    budget.end(ticket, ok=True)
    assert budget.rate("a") == pytest.approx(625_000)


def test_queued_bytes_count_and_failed_or_small_sends_teach_nothing() -> None:
    clock = Clock()
    budget = SendBudget(1.0, floor=1000, safety=2.0, clock=clock)
    first = budget.begin("a", 3000)
    # a second send waits behind the first: its deadline covers both
    assert budget.timeout("a", 1000) == pytest.approx(1.0 + 4000 / 1000 * 2)
    clock.now += 50.0
    budget.end(first, ok=False)  # timed out: no sample
    assert budget.rate("a") is None
    assert budget.timeout("a", 1000) == pytest.approx(1.0 + 1000 / 1000 * 2)
    small = budget.begin("a", MIN_SAMPLE_BYTES - 1)  # latency, not bandwidth
    clock.now += 10.0
    budget.end(small, ok=True)
    assert budget.rate("a") is None
    budget.forget("a")
    assert budget.timeout("a", 0) == 1.0


class BudgetParameters(TypedDict, total=False):
    """The numeric settings of :class:`SendBudget` (``base`` is required there)."""

    base: float
    floor: float
    safety: float
    ceiling: float
    weight: float


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"base": 0}, "base"), ({"base": 1, "floor": 0}, "floor"), ({"base": 1, "safety": 0.5}, "safety"),
     ({"base": 5, "ceiling": 1}, "ceiling"), ({"base": 1, "weight": 0}, "weight")],
)
def test_bad_parameters_are_refused(kwargs: BudgetParameters, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SendBudget(**kwargs)


RATE = 200_000.0  # bytes/s of every simulated link
ROUNDS = 8
STALL_AFTER = 3  # the link 0 -> 2 delivers this many large messages, then stalls


class BandwidthTransport(MemoryTransport):
    """A memory transport whose sends take size / RATE; one link stalls (never delivers).

    A send that cannot finish within its timeout waits the timeout and fails, as a
    libp2p send does when the receiver stops reading.
    """

    stall_to: str | None = None

    def __init__(self, network: MemoryNetwork, peer_id: str, rate: float = RATE) -> None:
        super().__init__(network, peer_id)
        self.rate = rate
        self.timeouts: list[tuple[str, int, float]] = []  # (peer, size, timeout) of large sends
        self.large_sent: dict[str, int] = {}
        self.timed_out: list[str] = []

    async def send(self, peer: str, data: bytes, *, timeout: float) -> None:
        if len(data) >= MIN_SAMPLE_BYTES:
            self.timeouts.append((peer, len(data), timeout))
            stalled = peer == self.stall_to and self.large_sent.get(peer, 0) >= STALL_AFTER
            needed = float("inf") if stalled else len(data) / self.rate
            if needed > timeout:
                await asyncio.sleep(timeout)
                self.timed_out.append(peer)
                self._count(send_failures=1)
                raise TransportError(f"send to {peer}: timed out")
            await asyncio.sleep(needed)
            self.large_sent[peer] = self.large_sent.get(peer, 0) + 1
        await super().send(peer, data, timeout=timeout)


def _nodes(tmp_path, transports: list[BandwidthTransport], identities: list[Identity], rounds: int,
           round_timeout: float) -> list[Node]:
    first = identities[0].peer_id
    nodes = []
    for i, (identity, transport) in enumerate(zip(identities, transports, strict=True)):
        bootstrap = [] if i == 0 else [f"/memory/{first}/p2p/{first}"]
        config = node_config(
            tmp_path, i, len(identities), bootstrap, rounds=rounds,
            model={"name": "mlp", "hidden": [128], "lr": 0.1},  # ~40 kB models
            protocol={"name": "dpsgd", "local_steps": 5, "round_timeout": round_timeout},
            # a fixed 0.1 s would fail every model at RATE: the budget scales it
            network={"bootstrap": bootstrap, "min_peers": len(identities) - 1,
                     "discovery_timeout": 20.0, "send_timeout": 0.1, "ping_interval": 0},
        )
        nodes.append(Node(config, transport, identity))
    return nodes


@pytest.mark.timeout(60)
def test_a_node_done_first_lets_its_last_model_reach_a_slower_link(tmp_path) -> None:
    """The node whose uplink is slow receives its neighbour's last model first and is
    done; it must not exit before its own last model is through, or the neighbour
    waits out its round timer for it."""
    network = MemoryNetwork(seed=4)
    identities = [Identity.generate(bytes([i + 11]) * 32) for i in range(2)]
    transports = [
        BandwidthTransport(network, identities[0].peer_id, rate=RATE / 4),  # 0.8 s per model
        BandwidthTransport(network, identities[1].peer_id),  # 0.2 s
    ]
    nodes = _nodes(tmp_path, transports, identities, rounds=3, round_timeout=10.0)

    async def run() -> list[dict]:
        return await asyncio.wait_for(asyncio.gather(*(node.run() for node in nodes)), 50)

    statuses = asyncio.run(run())
    assert [status["rounds_done"] for status in statuses] == [3, 3]
    assert [status["counters"].get("round_timeouts", 0) for status in statuses] == [0, 0]
    assert statuses[1]["counters"]["received_models"] == 3


@pytest.mark.timeout(120)
def test_a_stalled_link_times_out_for_that_peer_and_every_round_goes_on(tmp_path) -> None:
    network = MemoryNetwork(seed=3)
    identities = [Identity.generate(bytes([i + 1]) * 32) for i in range(3)]
    transports = [BandwidthTransport(network, identity.peer_id) for identity in identities]
    nodes = _nodes(tmp_path, transports, identities, rounds=ROUNDS, round_timeout=1.5)
    victim = identities[2].peer_id
    transports[0].stall_to = victim

    async def run() -> list[dict]:
        return await asyncio.wait_for(asyncio.gather(*(node.run() for node in nodes)), 100)

    statuses = asyncio.run(run())
    assert [status["rounds_done"] for status in statuses] == [ROUNDS] * 3
    assert all(status["state"] == "finished" for status in statuses)

    size = max(size for _, size, _ in transports[0].timeouts)
    assert size / RATE > 0.1  # a fixed send_timeout of 0.1 s could not carry one model
    # only the stalled link timed out: every other model got through in time
    assert set(transports[0].timed_out) == {victim}
    assert transports[1].timed_out == transports[2].timed_out == []
    to_victim = [timeout for peer, _, timeout in transports[0].timeouts if peer == victim]
    stalled = to_victim[STALL_AFTER:]
    assert stalled, to_victim  # the stalled send happened ...
    # ... and was given a deadline from the measured rate, not the floor's worst case
    measured = 0.1 + size / RATE * 4.0
    assert stalled[0] < 1.5 * measured, (stalled, measured)
    assert stalled[0] < nodes[0].send_budget.base + size / nodes[0].send_budget.floor * 4.0
    assert nodes[0].send_budget.rate(victim) == pytest.approx(RATE, rel=0.5)
    # the peer behind the stall closed its rounds by the timer; its sender did not wait
    assert statuses[2]["counters"].get("round_timeouts", 0) >= 1
    assert statuses[0]["counters"].get("round_timeouts", 0) == 0


def test_backlog_is_the_queued_bytes_over_the_rate_times_safety() -> None:
    clock = Clock()
    budget = SendBudget(1.0, floor=1000, safety=2.0, ceiling=50.0, clock=clock)
    assert budget.backlog_seconds("p") == 0.0
    first = budget.begin("p", 4000)
    assert budget.backlog_seconds("p") == 4000 / 1000 * 2.0  # the floor rate: nothing measured
    budget.begin("p", 100_000)
    assert budget.backlog_seconds("p") == 50.0  # bounded by the ceiling
    budget.end(first, ok=False)
    assert budget.backlog_seconds("p") == 50.0  # 100 kB left: 200 s, bounded
    budget.end(budget.begin("q", 10), ok=True)
    assert budget.backlog_seconds("q") == 0.0  # nothing queued once it ended
