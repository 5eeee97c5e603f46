"""Issue 12: one hostile message cannot stop, poison or stall a cluster of real nodes.

Each attack of the issue is replayed against in-process nodes over the memory transport
(a process adds nothing: the node's receive path, guard and protocol are the same code),
next to an undisturbed run of the same cluster with the same seeds. Every test asserts
that the honest nodes finish all their rounds, end within a stated margin of the
undisturbed accuracy, and that the node counted the refusal under the right reason,
charged to the sender.

D-PSGD: the insider is a real fifth node that met everyone in discovery (a true
neighbour, it sends its honest model every round). In the attacked run it sends one
crafted model per honest node, signed with its own key and numbered from its own
sequence, just before its honest model of ``ATTACK_ROUND``; nothing else differs. A
complete graph with a long round timeout makes the runs repeat (every round waits for
every neighbour), so the 0.02 bound of the issue applies as it is.

MoDeST: the attacker holds any key at all (it is not a member of anyone's view) and
talks to every honest node over its own memory transport endpoint; the forged rounds and
the view flood are also sent by a member (node 4 turned), which the sender rules let
through, so the protocol's own checks are what is tested there. MoDeST's samples follow
timing, so its runs vary more; the baseline and bound used are stated at
``BASELINE_RUNS``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from p2pfl.node import Node
from p2pfl.protocols.base import Message, Send
from p2pfl.protocols.modest.protocol import ModestProtocol
from p2pfl.transport.memory import MemoryTransport
from p2pfl.wire import encode
from tests.hostile import Crafter, on_round
from tests.test_node_attacks import make_nodes

pytestmark = pytest.mark.timeout(150)

#: the issue's bound on how far the attacked honest nodes may end below the undisturbed run
MARGIN = 0.02

# ------------------------------------------------------------------------------- D-PSGD

DPSGD_ROUNDS = 12
#: the round whose model the insider precedes with a crafted one (mid-run, after warm-up)
ATTACK_ROUND = 2
#: a timeout no round gets near: rounds end when every neighbour's model is in, so the
#: mix of every round is the same in both runs whatever the thread timing
DPSGD = {"name": "dpsgd", "local_steps": 10, "round_timeout": 30.0}
INSIDER = 4  # the fifth node; nodes 0-3 are the honest ones checked


def _poisons(dim: int) -> dict[str, tuple[torch.Tensor, str]]:
    """The insider's crafted models and the reason each must be refused with.

    A float64 ``1e300`` is finite, so only the dtype rule catches it (in float32 it is
    Inf); ``3e38`` is a finite float32 that overflows any sum of two; an int64 model
    would be promoted into the mix; a ``(d, 1)`` tensor has the right element count and
    made ``torch.stack`` raise in the round timer, which stalled every node.
    """
    huge = torch.zeros(dim, dtype=torch.float64)
    huge[dim // 2] = 1e300
    return {
        "float64_1e300": (huge, "bad_tensor"),
        "float32_3e38": (torch.full((dim,), 3e38, dtype=torch.float32), "too_large"),
        "int64": (torch.ones(dim, dtype=torch.int64), "bad_tensor"),
        "shape_d_by_1": (torch.zeros(dim, 1), "bad_tensor"),
    }


def _arm_insider(node: Node, attack: str) -> set[str]:
    """Make ``node`` send the ``attack`` model to each peer just before its model of
    ``ATTACK_ROUND``.

    The crafted message is a genuine message of the insider (its key, its next sequence
    number, the round it is in), so the envelope checks pass and only the dtype and
    shape rules and the protocol's contract stand between it and the mix. Returns the
    peers it was sent to (filled in as the run goes).
    """
    poison, _ = _poisons(node.trainer.dim)[attack]
    original = node._send_soon
    hit: set[str] = set()

    def send_soon(effect: Send) -> None:
        peer, message = effect.to, effect.message
        if message.round != ATTACK_ROUND or peer in hit:
            original(effect)
            return
        hit.add(peer)
        crafted = Message(message.kind, message.round, poison, dict(message.meta))
        data = encode(crafted, identity=node.identity, protocol="dpsgd", seq=node.seq.next())
        # the genuine model once the crafted one is acknowledged: it arrives first
        node.transport.send_soon(
            peer, data, timeout=node.config.network.send_timeout, done=lambda _: original(effect)
        )

    node._send_soon = send_soon  # type: ignore[method-assign]
    return hit


def _run_dpsgd(tmp_path, attack: str | None) -> tuple[list[dict], set[str]]:
    """Five D-PSGD nodes, complete graph; node ``INSIDER`` armed with ``attack``, if any."""
    nodes = make_nodes(tmp_path, 5, DPSGD, rounds=DPSGD_ROUNDS)
    hit = _arm_insider(nodes[INSIDER], attack) if attack is not None else set()

    async def run() -> list[dict]:
        return await asyncio.wait_for(asyncio.gather(*(node.run() for node in nodes)), 100)

    statuses = asyncio.run(run())
    insider = nodes[INSIDER].peer_id
    for status in statuses[:INSIDER]:
        assert insider in status["neighbours"]  # a true neighbour, not a stranger
    return statuses, hit


@pytest.fixture(scope="module")
def dpsgd_undisturbed(tmp_path_factory) -> list[float]:
    """The honest nodes' accuracies without the attack (shared by the four attacks).

    Observed, 12 rounds on 2 busy cores, over 5 runs: 0.8583 on every node, every run
    (a complete graph mixes the same models everywhere; the runs repeat exactly).
    """
    statuses, _ = _run_dpsgd(tmp_path_factory.mktemp("dpsgd_undisturbed"), None)
    for status in statuses:
        assert status["rounds_done"] == DPSGD_ROUNDS
        assert status["counters"].get("round_timeouts", 0) == 0
    return [status["accuracy"] for status in statuses[:INSIDER]]


@pytest.mark.parametrize("attack", list(_poisons(2)))
def test_dpsgd_insider_bad_model_is_refused_and_counted(
    tmp_path, dpsgd_undisturbed: list[float], attack: str
) -> None:
    """One crafted model per honest node from a neighbour: refused, counted, no harm done.

    Before issue 12: NaN everywhere (accuracy 0.10) and honest nodes banning each other
    for the first three; every node stalled at round 0-1 for the ``(d, 1)`` shape.
    """
    _, reason = _poisons(2)[attack]
    statuses, hit = _run_dpsgd(tmp_path, attack)
    insider = statuses[INSIDER]["peer_id"]
    honest = statuses[:INSIDER]
    assert hit == {status["peer_id"] for status in honest}
    accuracies = [status["accuracy"] for status in honest]
    print(attack, "undisturbed", dpsgd_undisturbed, "attacked", accuracies)
    for status, before in zip(honest, dpsgd_undisturbed, strict=True):
        assert status["rounds_done"] == DPSGD_ROUNDS, status
        assert status["counters"].get("round_timeouts", 0) == 0, status["counters"]
        assert abs(status["accuracy"] - before) <= MARGIN, (accuracies, dpsgd_undisturbed)
        guard = status["guard"]
        assert guard["dropped"][reason] == 1, guard["dropped"]
        # charged to the insider (one refusal: no ban), and to no one else: the honest
        # nodes never got a bad model to pass on, so they never refuse each other
        assert guard["peers"][insider]["dropped"] == {reason: 1}, guard["peers"][insider]
        others = {p: v["dropped"] for p, v in guard["peers"].items() if p != insider}
        assert not any(others.values()), others
        assert guard["bans"] == 0, guard
        # every neighbour's genuine model of every round got in, the insider's included
        assert status["counters"]["received_models"] == DPSGD_ROUNDS * 4, status["counters"]


# ------------------------------------------------------------------------------- MoDeST

MODEST_ROUNDS = 20
#: every node is sampled and aggregates every round, each aggregator waits for all five
#: models and nothing times out: the aggregates are equal whichever arrives first, so a
#: run does not depend on timing (as in tests/test_drivers_equivalent.py) and an attacked
#: run can be held to the undisturbed one; the roles are still checked (a stranger is
#: no member, a member's far-ahead claims still need a quorum)
MODEST = {
    "name": "modest",
    "sample_size": 5,
    "num_aggregators": 5,
    "local_steps": 10,
    "success_fraction": 1.0,
    "ping_timeout": 5.0,
    "aggregation_timeout": 10.0,
    "idle_timeout": 20.0,
}
#: the round of node 0 at which the attacker strikes
MODEST_ATTACK_AT = 3
#: With one aggregator out of a sample of three, MoDeST's samples followed timing and
#: runs of the same seeds differed (node accuracies 0.80-0.93 over 15 runs), which made a
#: 0.02 bound flaky on loaded machines; with the settings above the undisturbed runs
#: agree (checked: ``BASELINE_RUNS`` of them). An attacked run must be within the
#: issue's 0.02 of the worst of them in its worst node, its median node and its best
#: node; a poisoned adoption (0.10) or a jump to round 10^6 is far outside.
BASELINE_RUNS = 2
#: an undisturbed 20-round run takes 0.5-4 s here; a run slowed as in the issue (huge
#: views: minutes) is stopped after this many seconds and fails its asserts
MODEST_RUN_LIMIT = 30.0


@dataclass
class ModestRun:
    """What a MoDeST cluster run left: statuses, nodes, times, and whether it hung."""

    statuses: list[dict]
    nodes: list[Node]
    stranger: str  # the attacker's peer id
    wall: float  # seconds from start to the last node's end (or to the stop)
    timed_out: bool  # the run did not end by itself in ``MODEST_RUN_LIMIT`` seconds
    stop_s: float | None  # seconds from ``stop()`` on every node to the last one down


async def _modest_cluster(
    tmp_path,
    attack: Callable[[Crafter, MemoryTransport, list[Node]], Any] | None,
    *,
    rounds: int = MODEST_ROUNDS,
    stop_after: int | None = None,
) -> ModestRun:
    """Five MoDeST nodes; once node 0 has done round 3, ``attack`` strikes, once.

    ``attack(crafter, transport, nodes)`` sends the hostile messages (awaited if a
    coroutine). ``stop_after``: call ``stop()`` on every node (what SIGTERM does) once
    node 0 has done that many more rounds after the attack, or after
    ``MODEST_RUN_LIMIT`` seconds if it never does. A run that does not end by itself
    within ``MODEST_RUN_LIMIT`` is stopped the same way, so a hung cluster fails the
    assertions with its statuses instead of a bare time-out.
    """
    nodes = make_nodes(tmp_path, 5, MODEST, rounds=rounds)
    crafter = Crafter("modest-stranger")
    assert isinstance(nodes[0].transport, MemoryTransport)
    rogue = MemoryTransport(nodes[0].transport.network, crafter.peer_id)
    rogue.set_handler(lambda sender, data: None)  # takes what it gets, answers nothing
    await rogue.start()
    strike, stop = asyncio.Event(), asyncio.Event()

    def on_node0_round(finished: int) -> None:
        if finished + 1 >= MODEST_ATTACK_AT:
            strike.set()
        if stop_after is not None and finished + 1 >= MODEST_ATTACK_AT + stop_after:
            stop.set()

    on_round(nodes[0], on_node0_round)
    started = time.monotonic()
    runs = [asyncio.ensure_future(node.run()) for node in nodes]
    everyone = asyncio.gather(*runs)
    timed_out, stop_s = False, None
    try:
        if attack is not None:
            await asyncio.wait_for(strike.wait(), 30)
            for node in nodes:
                await rogue.connect(f"/memory/{node.peer_id}/p2p/{node.peer_id}")
            outcome = attack(crafter, rogue, nodes)
            if asyncio.iscoroutine(outcome):
                await outcome
        waited = stop.wait() if stop_after is not None else asyncio.shield(everyone)
        try:
            await asyncio.wait_for(waited, MODEST_RUN_LIMIT - (time.monotonic() - started))
        except TimeoutError:
            timed_out = True
        if stop_after is not None or timed_out:
            stopping = time.monotonic()
            for node in nodes:
                node.stop()
            await asyncio.wait_for(asyncio.shield(everyone), 15)
            stop_s = time.monotonic() - stopping
        statuses = everyone.result()
        return ModestRun(
            statuses, nodes, crafter.peer_id, time.monotonic() - started, timed_out, stop_s
        )
    finally:
        for node in nodes:
            node.stop()
        await asyncio.gather(*runs, return_exceptions=True)
        await rogue.close()


async def _send_each(
    crafter: Crafter,
    rogue: MemoryTransport,
    nodes: list[Node],
    make: Callable[[Node], Message],
) -> None:
    """Send one message, built for each node from its current state, to every node."""
    for node in nodes:
        data = encode(
            make(node), identity=crafter.identity, protocol="modest", seq=crafter.next_seq()
        )
        await rogue.send(node.peer_id, data, timeout=5.0)


def _round(node: Node) -> int:
    assert node.protocol is not None
    return node.protocol.round


def _zeros(node: Node) -> torch.Tensor:
    return torch.zeros(node.trainer.dim)


def _poisoned(node: Node) -> torch.Tensor:
    """A model far from anything trained, but inside every magnitude bound."""
    return torch.full((node.trainer.dim,), 50.0)


MODEST_ATTACKS: dict[str, tuple[Callable[[Node], Message], str]] = {
    # "you are late, the system is at round R + 10^6": every node jumped there and exited
    "status_far_ahead": (
        lambda n: Message(
            "status", _round(n), None, {"at": _round(n) + 10**6, "done": _round(n) + 10**6}
        ),
        "not_allowed",
    ),
    # the same inside the guard's round window, where only the sender's role can refuse it
    "status_999_ahead": (
        lambda n: Message(
            "status", _round(n), None, {"at": _round(n) + 999, "done": _round(n) + 999}
        ),
        "not_allowed",
    ),
    # zeros tagged R + 500: every node adopted them and exited at round 512, accuracy 0.10
    "train_zeros_500_ahead": (
        lambda n: Message("train", _round(n) + 500, _zeros(n), {}),
        "not_allowed",
    ),
    # a poisoned model tagged R + 1: adopted as the receiver's own model
    "train_poisoned_next_round": (
        lambda n: Message("train", _round(n) + 1, _poisoned(n), {}),
        "not_allowed",
    ),
}


@dataclass
class Baseline:
    """The undisturbed MoDeST runs: the worst of them is what an attacked run must match."""

    runs: list[list[float]]  # node accuracies, per run
    walls: list[float]

    def worst(self, pick: Callable[[list[float]], float]) -> float:
        """The lowest, over the runs, of ``pick(accuracies)``."""
        return min(pick(accuracies) for accuracies in self.runs)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@pytest.fixture(scope="module")
def modest_undisturbed(tmp_path_factory) -> Baseline:
    """Undisturbed runs of the same cluster, for the bounds (see ``BASELINE_RUNS``)."""
    baseline = Baseline([], [])
    for i in range(BASELINE_RUNS):
        run = asyncio.run(_modest_cluster(tmp_path_factory.mktemp(f"modest_undisturbed{i}"), None))
        assert not run.timed_out
        for status in run.statuses:
            assert status["rounds_done"] >= MODEST_ROUNDS, status
        baseline.runs.append([status["accuracy"] for status in run.statuses])
        baseline.walls.append(run.wall)
    print("modest undisturbed", [[round(a, 3) for a in r] for r in baseline.runs], baseline.walls)
    # the settings make a run independent of timing: the undisturbed runs agree
    assert max(baseline.runs[0]) - min(baseline.runs[0]) <= 0.01, baseline.runs
    assert all(abs(a - b) <= 0.01 for a, b in zip(*baseline.runs, strict=True)), baseline.runs
    return baseline


def _assert_modest_unharmed(run: ModestRun, baseline: Baseline, label: str) -> None:
    """All honest nodes did their rounds, in normal time, no more, and learnt as well."""
    accuracies = [status["accuracy"] or 0.0 for status in run.statuses]
    progress = [(s["rounds_done"], s["round"]) for s in run.statuses]
    print(label, "attacked", [round(a, 3) for a in accuracies], "wall", round(run.wall, 1))
    assert not run.timed_out, (label, "hung", progress, run.wall)
    for node, status in zip(run.nodes, run.statuses, strict=True):
        assert status["rounds_done"] >= MODEST_ROUNDS, progress
        # a node may go on a few rounds while it waits for its last sample to end (up to
        # 35 observed); a forged round drags it hundreds of rounds ahead
        assert status["round"] <= MODEST_ROUNDS + MODEST_OVERRUN, progress
        assert (
            isinstance(node.protocol, ModestProtocol)
            and node.protocol.done_round <= MODEST_ROUNDS + MODEST_OVERRUN
        )
    for pick in (min, _median, max):
        assert pick(accuracies) >= baseline.worst(pick) - MARGIN, (accuracies, baseline.runs)


#: how many rounds past the target a MoDeST node may be when it stops (see above)
MODEST_OVERRUN = 50


@pytest.mark.parametrize("attack", list(MODEST_ATTACKS))
def test_modest_stranger_forged_round_or_model_is_refused(
    tmp_path, modest_undisturbed: Baseline, attack: str
) -> None:
    """One message per honest node, from a key that is in nobody's view."""
    make, reason = MODEST_ATTACKS[attack]
    run = asyncio.run(_modest_cluster(tmp_path, lambda c, t, ns: _send_each(c, t, ns, make)))
    _assert_modest_unharmed(run, modest_undisturbed, attack)
    for node, status in zip(run.nodes, run.statuses, strict=True):
        assert status["guard"]["peers"][run.stranger]["dropped"] == {reason: 1}, status["guard"]
        assert isinstance(node.protocol, ModestProtocol) and run.stranger not in node.protocol.view


#: the issue's view flood: 20,000 unsigned bottom entries for made-up names
VIEW_FLOOD = 20_000


def _view_flood(node: Node) -> Message:
    names = {f"12D3KooWmadeUp{i:08d}": [0, 0, 0] for i in range(VIEW_FLOOD)}
    return Message("view", 0, None, {"view": names, "at": _round(node), "done": _round(node) - 1})


#: the member who turns: node 4 of the cluster, honest in every other respect (it runs
#: in the undisturbed runs too, so the clusters compared are the same)
MEMBER = 4


async def _send_as_member(nodes: list[Node], make: Callable[[Node], Message]) -> None:
    """Send one message to every other node as ``MEMBER``: its key, its next seq number."""
    insider = nodes[MEMBER]
    for node in nodes:
        if node is not insider:
            data = encode(
                make(node), identity=insider.identity, protocol="modest", seq=insider.seq.next()
            )
            await insider.transport.send(node.peer_id, data, timeout=5.0)


@pytest.mark.parametrize(
    "attack", ["status_far_ahead", "status_999_ahead", "train_zeros_500_ahead"]
)
def test_modest_member_forged_round_moves_nobody(
    tmp_path, modest_undisturbed: Baseline, attack: str
) -> None:
    """The same forged rounds from a member, whom the sender rule lets through.

    R + 10^6 is beyond the contract's round lead: refused as ``future_round``. R + 999
    (status) and R + 500 (a train, the member being a plausible aggregator) are inside
    it; the protocol then moves only as far as a quorum of members vouched, and holds
    the lone claim as pending (``modest.claims_pending``; honest claims ahead of a
    node's vouched round are counted there too, so only its presence is asserted).
    The poisoned ``train`` tagged R + 1 is left out here: a member may really be the
    aggregator of R + 1, and a Byzantine aggregator is the robust aggregators' business.
    """
    make, _ = MODEST_ATTACKS[attack]
    run = asyncio.run(_modest_cluster(tmp_path, lambda c, t, ns: _send_as_member(ns, make)))
    _assert_modest_unharmed(run, modest_undisturbed, f"member {attack}")
    insider = run.nodes[MEMBER].peer_id
    for status in run.statuses[:MEMBER]:
        refused = status["guard"]["peers"].get(insider, {}).get("dropped", {})
        if attack == "status_far_ahead":
            assert refused == {"future_round": 1}, status["guard"]["peers"].get(insider)
        else:
            assert status["counters"].get("modest.claims_pending", 0) >= 1, status["counters"]


def _flood_refused(run: ModestRun, sender: str, status: dict) -> bool:
    """Whether a node refused the flood and counted it, by the right reason.

    From a stranger the whole message is refused (a ``view`` only comes from a member or
    a peer we announced our join to): ``not_allowed``. From a member the message is
    accepted but none of the 20,000 unproven entries is: ``modest.entries_refused``.
    """
    refused = status["guard"]["peers"].get(run.stranger, {}).get("dropped", {})
    if sender == "stranger":
        return refused == {"not_allowed": 1}
    return status["counters"].get("modest.entries_refused", 0) >= VIEW_FLOOD


@pytest.mark.parametrize("sender", ["stranger", "member"])
def test_modest_view_flood_keeps_views_bounded_and_nodes_responsive(
    tmp_path, modest_undisturbed: Baseline, sender: str
) -> None:
    """A ``view`` of 20,000 unsigned made-up entries: not admitted, rounds at normal pace.

    Before issue 12 every view grew to 20,005 entries (1 MB checkpoints), 16-25 of 40
    rounds took 420 s instead of 10 s, and 4 of 5 nodes ignored SIGTERM.
    """

    async def flood(crafter: Crafter, rogue: MemoryTransport, nodes: list[Node]) -> None:
        if sender == "stranger":
            await _send_each(crafter, rogue, nodes, _view_flood)
        else:
            await _send_as_member(nodes, _view_flood)

    run = asyncio.run(_modest_cluster(tmp_path, flood))
    views = [
        len(node.protocol.view) if isinstance(node.protocol, ModestProtocol) else None
        for node in run.nodes
    ]
    print(sender, "view_flood views", views)
    assert all(size is not None and size <= len(run.nodes) for size in views), views
    _assert_modest_unharmed(run, modest_undisturbed, f"{sender} view_flood")
    assert run.wall <= 2 * max(modest_undisturbed.walls) + 10, run.wall
    receivers = run.statuses if sender == "stranger" else run.statuses[:MEMBER]
    for status in receivers:
        assert _flood_refused(run, sender, status), (status["guard"], status["counters"])

    # the flood does not keep a node from stopping (what SIGTERM does): a long run,
    # flooded at round 3 and stopped two rounds later, is down within seconds
    run = asyncio.run(_modest_cluster(tmp_path / "stop", flood, rounds=1000, stop_after=2))
    views = [
        len(node.protocol.view) if isinstance(node.protocol, ModestProtocol) else None
        for node in run.nodes
    ]
    print(sender, "view_flood (stopped run) views", views, "stop took", run.stop_s)
    assert not run.timed_out, f"node 0 did not do 2 rounds in {MODEST_RUN_LIMIT:.0f} s"
    assert run.stop_s is not None and run.stop_s <= 5.0, run.stop_s
    assert all(status["rounds_done"] < 1000 for status in run.statuses)
    assert all(size is not None and size <= len(run.nodes) for size in views), views
