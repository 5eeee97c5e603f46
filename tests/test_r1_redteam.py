"""Red-team pass below the learning protocol (helper r1): connection-level abuse of a real
node on loopback that the other hostile tests (``test_hostile_peer``,
``test_transport_bounds``, ``test_transport_limits``) do not reach.

Each test but the last runs two or three honest in-process nodes (``Node`` over
``Libp2pTransport``, digits data, a few rounds) and one hostile peer made of
``tests.hostile`` clients (several keys, where the attack needs them), and checks that the
honest nodes still meet and finish their rounds with the accuracy of an undisturbed run,
and that the abuse was refused and counted. Each attack succeeded before its fix (named in
its docstring): the test fails without it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import pytest
import trio
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL_ID
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.stream_muxer.yamux.yamux import FLAG_SYN, TYPE_PING, YAMUX_HEADER_FORMAT
from libp2p.utils.varint import encode_delim, encode_varint_prefixed
from multiaddr import Multiaddr

from p2pfl.config import NodeConfig
from p2pfl.messages import Message
from p2pfl.node import Node
from p2pfl.transport.libp2p import PROTOCOL_ID, Libp2pTransport
from p2pfl.wire import encode
from tests.hostile import HostileClient, gate_training, libp2p_node, tear_down

ROUNDS = 3
#: py-libp2p's swarm admits this many inbound connections at once (max_connections 300
#: minus min_connections 50, its defaults, which the transport keeps)
INBOUND_CAP = 250
#: the churning peer's keys, connecting side by side (a connect-disconnect takes ~0.2 s)
CHURN_KEYS = 20


def honest_config(
    tmp_path, run: str, index: int, bootstrap: list[str], *, size: int = 2
) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "seed": 5,
            "rounds": ROUNDS,
            "state_dir": str(tmp_path / run / f"node{index}"),
            "peer_index": index,
            "num_peers": size,
            "eval_every": ROUNDS,
            "data": {"dataset": "digits", "batch_size": 16},
            "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
            "protocol": {"name": "dpsgd", "local_steps": 10, "round_timeout": 30.0},
            "network": {
                "listen": ["/ip4/127.0.0.1/tcp/0"],
                "bootstrap": bootstrap,
                # everyone waits for everyone: who trains with whom is then the same in
                # every run (with 3 nodes, the third is met through peer exchange)
                "min_peers": size - 1,
                # long enough for the churn below on a loaded machine, short enough that a
                # node left deaf by it fails the test in reasonable time
                "discovery_timeout": 15.0,
            },
        }
    )


def inbound_slots(node: Node) -> tuple[int, int]:
    """Slots of the swarm's inbound cap in use, and inbound connections open now."""
    transport = node.transport
    assert isinstance(transport, Libp2pTransport) and transport._host is not None
    swarm: Any = transport._host.get_network()
    inbound = sum(
        1
        for conns in swarm.connections.values()
        for conn in conns
        if getattr(conn, "direction", None) == "inbound"
    )
    return int(swarm._inbound_limiter.borrowed_tokens), inbound


async def run_cluster(
    tmp_path, run: str, before_join=None, *, size: int = 2
) -> tuple[list[Node], Any]:
    """Nodes 0 .. size-1 to the end; ``before_join(node0, addr)`` runs once node 0 listens
    and before the others (which bootstrap to it) start, one at a time: each starts once
    node 0 has met the one before, so that node 0's greeting tells it of all of them."""
    nodes = [libp2p_node(honest_config(tmp_path, run, 0, [], size=size), "r1-honest-0")]
    runs = [asyncio.ensure_future(nodes[0].run())]
    try:
        await asyncio.wait_for(nodes[0].listening.wait(), 20)
        addr = nodes[0].transport.listen_addrs[0]
        report = None
        if before_join is not None:
            report = await asyncio.wait_for(before_join(nodes[0], addr), 60)
        for index in range(1, size):
            config = honest_config(tmp_path, run, index, [addr], size=size)
            nodes.append(libp2p_node(config, f"r1-honest-{index}"))
            runs.append(asyncio.ensure_future(nodes[index].run()))
            if index < size - 1:
                deadline = time.monotonic() + 20.0
                while nodes[index].peer_id not in nodes[0].met and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(*runs), 60)
        return nodes, report
    finally:
        for node in nodes:
            node.stop()
        await asyncio.gather(*runs, return_exceptions=True)


async def run_pair(tmp_path, run: str, before_join=None) -> tuple[Node, Node, Any]:
    nodes, report = await run_cluster(tmp_path, run, before_join)
    return nodes[0], nodes[1], report


async def churn(target: Node, addr: str) -> dict[str, Any]:
    """Connect and disconnect more times than the swarm's inbound cap, from fresh keys.

    Each connection completes Noise and yamux (so it is a real peer id) and is closed by
    the hostile side at once; nothing is sent. Failed connects are counted, not raised.
    """
    info = info_from_p2p_addr(Multiaddr(addr))
    per_key = INBOUND_CAP // CHURN_KEYS + 1  # 13 each: 260 connections in all
    clients = [HostileClient(f"r1-churner-{i}") for i in range(CHURN_KEYS)]
    began = time.monotonic()
    for client in clients:
        await client.__aenter__()
    try:

        async def cycle(host: Any) -> int:
            failed = 0
            for _ in range(per_key):
                try:
                    await host.connect(info)
                    await host.disconnect(info.peer_id)
                except Exception:  # noqa: BLE001 - a refused connection is the outcome counted
                    failed += 1
            return failed

        failures = await asyncio.gather(
            *(c.transport._bridge.run(cycle, c.transport._host) for c in clients)  # type: ignore[union-attr]
        )
    finally:
        for client in clients:
            await client.__aexit__()
    # the target sees each close a moment after the churner: wait (bounded) for the last
    deadline = time.monotonic() + 10.0
    while inbound_slots(target)[0] > inbound_slots(target)[1] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return {
        "connections": per_key * CHURN_KEYS,
        "failed": sum(failures),
        "slots": inbound_slots(target),
        "churn_s": time.monotonic() - began,
    }


@pytest.fixture(scope="module")
def clean_three_accuracy(tmp_path_factory) -> float:
    """The same for three nodes (the third meets the second through peer exchange)."""
    nodes, _ = asyncio.run(run_cluster(tmp_path_factory.mktemp("clean3"), "clean", size=3))
    assert all(node.status()["rounds_done"] == ROUNDS for node in nodes)
    return float(nodes[0].status()["accuracy"])


@pytest.fixture(scope="module")
def clean_accuracy(tmp_path_factory) -> float:
    """The accuracy of the same pair, undisturbed (the same seeds, so the same mixing)."""
    first, second, _ = asyncio.run(run_pair(tmp_path_factory.mktemp("clean"), "clean"))
    assert first.status()["rounds_done"] == second.status()["rounds_done"] == ROUNDS
    return float(first.status()["accuracy"])


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_connection_churn_does_not_use_up_the_inbound_cap(tmp_path, clean_accuracy):
    """Below the envelope and before any frame: a peer that opens and closes more
    connections than py-libp2p's inbound cap (250). In py-libp2p 0.8.1 each accepted
    connection kept its slot until the host stopped, so this left the node refusing every
    connection after: the honest peer that came next could not join (both nodes failed
    discovery). Not covered elsewhere: the other hostile tests open a handful of
    connections. Fixed by ``p2pfl/transport/_inbound.py``."""
    first, second, report = asyncio.run(run_pair(tmp_path, "churned", churn))

    assert report["connections"] > INBOUND_CAP
    assert report["failed"] == 0, report  # every connection was accepted, the 251st too
    in_use, inbound = report["slots"]
    assert in_use == inbound == 0, report  # closed connections hold no slot (nor a task)

    # the honest peer that came after joined, and both trained as if nothing had happened
    for node in (first, second):
        assert node.status()["rounds_done"] == ROUNDS
        assert "round_timeouts" not in node.status()["counters"]
    assert first.status()["accuracy"] == clean_accuracy
    print(f"\nchurn of {report['connections']} connections in {report['churn_s']:.1f} s; "
          f"accuracy {first.status()['accuracy']:.4f}")


#: the half-open flood's source: loopback, but not the honest nodes' 127.0.0.1
FLOOD_SOURCE = "127.0.0.2"
#: sockets the flood keeps open, more than the swarm's whole inbound cap
HALF_OPEN = 300


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """The flood's pacing between tries (not a wait for anything): ends early on ``stop``."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def hold_half_open(port: int, stop: asyncio.Event, stats: dict[str, int]) -> None:
    """One slot of the flood: a TCP connection that never starts its handshake, opened
    again whenever the node drops it (its upgrade timeout, or a refusal), until ``stop``."""
    for _ in range(200):  # bounded: at most 200 connections per slot (each >= 0.5 s)
        if stop.is_set():
            return
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(FLOOD_SOURCE, 0)
            )
        except OSError:  # refused: the accept queue is full, or the node has closed
            stats["connect_errors"] += 1
            await pause(stop, 0.5)
            continue
        stats["opened"] += 1
        opened = time.monotonic()
        # the node writes its multistream header, then nothing: read to the end (its drop)
        closed = asyncio.ensure_future(reader.read())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        stopping.cancel()
        writer.close()
        if time.monotonic() - opened < 1.0:
            # refused at once: pace the next try (the attack's pacing, not a wait for an event)
            await pause(stop, 0.5)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_half_open_flood_from_one_source_leaves_room_for_honest_peers(tmp_path, clean_accuracy):
    """Handshake slowloris: 300 TCP connections from one address that never send a
    byte (no key, no crypto), each opened again when the node drops it. py-libp2p gives
    each a slot of its 250 inbound slots for its 10 s upgrade timeout, so they took every
    slot and the honest peer bootstrapping next was refused until discovery gave up. Not
    covered elsewhere (``raw_tcp_garbage`` opens two connections, which send junk). With
    ``_inbound``'s per-source bound the flood holds half the slots and is counted as
    ``refused_connections``; the honest peer (another address) joins and both train."""
    stop = asyncio.Event()
    stats = {"opened": 0, "connect_errors": 0}
    floods: list[asyncio.Future[None]] = []

    async def flood(target: Node, addr: str) -> dict[str, Any]:
        port = int(addr.split("/tcp/")[1].split("/")[0])
        floods.extend(asyncio.ensure_future(hold_half_open(port, stop, stats)) for _ in range(HALF_OPEN))
        # the flood is in place once the node holds the most it lets one source hold and
        # has refused the rest (a few of the 300 connects wait in the accept queue a while)
        def in_place() -> bool:
            refused = target.transport.stats()["refused_connections"]
            return inbound_slots(target)[0] >= INBOUND_CAP // 2 and refused >= HALF_OPEN - INBOUND_CAP // 2

        deadline = time.monotonic() + 20.0
        while not in_place() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"slots_at_join": inbound_slots(target)[0], "in_place": in_place()}

    async def run() -> tuple[Node, Node, Any]:
        try:
            return await run_pair(tmp_path, "half-open", flood)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*floods, return_exceptions=True), 10)

    first, second, report = asyncio.run(run())
    assert report["in_place"], report  # the flood held its half of the slots when the peer came
    for node in (first, second):
        assert node.status()["rounds_done"] == ROUNDS
        assert "round_timeouts" not in node.status()["counters"]
    assert first.status()["accuracy"] == clean_accuracy
    # one source held half the slots; the rest of the flood was refused and counted
    assert first.status()["transport"]["refused_connections"] >= HALF_OPEN - INBOUND_CAP // 2
    print(f"\nhalf-open flood: {stats}; accuracy {first.status()['accuracy']:.4f}")


class _Remote:
    def __init__(self, address: tuple[str, int] | None) -> None:
        self.address = address

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.address


def test_a_source_is_an_ipv4_address_or_an_ipv6_64():
    """What the per-source bound counts together: one host can have a whole IPv6 /64."""
    from p2pfl.transport._inbound import source_of

    assert source_of(_Remote(("10.0.0.7", 4001))) == "10.0.0.7"
    assert source_of(_Remote(("2001:db8:1:2::5", 1))) == source_of(_Remote(("2001:db8:1:2:ffff::9", 2)))
    assert source_of(_Remote(("2001:db8:1:2::5", 1))) != source_of(_Remote(("2001:db8:1:3::5", 1)))
    assert source_of(_Remote(("::ffff:10.0.0.7", 1))) == "10.0.0.7"
    assert source_of(_Remote(None)) is None and source_of(object()) is None


def test_shares_refuse_a_holder_at_its_cap_and_forget_holders_at_zero():
    """The per-source bounds (connection slots, streams, relay circuits, DHT streams) all
    count with ``Shares``."""
    from p2pfl.transport._inbound import Shares

    shares: Shares[str] = Shares()
    assert [shares.take("a", 2) for _ in range(3)] == [True, True, False]
    assert shares.take("b", 2) and shares["a"] == 2 and shares["b"] == 1
    shares.give("a")
    assert shares.take("a", 2) and not shares.take("a", 2)
    shares.give("b")
    assert "b" not in shares and shares["b"] == 0
    shares.give("b")  # one more than taken: nothing goes negative
    assert "b" not in shares and dict(shares) == {"a": 2}



#: keys of the identify poisoner, and the addresses each announces (py-libp2p keeps 1,000)
POISON_KEYS = 16
POISON_ADDRS = 1000


def poisoned_identify(index: int) -> bytes:
    """An identify answer announcing ``POISON_ADDRS`` made-up addresses of ~200 characters
    (the longest DNS names a multiaddr takes), ~270 KB once a node lists them as text."""
    name = f"{'a' * 60}.{'b' * 60}.{'c' * 60}"
    message = Identify()
    message.listen_addrs.extend(
        Multiaddr(f"/dns4/{name}.h{index}-{j}.example/tcp/4001").to_bytes() for j in range(POISON_ADDRS)
    )
    return bytes(encode_varint_prefixed(message.SerializeToString()))


async def poison_peerstore(target: Node, addr: str) -> dict[str, Any]:
    """Connect from ``POISON_KEYS`` keys whose identify answers announce made-up addresses,
    wait (bounded) until the target's peerstore holds them all, and leave: py-libp2p keeps
    them for 2 hours."""
    clients = [HostileClient(f"r1-poisoner-{i}") for i in range(POISON_KEYS)]
    try:
        for index, client in enumerate(clients):
            await client.__aenter__()
            answer = poisoned_identify(index)

            async def identify(stream: Any, answer: bytes = answer) -> None:
                await stream.write(answer)
                await stream.close()

            assert client.transport._host is not None
            client.transport._host.set_stream_handler(IDENTIFY_PROTOCOL_ID, identify)
            await client.connect(addr)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            held = sum(len(a) for a in target.transport.known_addrs().values())
            if held >= POISON_KEYS * POISON_ADDRS:
                break
            await asyncio.sleep(0.1)
    finally:
        for client in clients:
            await client.__aexit__()
    known = target.transport.known_addrs()
    return {
        "addrs": sum(len(a) for a in known.values()),
        "chars": sum(len(x) for a in known.values() for x in a),
    }


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_identify_poison_does_not_make_a_nodes_greetings_too_large(tmp_path, clean_three_accuracy):
    """Peer exchange after identify poisoning: 16 keys connect to node 0, each announcing
    1,000 made-up 200-character addresses in identify, and leave. Node 0 listed its whole
    peerstore in every hello (over 4 MiB: more meta than any receiver takes), so the honest
    nodes dropped its greetings as oversized, charged honest node 0 for them, and node 2
    never heard of node 1 (with ``min_peers = 2`` it failed discovery). Not covered
    elsewhere: the discovery tests bound what a node *takes* from a hello, not what it
    sends. Fixed in ``Discovery._exchanged``."""
    nodes, report = asyncio.run(run_cluster(tmp_path, "poisoned", poison_peerstore, size=3))
    assert report["addrs"] >= POISON_KEYS * POISON_ADDRS and report["chars"] > 4 << 20, report

    ids = {node.peer_id for node in nodes}
    for node in nodes:
        status = node.status()
        assert status["rounds_done"] == ROUNDS
        assert ids - {node.peer_id} <= set(status["met_peers"])  # peer exchange worked
        assert status["guard"]["dropped"]["oversized"] == 0  # no honest greeting refused
    assert nodes[0].status()["accuracy"] == clean_three_accuracy
    print(f"\npoisoned peerstore: {report}; accuracy {nodes[0].status()['accuracy']:.4f}")



#: keys of the stream hoarder (each keeps the per-peer bound, 32 streams, open)
HOARD_KEYS = 36
HOARD_SOURCE = "127.0.0.3"
NEGOTIATION = encode_delim(b"/multistream/1.0.0") + encode_delim(PROTOCOL_ID.encode())


async def hoard_streams(host: Any, node: str, addr: str, count: int) -> None:
    """Dial ``node`` from ``HOARD_SOURCE``, open ``count`` streams, negotiate each (written
    at once, no answer awaited) and send nothing more; the streams stay open (until the
    node resets them, or cuts them as idle after ``frame_timeout``)."""
    peer = ID.from_base58(node)
    await host.get_network().dial_addr(Multiaddr(addr.rsplit("/p2p/", 1)[0]), peer, source=(HOARD_SOURCE, 0))
    conn = host.get_network().get_connections(peer)[0].muxed_conn
    for _ in range(count):
        stream = await conn.open_stream()
        try:
            await stream.write(NEGOTIATION)
        except Exception:  # noqa: BLE001 - reset already: refused
            pass


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_stream_hoarding_from_one_host_does_not_make_a_neighbour_look_dead(tmp_path, clean_accuracy):
    """Liveness under a stream-count flood: 36 keys from one host each open the per-peer
    bound of idle streams (32) on node 0 while it trains round 2. Together they held all
    1024 of its inbound streams, so node 1's pings to it were reset before negotiation:
    node 1 declared node 0 lost, stopped waiting for its models and finished alone. Not
    covered elsewhere: ``test_3000_idle_streams_on_one_connection`` uses one key, which
    the per-peer bound stops. Fixed by a per-source share of the node-wide stream bound
    (``Admission.per_source_streams``)."""
    pinged: list[bool] = []  # node 1's pings of node 0 from the flood's start on
    pinged_after: list[bool] = []  # the first three sent once the flood was in place
    enough_pings = asyncio.Event()

    async def run() -> tuple[list[Node], dict[str, Any]]:
        first = libp2p_node(_quick_pings(honest_config(tmp_path, "hoard", 0, [])), "r1-honest-0")
        reached, release = gate_training(first, 2)
        runs = [asyncio.ensure_future(first.run())]
        nodes = [first]
        clients: list[HostileClient] = []
        try:
            await asyncio.wait_for(first.listening.wait(), 20)
            addr = first.transport.listen_addrs[0]
            second_config = honest_config(tmp_path, "hoard", 1, [addr])
            second = libp2p_node(_quick_pings(second_config), "r1-honest-1")
            nodes.append(second)
            runs.append(asyncio.ensure_future(second.run()))
            await asyncio.wait_for(reached.wait(), 30)

            # node 1 pings node 0 (which sends nothing while it trains) every 0.2 s: every
            # answer from the flood's start on is kept; the wait is for three pings sent
            # after the flood is in place (two misses would have made node 0 lost)
            ping = second.liveness.ping
            flood_in_place = asyncio.Event()

            async def counted(peer: str) -> bool:
                after = flood_in_place.is_set()
                alive = await ping(peer)
                if peer == first.peer_id:
                    pinged.append(alive)
                    if after and len(pinged_after) < 3:
                        pinged_after.append(alive)
                    if len(pinged_after) >= 3 or (after and not alive):  # a miss: seen enough
                        enough_pings.set()
                return alive

            second.liveness.ping = counted  # type: ignore[method-assign]
            clients = [HostileClient(f"r1-hoarder-{i}") for i in range(HOARD_KEYS)]
            for client in clients:
                await client.__aenter__()
            cap = first.config.network.max_streams_per_peer
            await asyncio.wait_for(asyncio.gather(*(
                c.transport._bridge.run(hoard_streams, c.transport._host, first.peer_id, addr, cap)  # type: ignore[union-attr]
                for c in clients
            )), 30)  # fmt: skip
            flood_in_place.set()
            await asyncio.wait_for(enough_pings.wait(), 20)
            admission = first.transport._admission  # type: ignore[attr-defined]
            report = {
                "held_by_source": admission._by_source[HOARD_SOURCE],
                "refused_streams": first.transport.stats()["refused_streams"],
                "down_during": list(second.status()["peers_down"]),
            }
            release.set()
            await asyncio.wait_for(asyncio.gather(*runs), 60)
            return nodes, report
        finally:
            await tear_down(nodes, runs, clients)

    nodes, report = asyncio.run(run())
    share = nodes[0].config.network.max_streams // 2
    # node 1's pings got through once the hoard was in place, and never missed twice in a
    # row (two misses make a neighbour lost): node 0 never looked dead. The hoarders share
    # this process's one trio thread, so a ping sent while their 36 handshakes and 1,152
    # streams are being set up can miss its 1 s timeout (seen once in a full suite run);
    # a hoard from another host would not slow the nodes' own thread like that
    assert pinged_after == [True] * 3, (pinged, report)
    missed_twice = [i for i in range(1, len(pinged)) if not pinged[i - 1] and not pinged[i]]
    assert not missed_twice, (pinged, report)
    assert report["down_during"] == [], report
    # one source held half of node 0's streams; the rest of the hoard was refused, counted
    assert report["held_by_source"] == share, report
    assert report["refused_streams"] >= HOARD_KEYS * 32 - share, report
    for node in nodes:
        status = node.status()
        assert status["rounds_done"] == ROUNDS and status["peers_down"] == []
        assert "round_timeouts" not in status["counters"]
    assert nodes[0].status()["accuracy"] == clean_accuracy
    print(f"\nstream hoard: {report}; pings {pinged}")


def _quick_pings(config: NodeConfig) -> NodeConfig:
    """Pings every 0.2 s, two misses make a neighbour lost (the default: every 5 s)."""
    network = config.network.model_copy(
        update={"ping_interval": 0.2, "ping_timeout": 1.0, "ping_failures": 2}
    )
    return config.model_copy(update={"network": network})


#: the yamux ping flood: pings per write (one Noise message), and its bounds
PINGS_PER_WRITE = 4096
PING_BUDGET, PING_SECONDS = 2_000_000, 15.0


async def ping_flood(host: Any, node: str) -> dict[str, Any]:
    """Stop reading the connection to ``node``, then write yamux pings (each calls for a
    pong) until the node drops the connection, or the budget is spent."""
    peer = ID.from_base58(node)
    muxed = host.get_network().get_connections(peer)[0].muxed_conn

    async def read_nothing() -> bytes:
        await trio.sleep_forever()
        return b""

    muxed._fast._receive = read_nothing  # the node's answers pile up in its send buffer
    pings = b"".join(
        struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_PING, FLAG_SYN, 0, i) for i in range(PINGS_PER_WRITE)
    )
    sent = 0
    outcome = "budget spent"
    with trio.move_on_after(PING_SECONDS):
        try:
            while sent < PING_BUDGET:
                await muxed._write_frame(pings)  # behind the connection's write lock
                sent += PINGS_PER_WRITE
        except Exception as exc:  # noqa: BLE001 - the node closing the connection is the outcome
            outcome = type(exc).__name__
    return {"outcome": outcome, "pings": sent}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_yamux_ping_flood_that_reads_no_pong_is_cut_off(tmp_path, clean_accuracy):
    """Below the streams: a peer that sends yamux pings and never reads the pongs. The
    node's reader queues each pong for its writer (the deadlock fix of ``_yamux``), and
    the writer was blocked on the full socket: the queue grew by ~8 MB/s for as long as
    the peer kept on. Not covered elsewhere: the yamux tests break a stream's window,
    not the connection's control frames. Now the connection is dropped once
    ``MAX_DEFERRED`` answers wait, and the peer is charged; the pair trains as usual."""
    hostile: dict[str, Any] = {}

    async def flood(target: Node, addr: str) -> dict[str, Any]:
        async with HostileClient("r1-pinger") as pinger:
            hostile["id"] = pinger.peer_id
            await pinger.connect(addr)
            assert pinger.transport._bridge is not None
            report = await pinger.transport._bridge.run(ping_flood, pinger.transport._host, target.peer_id)
        deadline = time.monotonic() + 10.0  # the node notices the close a moment later
        while pinger.peer_id in target.transport.connected_peers() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        report["still_connected"] = pinger.peer_id in target.transport.connected_peers()
        return report

    first, second, report = asyncio.run(run_pair(tmp_path, "pings", flood))
    assert report["outcome"] != "budget spent" and report["pings"] < PING_BUDGET, report
    assert not report["still_connected"], report
    status = first.status()
    assert status["transport"]["rejected_oversized"] >= 1  # reported as a flow-control abuse
    assert status["guard"]["peers"][hostile["id"]]["dropped"].get("oversized", 0) >= 1
    for node in (first, second):
        assert node.status()["rounds_done"] == ROUNDS
    assert first.status()["accuracy"] == clean_accuracy
    print(f"\nyamux ping flood: {report}")


def test_a_peers_own_hello_overrides_addresses_others_gave_for_it(tmp_path):
    """Peer exchange naming an honest peer's id: a hostile peer greets node 0 with node
    1's (long-lived, so knowable) peer id at a black-holing address (a port that takes
    connections and never answers), before node 1 comes. The first hello naming a peer
    fixed its addresses for good: node 0 kept the dead one for node 1 whatever node 1 then
    said itself, and saved it in its checkpoints (a restart dials those). Not covered
    elsewhere: the discovery tests bound how many addresses a hello adds, not whose word
    counts. No training here: any peer that greets a node is met, so with the liar
    counting towards ``min_peers`` a pair would start with it (open membership, by design);
    node 0 waits in discovery while node 1 (its key, its own host) greets it."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)  # never accepted: a dial completes TCP and then hears nothing
    honest = HostileClient("r1-honest-1")  # node 1's key and host, greeting as node 1 does
    dead = f"/ip4/127.0.0.1/tcp/{hole.getsockname()[1]}/p2p/{honest.peer_id}"

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        config = honest_config(tmp_path, "liar", 0, [])
        config = config.model_copy(
            update={"network": config.network.model_copy(update={"min_peers": 5, "discovery_timeout": 60.0})}
        )
        target = libp2p_node(config, "r1-honest-0")
        run = asyncio.ensure_future(target.run())
        try:
            await asyncio.wait_for(target.listening.wait(), 20)
            addr = target.transport.listen_addrs[0]
            async with HostileClient("r1-liar") as liar:
                await liar.connect(addr)
                meta = {"addrs": {honest.peer_id: [dead]}, "reply": False}
                lie = encode(Message("hello", 0, None, meta), identity=liar.identity,
                             protocol="p2pfl", seq=liar.next_seq())  # fmt: skip
                await liar.send(target.peer_id, lie)
                await wait_until(lambda: honest.peer_id in target.known, 10.0)
                heard = list(target.known[honest.peer_id])
            honest.transport = Libp2pTransport(honest.identity.libp2p_keypair, listen_addrs=["/ip4/127.0.0.1/tcp/0"])
            async with honest:
                await honest.connect(addr)
                own = [f"{a}" for a in honest.transport.listen_addrs]
                meta = {"addrs": {honest.peer_id: own}, "reply": False}
                hello = encode(Message("hello", 0, None, meta), identity=honest.identity,
                               protocol="p2pfl", seq=honest.next_seq())  # fmt: skip
                await honest.send(target.peer_id, hello)
                await wait_until(lambda: honest.peer_id in target.met, 10.0)
                return heard, own, target.discovery.saved()[honest.peer_id]
        finally:
            target.stop()
            await asyncio.gather(run, return_exceptions=True)

    try:
        heard, own, saved = asyncio.run(scenario())
    finally:
        hole.close()
    assert heard == [dead]  # the lie was taken, as hearsay
    assert saved == own, (saved, own)  # node 1's own word replaced it


async def wait_until(check: Any, timeout: float) -> None:
    """Poll ``check()`` every 20 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.02)
