"""Discovery and liveness on their own: driven without a node, a protocol or a guard.

The node's tests cover them end to end; these pin down the contract each offers the
node (what it reports, when, and what it keeps) with a stand-in transport.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from p2pfl.config import NodeNetworkConfig
from p2pfl.discovery import HELLO, MAX_ADDRS_PER_PEER, Discovery
from p2pfl.liveness import Liveness
from p2pfl.messages import Message
from p2pfl.transport.base import Transport, TransportError


class StandIn:
    """The few transport calls discovery and liveness make; ``dead`` peers fail pings."""

    listen_addrs = ["/memory/me"]

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.dialled: list[str] = []

    async def ping(self, peer: str, *, timeout: float) -> None:
        if peer in self.dead:
            raise TransportError("no answer")

    async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
        self.dialled.append(addr)
        return addr.rsplit("/", 1)[-1]

    def known_addrs(self) -> dict[str, list[str]]:
        return {}


def liveness_for(transport: StandIn, **settings: Any) -> Liveness:
    """A Liveness over ``transport`` with quiet defaults (nobody is watched, nothing runs,
    every peer may return, changes ignored); ``settings`` replace any of them."""
    options: dict[str, Any] = {
        "interval": 60.0,
        "timeout": 0.1,
        "failures": 2,
        "watched": lambda: [],
        "running": lambda: False,
        "may_return": lambda peer: True,
        "on_down": lambda peer: None,
        "on_up": lambda peer: None,
    }
    return Liveness(cast(Transport, transport), **(options | settings))


def test_liveness_reports_down_after_misses_and_up_on_the_first_answer() -> None:
    transport = StandIn()
    events: list[tuple[str, str]] = []
    banned: set[str] = set()
    stop = False

    liveness = liveness_for(
        transport,
        interval=0.001,
        watched=lambda: ["a", "b", "c"],
        running=lambda: not stop,
        may_return=lambda peer: peer not in banned,
        on_down=lambda peer: events.append(("down", peer)),
        on_up=lambda peer: events.append(("up", peer)),
    )
    transport.dead = {"a", "c"}
    liveness.mark_down("b")  # a failed send: b's next answer brings it back
    banned.add("c")

    async def until(done: Any) -> None:
        while not done():
            await asyncio.sleep(0.001)

    async def scenario() -> None:
        nonlocal stop
        task = asyncio.create_task(liveness.run())
        await asyncio.wait_for(until(lambda: ("down", "c") in events), 5)
        await asyncio.sleep(0.02)  # more misses: reported once only
        transport.dead = set()  # everyone answers from now on
        await asyncio.wait_for(until(lambda: ("up", "a") in events), 5)
        await asyncio.sleep(0.02)  # c answers too, but stays down (banned)
        stop = True
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert events[0] == ("up", "b")
    assert events.count(("down", "a")) == 1 and events.count(("down", "c")) == 1
    assert ("up", "a") in events and ("up", "c") not in events  # c is banned: stays down
    assert events.index(("down", "a")) < events.index(("up", "a"))
    assert liveness.down == {"c"}


def test_a_hello_meets_its_sender_only_and_notes_bounded_addresses() -> None:
    transport = StandIn()
    sent: list[tuple[str, Message]] = []
    spawned: list[Any] = []

    async def send(peer: str, message: Message) -> None:
        sent.append((peer, message))

    def spawn(coroutine: Any) -> None:
        spawned.append(coroutine)

    discovery = Discovery(
        "me",
        cast(Transport, transport),
        NodeNetworkConfig(),
        graph=None,
        send=send,
        spawn=spawn,
    )
    assert discovery.on_hello("x", {"addrs": "not a map"}) == "malformed"
    assert discovery.met == set()
    addrs = {"y": [f"/memory/{k}/y" for k in range(10)], "me": ["/memory/me"], "z": [1, 2]}
    assert discovery.on_hello("x", {"addrs": addrs, "reply": True}) == "new"
    assert discovery.on_hello("x", {"addrs": {}}) == "known"
    assert discovery.met == {"x"}  # y and z are only heard of
    assert set(discovery.known) == {"x", "y", "z"}
    assert len(discovery.known["y"]) == MAX_ADDRS_PER_PEER and discovery.known["z"] == []
    assert discovery.saved() == {"x": []}  # a checkpoint keeps the met peers only

    async def run_spawned() -> None:
        await asyncio.gather(*spawned)

    asyncio.run(run_spawned())  # a dial-and-greet of y, the reply to x
    assert transport.dialled == ["/memory/0/y"]
    assert sorted(peer for peer, _ in sent) == ["x", "y"]
    assert all(message.kind == HELLO for _, message in sent)
    reply = next(message for peer, message in sent if peer == "x")
    assert reply.meta["reply"] is False and reply.meta["addrs"] == {"me": ["/memory/me"]}


def test_a_ping_waits_out_the_backlog_to_its_peer_on_top_of_the_timeout() -> None:
    """A ping behind a model on a slow link is not a dead peer: its deadline is
    ``timeout`` plus what the node still has queued to that peer (the send budget's
    backlog), so only ``slow`` (nothing queued) misses its deadline here."""
    asked: dict[str, float] = {}

    class Measured(StandIn):
        async def ping(self, peer: str, *, timeout: float) -> None:
            asked[peer] = timeout
            if timeout < 0.5:  # the answer takes 0.5 s (queued behind a model)
                raise TransportError("timed out")

    liveness = liveness_for(
        Measured(),
        interval=0.001,
        failures=1,
        watched=lambda: ["busy", "slow"],
        running=lambda: True,
        backlog=lambda peer: 2.0 if peer == "busy" else 0.0,
    )

    async def both() -> list[bool]:
        return [await liveness.ping("busy"), await liveness.ping("slow")]

    assert asyncio.run(both()) == [True, False]
    assert asked == {"busy": 2.1, "slow": 0.1}


def test_a_neighbour_just_heard_from_is_not_pinged_and_counts_as_alive() -> None:
    """Models flowing faster than the ping interval stand in for pings: a neighbour heard
    from within the last interval is not pinged and is not counted as a miss, even if it
    would not answer a ping now; one that falls silent is pinged again and reported down
    after ``failures`` misses; a peer already down is pinged whatever it sends."""
    pinged: list[str] = []

    class Counting(StandIn):
        async def ping(self, peer: str, *, timeout: float) -> None:
            pinged.append(peer)
            await super().ping(peer, timeout=timeout)

    transport = Counting()
    transport.dead = {"chatty", "silent", "downed"}  # no ping gets an answer
    events: list[tuple[str, str]] = []
    stop = False
    liveness = liveness_for(
        transport,
        interval=0.05,
        timeout=0.01,
        watched=lambda: ["chatty", "silent", "downed"],
        running=lambda: not stop,
        on_down=lambda peer: events.append(("down", peer)),
        on_up=lambda peer: events.append(("up", peer)),
    )
    liveness.mark_down("downed")

    async def scenario() -> None:
        nonlocal stop
        task = asyncio.create_task(liveness.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not task.done() and loop.time() < deadline:
            liveness.heard_from("chatty")  # its models keep arriving
            liveness.heard_from("downed")  # sends, but our sends to it failed
            stop = ("down", "silent") in events  # the task ends after its next interval
            await asyncio.sleep(0.005)
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert ("down", "silent") in events
    assert "chatty" not in pinged and ("down", "chatty") not in events
    assert pinged.count("silent") >= 2 and pinged.count("downed") >= 2
    assert liveness.pings_skipped >= 2 and liveness.down == {"silent", "downed"}


def test_heard_from_is_bounded_against_a_flood_of_identities() -> None:
    """Every authenticated sender is noted, neighbour or not: a flood of fresh identities
    keeps at most ``MAX_HEARD`` entries, and a neighbour heard before the flood stays."""
    from p2pfl.liveness import MAX_HEARD

    liveness = liveness_for(StandIn(), watched=lambda: ["n"])
    liveness.heard_from("n")
    for index in range(3 * MAX_HEARD):
        liveness.heard_from(f"stranger{index}")
    assert len(liveness._heard) == MAX_HEARD and "n" in liveness._heard
    off = liveness_for(StandIn(), interval=0.0)  # pings off: nothing is noted at all
    off.heard_from("n")
    assert off._heard == {}
