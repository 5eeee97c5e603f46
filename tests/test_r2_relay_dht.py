"""Red-team pass on the two services a node runs only when configured (helper r2): the
circuit relay (``network.relay = true``) and the DHT server (``network.dht = true``),
each attacked by one hostile peer on 127.0.0.1 (``p2pfl/transport/_nat.py``,
``p2pfl/transport/_dht.py``). Each attack succeeded against py-libp2p 0.8.1's defaults
(named in its docstring) and each test fails without its fix; the DHT tests shorten the
per-stream time bound and the key cap with ``monkeypatch`` to stay fast.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.utils.varint import encode_varint_prefixed
from multiaddr import Multiaddr

from p2pfl.transport import _dht, _nat
from p2pfl.transport.libp2p import Libp2pTransport
from tests.hostile import HostileClient
from tests.transport_kit import Factory, eventually, nat_transports_fixture

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SLOTS = 4
OK = 100  # circuit relay v2 status: ok
LIMITS = RelayLimits(duration=600, data=64 << 20, max_circuit_conns=16, max_reservations=SLOTS)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


make = nat_transports_fixture(punch_grace=60.0, hole_punching=False)


def forged_id(index: int) -> bytes:
    """A peer id no key stands behind (identity of a sha2-256 multihash), seeded."""
    digest = hashlib.sha256(f"r2-forged-{index}".encode()).digest()
    return bytes([0x12, 0x20]) + digest


async def reserve(client: HostileClient, relay: str, claimed: bytes | None) -> int:
    """One RESERVE on ``relay`` over the client's own connection, naming ``claimed`` as
    the peer to reserve for (``None``: names no one); the status code answered."""
    bridge, host = client.transport._bridge, client.transport._host
    assert bridge is not None and host is not None

    async def ask() -> int:
        with trio.fail_after(10):
            stream = await host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL_ID])
            msg = HopMessage(type=HopMessage.RESERVE)
            if claimed is not None:
                msg.peer.CopyFrom(CircuitPeerId(id=claimed))
            await write_delimited_msg(stream, msg)
            answer = await read_delimited_msg(stream, HopMessage)
            await stream.close()
            return int(answer.status)

    return await bridge.run(ask)


def relayed_addr(transport: Libp2pTransport) -> str | None:
    return next((a for a in transport.listen_addrs if "/p2p-circuit" in a), None)


def reservations(relay: Libp2pTransport) -> set[str]:
    """The peers the relay holds a reservation for now."""
    nat, bridge = relay._nat, relay._bridge
    assert nat is not None and nat.protocol is not None and bridge is not None
    manager = nat.protocol.resource_manager
    return bridge.run_sync(lambda: {p.to_base58() for p in manager._reservations})


async def test_one_connection_cannot_take_every_reservation_slot(make: Factory) -> None:
    """A RESERVE names the peer to reserve for, and py-libp2p 0.8.1's relay took that
    name as it is: one hostile connection filled every slot with ids no key stands
    behind (each held for ``reservation_ttl``, an hour by default), and every honest
    peer behind NAT was refused (``_Relay._handle_reserve``)."""
    relay = await make(reachability="public", relay=True, limits=LIMITS)
    async with HostileClient("r2-relay-hog") as hog:
        await hog.connect(relay.listen_addrs[0])
        for index in range(SLOTS + 2):
            await reserve(hog, relay.peer_id, forged_id(index))
        # every RESERVE reserved (again) for the hog itself: one slot, not all of them
        assert reservations(relay) == {hog.transport.peer_id}
        honest = await make(reachability="private")
        await honest.connect(relay.listen_addrs[0], timeout=5)
        await eventually(lambda: relayed_addr(honest), 15, "the honest peer holds a slot")
        assert reservations(relay) == {hog.transport.peer_id, honest.peer_id}


async def test_slots_of_peers_that_left_go_to_peers_that_ask(make: Factory) -> None:
    """A slot stayed taken ``reservation_ttl`` after its peer left, though it served no
    circuit (a reservation holds only while its peer is connected): ``SLOTS`` keys of
    one host that reserved and left refused every honest peer for an hour."""
    relay = await make(reachability="public", relay=True, limits=LIMITS)
    for index in range(SLOTS):
        async with HostileClient(f"r2-relay-leaver-{index}") as leaver:
            await leaver.connect(relay.listen_addrs[0])
            await reserve(leaver, relay.peer_id, None)
    assert len(reservations(relay)) == SLOTS  # all taken, none of them connected
    honest = await make(reachability="private")
    await honest.connect(relay.listen_addrs[0], timeout=5)
    await eventually(lambda: relayed_addr(honest), 15, "the honest peer holds a slot")
    assert reservations(relay) == {honest.peer_id}


async def test_one_address_holds_at_most_half_the_reservation_slots(make: Factory) -> None:
    """A host with as many keys as slots, all staying connected, took every slot: one
    source address now holds at most half of them (``_Relay._handle_reserve``)."""
    relay = await make(reachability="public", relay=True, limits=LIMITS)
    hogs = [HostileClient(f"r2-relay-stayer-{index}") for index in range(SLOTS)]
    try:
        codes = []
        for hog in hogs:
            await hog.__aenter__()
            await hog.connect(relay.listen_addrs[0])
            codes.append(await reserve(hog, relay.peer_id, None))
        assert codes.count(OK) == SLOTS // 2
        assert len(reservations(relay)) == SLOTS // 2  # the rest for other addresses
        # a peer that holds a slot renews it although its address is at its share
        assert await reserve(hogs[0], relay.peer_id, None) == OK
    finally:
        for hog in reversed(hogs):
            await hog.__aexit__(None, None, None)


async def hold_circuits(client: HostileClient, relay: str, to: str, count: int) -> list[int]:
    """``count`` CONNECTs to ``to`` through ``relay``, each on a stream of its own that
    stays open (the circuit idle, no handshake inside); the status codes answered."""
    bridge, host = client.transport._bridge, client.transport._host
    assert bridge is not None and host is not None
    target = CircuitPeerId(id=ID.from_base58(to).to_bytes())

    async def connect() -> list[int]:
        codes = []
        for _ in range(count):
            with trio.fail_after(10):
                stream = await host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL_ID])
                await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT, peer=target))
                codes.append(int((await read_delimited_msg(stream, HopMessage)).status))
        return codes

    return await bridge.run(connect)


async def test_one_peer_cannot_take_every_circuit_to_a_peer(make: Factory) -> None:
    """py-libp2p bounds the circuits to a peer behind NAT (``max_circuit_conns``) but not
    who holds them: one peer with no reservation opened them all and left them idle, and
    every other peer's dial to it through the relay was refused for as long as a circuit
    may last (an hour by default) (``_Relay._handle_connect``)."""
    relay = await make(reachability="public", relay=True, limits=LIMITS)
    behind = await make(reachability="private")
    await behind.connect(relay.listen_addrs[0], timeout=5)
    circuit = await eventually(lambda: relayed_addr(behind), 15, "a relayed address")
    hogs = [HostileClient(f"r2-circuit-hog-{index}") for index in range(3)]
    for hog in hogs:
        await hog.__aenter__()
    try:
        for hog in hogs:
            await hog.connect(relay.listen_addrs[0])
        codes = await hold_circuits(hogs[0], relay.peer_id, behind.peer_id, 10)
        assert codes.count(OK) == _nat._CIRCUITS_PER_PEER  # per key, to one peer
        honest = await make(reachability="public")
        assert await honest.connect(circuit, timeout=10) == behind.peer_id
        for hog in hogs[1:]:
            await hold_circuits(hog, relay.peer_id, behind.peer_id, 6)
        # one address (the honest peer's too, on 127.0.0.1): half the circuits to a peer,
        # the rest for other addresses
        assert circuits_to(relay, behind) == LIMITS.max_circuit_conns // 2
    finally:
        for hog in reversed(hogs):
            await hog.__aexit__(None, None, None)


def circuits_to(relay: Libp2pTransport, peer: Libp2pTransport) -> int:
    """Circuits through ``relay`` to ``peer`` under way now."""
    nat, bridge = relay._nat, relay._bridge
    assert nat is not None and nat.protocol is not None and bridge is not None
    manager = nat.protocol.resource_manager
    slot = bridge.run_sync(lambda: manager._reservations.get(ID.from_base58(peer.peer_id)))
    return 0 if slot is None else int(slot.active_connections)


# -- the DHT server ----------------------------------------------------------------------
@pytest.fixture
async def dht_server() -> AsyncIterator[Libp2pTransport]:
    server = Libp2pTransport(create_new_key_pair(b"r2-dht-server".ljust(32, b"-")), dht=True)
    await server.start()
    await eventually(lambda: server._finder is not None, 10, "the DHT serves")
    try:
        yield server
    finally:
        await server.close()


def dht_of(server: Libp2pTransport) -> tuple[_dht._ServedDHT, Any]:
    finder, bridge = server._finder, server._bridge
    assert finder is not None and bridge is not None
    return finder.dht, bridge


async def ask_find_node(client: HostileClient, server: str) -> bool:
    """One FIND_NODE on a stream of its own; whether an answer came within 5 s."""
    bridge, host = client.transport._bridge, client.transport._host
    assert bridge is not None and host is not None

    async def ask() -> bool:
        try:
            with trio.fail_after(5):
                stream = await host.new_stream(ID.from_base58(server), [KAD_PROTOCOL_ID])
                request = KadMessage(type=KadMessage.MessageType.FIND_NODE, key=b"r2" * 16)
                await stream.write(encode_varint_prefixed(request.SerializeToString()))
                answered = bool(await stream.read(65536))
                await stream.close()
                return answered
        except Exception:  # noqa: BLE001 - refused, reset, timed out: not answered
            return False

    return await bridge.run(ask)


async def test_idle_dht_streams_of_one_peer_do_not_shut_the_dht(
    dht_server: Libp2pTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """py-libp2p serves 12 inbound DHT streams at once and reads each with no time bound:
    one peer that opened 12 and wrote nothing left the DHT serving no one, for as long as
    it liked (``_ServedDHT.handle_stream``: a share per source, a time per stream)."""
    monkeypatch.setattr(_dht, "_STREAM_TIME", 2.0)
    dht, bridge = dht_of(dht_server)
    async with HostileClient("r2-dht-idler") as idler, HostileClient("r2-dht-asker") as asker:
        await idler.connect(dht_server.listen_addrs[0])
        await asker.connect(dht_server.listen_addrs[0])
        host, idler_bridge = idler.transport._host, idler.transport._bridge
        assert host is not None and idler_bridge is not None
        server_id = ID.from_base58(dht_server.peer_id)

        async def open_idle() -> list[Any]:
            opened = []
            for _ in range(12):
                try:
                    opened.append(await host.new_stream(server_id, [KAD_PROTOCOL_ID]))
                except Exception:  # noqa: BLE001 - reset: over its share
                    pass
            return opened

        held = await idler_bridge.run(open_idle)
        busy = bridge.run_sync(lambda: dht._inbound_limiter.borrowed_tokens)
        assert len(held) <= _dht._STREAMS_PER_SOURCE and busy <= _dht._STREAMS_PER_SOURCE
        # the asker shares the idler's address (127.0.0.1): served once the idle time ends
        answered = False
        for _ in range(20):  # polled: 10 s at most, the idle streams end after 2 s
            answered = await ask_find_node(asker, dht_server.peer_id)
            if answered:
                break
            await asyncio.sleep(0.5)
        assert answered, "an honest FIND_NODE is answered despite the idle streams"


async def add_provider(client: HostileClient, server: str, key: bytes, addrs: int) -> None:
    """One ADD_PROVIDER of ``key`` naming the client with ``addrs`` addresses (seeded)."""
    bridge, host = client.transport._bridge, client.transport._host
    assert bridge is not None and host is not None
    base = Multiaddr("/ip4/10.0.0.1/tcp/4001").to_bytes()[:-2]
    message = KadMessage(type=KadMessage.MessageType.ADD_PROVIDER, key=key)
    provider = message.providerPeers.add()
    provider.id = host.get_id().to_bytes()
    provider.addrs.extend(base + (i % 65536).to_bytes(2, "big") for i in range(addrs))
    data = encode_varint_prefixed(message.SerializeToString())

    async def send() -> None:
        try:
            with trio.fail_after(10):
                stream = await host.new_stream(ID.from_base58(server), [KAD_PROTOCOL_ID])
                await stream.write(data)
                await stream.read(100)  # the echo (nothing when refused)
                await stream.close()
        except Exception:  # noqa: BLE001 - refused: the store below says what was kept
            pass

    await bridge.run(send)


async def test_provider_records_stay_small_and_few(
    dht_server: Libp2pTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """py-libp2p kept every address an ADD_PROVIDER listed (a 4 MiB message: 300,000,
    ~36 MiB of memory) under any number of keys for 48 hours, and parsed each such
    message on the node's trio thread for ~0.5 s. Requests over ``_REQUEST_BYTES`` are
    refused, a record keeps ``_RECORD_ADDRS`` addresses, keys past ``_MAX_KEYS`` push out
    the stalest."""
    monkeypatch.setattr(_dht, "_MAX_KEYS", 3)
    dht, bridge = dht_of(dht_server)
    store = dht.provider_store
    async with HostileClient("r2-dht-flooder") as flooder:
        await flooder.connect(dht_server.listen_addrs[0])
        await add_provider(flooder, dht_server.peer_id, b"r2-huge".ljust(32, b"-"), 300_000)
        for index in range(5):  # 5 keys of 4,000 addresses (~40 KiB each)
            key = f"r2-key-{index}".encode().ljust(32, b"-")
            await add_provider(flooder, dht_server.peer_id, key, 4_000)

    def kept() -> tuple[int, int]:
        records = [r for k in store.providers.values() for r in k.values()]
        return len(store.providers), max(len(r.provider_info.addrs) for r in records)

    keys, most_addrs = bridge.run_sync(kept)
    assert b"r2-huge".ljust(32, b"-") not in bridge.run_sync(lambda: set(store.providers))
    assert keys <= 3 and most_addrs <= _dht._RECORD_ADDRS
    assert b"r2-key-4".ljust(32, b"-") in bridge.run_sync(lambda: set(store.providers))
