"""Getting through home routers: reachability, circuit relay v2, hole punching (trio thread).

What one ``Libp2pTransport`` runs when ``reachability`` is not ``"off"`` (or it serves
as a relay), all with py-libp2p 0.8.1's own protocols:

- **Reachability** (AutoNAT v1, ``libp2p.host.autonat``): every such host answers
  dial-back requests, and a host in ``"auto"`` mode asks the peers it is connected to
  (bootstrap peers, first) whether they can reach it. ``"public"`` / ``"private"`` skip
  the question (a public box; a test that plays a host behind NAT on 127.0.0.1).
- **Relay** (circuit relay v2 hop, ``libp2p.relay.circuit_v2``): a reachable host with
  ``relay=True`` relays for others, within ``RelayLimits`` (reservations, circuits at
  once, bytes and seconds per circuit). An unreachable host reserves a slot on up to
  ``MAX_RELAYS`` connected relays (peers whose identify lists the hop protocol) and
  advertises ``<relay address>/p2p-circuit/p2p/<own id>`` besides its own addresses;
  reservations are renewed before they expire and made again if a relay goes away.
- **Hole punching** (DCUtR): both ends of a relayed connection try to open a direct
  one; py-libp2p prefers a direct connection for new streams and closes the relayed
  one after a grace period. A peer still relayed ``PUNCH_GRACE`` seconds after the
  connection opened is reported in one WARNING line, and traffic goes on through the
  relay (a circuit the relay cuts at its limits is dialled again on the next send).
- **Direct upgrade**: a peer connected only through a relay whose direct address we
  know (identify, the DHT) or learn later -- two nodes of one home that met through
  the DHT's relayed address first -- is dialled there, once per address
  (``Swarm.dial_addr``: ``host.connect`` returns at once while the relayed connection
  exists). DCUtR does not cover that case: it punches at the addresses the relay
  observed (the home router's), which a node in the same home cannot reach.
- **Lingering relay**: a node that relays for others and stops keeps relaying, up to
  ``linger`` seconds, while circuits through it are in use (``circuits_in_use``): a
  training node that serves as the run's relay finishes its last round first and would
  otherwise cut the circuits that still carry the others' last models.

Two faults of py-libp2p 0.8.1 are worked around here:

- ``AutoNATService._try_dial`` answers a dial-back request with ``host.connect``, which
  returns at once when a connection to the peer exists -- and the requester is always
  connected (it asked over that connection), so every requester was judged reachable.
  ``_DialBackServer`` probes the advertised TCP address with a fresh socket instead.
- ``CircuitV2Protocol`` keeps the streams of the circuits it relays in a table keyed by
  *one peer id* (the source's or the destination's), and when one direction of a circuit
  ends it closes the streams stored under that peer's key: those of whichever circuit
  of that peer was stored last. When a node left, circuits between *other* nodes that
  shared a peer with its circuits were cut (two nodes still training lost their last
  models). ``_Relay`` closes the streams of the circuit that ended instead.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import trio
from libp2p.abc import IHost, INetConn
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat import AutoNATService, AutoNATStatus
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.basic_host import BasicHost
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from p2pfl.versions import require

from ._inbound import Shares, peer_source
from ._peerstore import known_addrs

require(
    "libp2p",
    at_least="0.8.1",
    below="0.8.2",
    why="p2pfl.transport._nat (AutoNATService._try_dial override)",
)

__all__ = [
    "DIRECT",
    "MAX_RELAYS",
    "NODE_RELAY_LINGER",
    "PUNCH_GRACE",
    "RELAYED",
    "NatSettings",
    "NatTraversal",
    "connection_kind",
    "is_circuit",
]

_log = logging.getLogger("p2pfl.transport.nat")

DIRECT = "direct"
RELAYED = "relayed"
#: relays an unreachable host reserves a slot on
MAX_RELAYS = 2
#: seconds a relayed connection may wait for hole punching before the warning
PUNCH_GRACE = 20.0
#: how often reachability, reservations and connection kinds are looked at (seconds)
_TICK = 1.0
#: reachability is asked again this often once known (seconds)
_RECHECK = 600.0
#: a reservation is renewed this long before it expires (seconds)
_RENEW_MARGIN = 60.0
#: a loop bound: ticks of one transport's life (> 100 days at _TICK)
_MAX_TICKS = 10_000_000
_PROBE_TIMEOUT = 5.0
_QUERY_TIMEOUT = 10.0
#: a direct dial to a peer reached by relay: its time bound, the addresses tried per
#: peer (all attempts together) and the peers remembered
_DIRECT_DIAL_TIMEOUT = 5.0
_DIRECT_ADDRS_PER_PEER = 8
_DIRECT_PEERS = 4096
#: seconds a training node that relays for others keeps relaying after it stops
NODE_RELAY_LINGER = 30.0
#: circuits one source peer may have under way to one peer through our relay (its
#: connection, and the ones that replace it while a cut circuit is torn down: 3 seen)
_CIRCUITS_PER_PEER = 4


def is_circuit(addr: str) -> bool:
    return "/p2p-circuit" in addr


def connection_kind(conn: INetConn) -> str:
    """``"relayed"`` for a connection through a circuit relay, ``"direct"`` otherwise."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return RELAYED
        if any(is_circuit(str(a)) for a in conn.get_transport_addresses()):
            return RELAYED
    except Exception:  # noqa: BLE001 - a connection closing meanwhile
        pass
    return DIRECT


class _DialBackServer(AutoNATService):
    """AutoNAT's server side, dialling back with a fresh TCP connection (module docstring)."""

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs:
            try:
                addr = Multiaddr(raw)
                names = {p.name for p in addr.protocols()}
                if "tcp" not in names or is_circuit(str(addr)):
                    continue
                ip = addr.value_for_protocol("ip6" if "ip6" in names else "ip4")
                port = int(addr.value_for_protocol("tcp"))
                with trio.fail_after(_PROBE_TIMEOUT):
                    stream = await trio.open_tcp_stream(ip, port)
                await stream.aclose()
                return bytes(raw)
            except Exception:  # noqa: BLE001 - refused, filtered, timed out: not reachable there
                continue
        return None


class _CircuitTable(dict[ID, Any]):
    """``CircuitV2Protocol._active_relays`` that never says it holds a peer: the
    protocol's own clean-up by peer id (the wrong circuit's streams) is skipped."""

    def __contains__(self, key: object) -> bool:
        return False


class _Relay(CircuitV2Protocol):
    """Circuit relay v2 whose circuits end alone (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active_relays = _CircuitTable()
        #: circuits under way per (source peer | source address, destination peer id)
        self._circuits: Shares[tuple[str, bytes]] = Shares()

    async def _handle_reserve(self, stream: Any, msg: HopMessage) -> None:
        """A reservation is for the peer that asks, and only while it stays connected.

        py-libp2p 0.8.1 reserves for whatever peer id the RESERVE names, so one hostile
        connection filled every slot with ids no key stands behind, and keeps a slot of a
        peer that left until ``reservation_ttl`` (an hour) although such a slot serves no
        circuit (``get_reservation`` needs the peer connected): a few keys that reserve
        and leave refused every honest peer behind NAT. The named peer is dropped (the
        connection's peer is used, as go-libp2p does), and when the slots are all taken
        those of peers no longer connected are freed first. One source address
        (``_inbound.peer_source``) holds at most half the slots: a host with as many keys
        as slots, all connected, took them all.
        """
        msg.ClearField("peer")
        manager = self.resource_manager
        if len(manager._reservations) >= manager.limits.max_reservations:
            for peer in [p for p in manager._reservations if not manager._is_peer_connected(p)]:
                del manager._reservations[peer]
        asking = stream.muxed_conn.peer_id
        if asking not in manager._reservations:
            swarm = cast(Swarm, self.host.get_network())
            source = peer_source(swarm, asking)
            share = max(1, manager.limits.max_reservations // 2)
            if source is not None and share <= sum(
                1 for p in manager._reservations if peer_source(swarm, p) == source
            ):
                await self._send_status(
                    stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many reservations"
                )
                return
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: Any, msg: HopMessage) -> None:
        """A circuit to one peer counts against its source's share of that peer's circuits.

        py-libp2p 0.8.1 bounds the circuits to a peer (``max_circuit_conns``) but not who
        holds them: one peer, with no reservation of its own, opened them all to an
        honest peer behind NAT and left them idle, and every other peer's dial to it
        through the relay was refused for as long as a circuit may last (an hour by
        default). A source peer holds at most ``_CIRCUITS_PER_PEER`` circuits to one
        peer, a source address (``_inbound.peer_source``) half of them (at least two
        peers' worth: the peers of a test, or of one home, share an address).
        """
        source = stream.muxed_conn.peer_id
        address = peer_source(cast(Swarm, self.host.get_network()), source) or str(source)
        to = msg.peer.id
        by_peer, by_address = (str(source), to), (f"@{address}", to)
        share = max(2 * _CIRCUITS_PER_PEER, self.resource_manager.limits.max_circuit_conns // 2)
        taken = self._circuits.take(by_peer, _CIRCUITS_PER_PEER)
        if taken and not self._circuits.take(by_address, share):
            self._circuits.give(by_peer)
            taken = False
        if not taken:
            await self._send_status(
                stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many circuits to that peer"
            )
            await self._close_stream(stream)
            return
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self._circuits.give(by_peer)
            self._circuits.give(by_address)

    async def _relay_data(
        self, src_stream: Any, dst_stream: Any, peer_id: ID, *args: Any, **kwargs: Any
    ) -> None:
        try:
            await super()._relay_data(src_stream, dst_stream, peer_id, *args, **kwargs)
        finally:  # one direction ended: this circuit (both its streams) ends, no other
            with trio.CancelScope(shield=True):
                await self._close_stream(src_stream)
                await self._close_stream(dst_stream)
            table = self._active_relays
            entry = dict.get(table, peer_id)
            if entry is not None and ({id(s) for s in entry} & {id(src_stream), id(dst_stream)}):
                dict.pop(table, peer_id, None)


class _Slot:
    """A reservation on one relay: our addresses through it, its expiry and limits."""

    def __init__(self, addrs: list[str], expire: float, data: int, seconds: int) -> None:
        self.addrs = addrs
        self.expire = expire  # unix time (what the relay states)
        self.data = data  # bytes one relayed connection may carry (0: not stated)
        self.seconds = seconds


class NatSettings:
    """What a transport asks of NAT traversal (from ``[network]``; see NodeNetworkConfig)."""

    def __init__(
        self,
        *,
        reachability: str = "auto",
        relay: bool = False,
        hole_punching: bool = True,
        limits: RelayLimits | None = None,
        punch_grace: float = PUNCH_GRACE,
        direct_upgrade: bool | None = None,
        linger: float = 0.0,
    ) -> None:
        if reachability not in ("auto", "public", "private"):
            raise ValueError(f"reachability must be auto, public or private, not {reachability!r}")
        if linger < 0:
            raise ValueError(f"linger must be >= 0 seconds, not {linger!r}")
        self.reachability = reachability
        self.relay = relay
        self.hole_punching = hole_punching
        self.punch_grace = punch_grace
        #: dial a relayed peer's known direct addresses (default: with hole punching)
        self.direct_upgrade = hole_punching if direct_upgrade is None else direct_upgrade
        #: seconds a relay keeps serving circuits in use after its transport closes
        self.linger = linger
        self.limits = limits or RelayLimits(
            duration=3600, data=256 << 20, max_circuit_conns=64, max_reservations=64
        )


class NatTraversal:
    """One host's reachability, relay service, reservations, hole punching and the record
    of how each peer is connected. ``advertise(addrs)`` is told the relayed addresses to
    announce whenever they change; everything runs on the host's trio thread."""

    def __init__(
        self,
        host: IHost,
        settings: NatSettings,
        advertise: Callable[[list[str]], None],
        *,
        max_message: int = 0,
    ) -> None:
        self.host = host
        self.settings = settings
        self._advertise = advertise
        self.max_message = max_message
        self.me = host.get_id()
        self.status = {
            "auto": AutoNATStatus.UNKNOWN,
            "public": AutoNATStatus.PUBLIC,
            "private": AutoNATStatus.PRIVATE,
        }[settings.reachability]
        self.autonat = _DialBackServer(cast(BasicHost, host), serve=True, confirmations=1)
        self.protocol: CircuitV2Protocol | None = None
        self.circuits: CircuitV2Transport | None = None
        self.reservations: dict[ID, _Slot] = {}  # relay -> our slot on it
        self.kinds: dict[ID, str] = {}  # peer -> "direct" | "relayed", as last logged
        self._relayed_since: dict[ID, float] = {}
        self._warned: set[ID] = set()
        #: direct addresses dialled per relayed peer (each at most once); peers dialled now
        self._direct_tried: dict[ID, set[str]] = {}
        self._dialling: set[ID] = set()
        self._nursery: trio.Nursery | None = None
        self.ready = trio.Event()

    # -- the service -----------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (the transport's services nursery does that on close)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.settings.reachability == "auto" and self.settings.relay:
                task_status.started()  # the relay decision waits for the verdict
                task_status = trio.TASK_STATUS_IGNORED
                await self._await_verdict()
            await self._start_relay_protocol(nursery)
            if self.settings.hole_punching:
                dcutr = DCUtRProtocol(self.host)
                await nursery.start(self._serve, dcutr)
            self.ready.set()
            task_status.started()
            await self._watch()

    async def _serve(self, service: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(service):
            task_status.started()
            await trio.sleep_forever()

    async def _start_relay_protocol(self, nursery: trio.Nursery) -> None:
        hop = self.settings.relay and self.status == AutoNATStatus.PUBLIC
        self.protocol = _Relay(self.host, limits=self.settings.limits, allow_hop=hop)
        await nursery.start(self._serve, self.protocol)
        # dials through relays only: no reservation on each dial (we reserve ourselves)
        self.circuits = CircuitV2Transport(
            self.host, self.protocol, RelayConfig(roles=RelayRole.STOP, limits=self.settings.limits)
        )
        if hop:
            limits = self.settings.limits
            _log.info(
                "serving as a circuit relay: at most %d reservations, %d circuits at once, "
                "%d bytes and %d s per circuit",
                limits.max_reservations,
                limits.max_circuit_conns,
                limits.data,
                limits.duration,
            )
        elif self.settings.relay:
            _log.warning(
                "network.relay = true, but this node is not reachable from outside: "
                "not serving as a relay"
            )

    async def _await_verdict(self) -> None:
        for _ in range(_MAX_TICKS):
            await self._check_reachability()
            if self.status != AutoNATStatus.UNKNOWN:
                return
            await trio.sleep(_TICK)

    async def _watch(self) -> None:
        last_check = -_RECHECK
        for _ in range(_MAX_TICKS):
            now = time.monotonic()
            if self.settings.reachability == "auto" and (
                self.status == AutoNATStatus.UNKNOWN or now - last_check >= _RECHECK
            ):
                if await self._check_reachability():
                    last_check = now
            if self.status == AutoNATStatus.PRIVATE:
                await self._keep_reservations()
            self.note_kinds()
            if self.settings.direct_upgrade:
                self._upgrade_relayed()
            await trio.sleep(_TICK)

    # -- reachability ------------------------------------------------------------------
    def _peers_speaking(self, protocol: str) -> list[ID]:
        store = self.host.get_peerstore()
        found = []
        for peer in self.host.get_connected_peers():
            try:
                if protocol in store.get_protocols(peer):
                    found.append(peer)
            except Exception:  # noqa: BLE001 - identify has not answered yet
                continue
        return found

    async def _check_reachability(self) -> bool:
        """Ask up to three connected AutoNAT servers; False when none was there to ask."""
        servers = [p for p in self._peers_speaking(AUTONAT_PROTOCOL_ID) if self._direct_to(p)]
        # a peer on our own LAN reaches us whatever the router does: ask those outside it
        # (all of them only when there are no others: one machine, one LAN)
        servers = [p for p in servers if not self._on_our_lan(p)] or servers
        if not servers:
            return False
        before = self.status
        self.autonat.dial_results.clear()
        for server in servers[:3]:
            try:
                with trio.fail_after(_QUERY_TIMEOUT):
                    await self.autonat.query_server(server, timeout=_QUERY_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - that server did not answer
                _log.debug("AutoNAT query to %s failed: %r", server, exc)
        results = list(self.autonat.dial_results.values())
        if not results:
            return False
        self.status = AutoNATStatus.PUBLIC if any(results) else AutoNATStatus.PRIVATE
        if self.status != before:
            _log.info(
                "reachability (AutoNAT, %d of %d peers reached us): %s",
                sum(results),
                len(results),
                "public" if self.status == AutoNATStatus.PUBLIC else "private: behind NAT",
            )
        return True

    def _on_our_lan(self, peer: ID) -> bool:
        """Whether we reach ``peer`` at an address of one of our own subnets (taken as
        the /24 of IPv4, the /64 of IPv6 addresses: the host's netmasks are not known)."""
        ours = {_subnet(str(a)) for a in self.host.get_addrs()} - {None}
        for conn in self._connections().get(peer, []):
            try:
                remote = [str(a) for a in conn.get_transport_addresses()]
            except Exception:  # noqa: BLE001 - closing meanwhile
                continue
            if any(_subnet(a) in ours for a in remote):
                return True
        return False

    def _direct_to(self, peer: ID) -> bool:
        conns = self._connections().get(peer, [])
        return any(connection_kind(c) == DIRECT for c in conns)

    # -- reservations --------------------------------------------------------------------
    async def _keep_reservations(self) -> None:
        """Hold a slot on up to MAX_RELAYS connected relays, renewed before it expires;
        tell the transport our addresses through them whenever they change.

        The reservation is made here, not with ``CircuitV2Transport.reserve``, which
        keeps neither the relay's limits nor the addresses the relay states for itself.
        """
        connected = set(self.host.get_connected_peers())
        now = time.time()
        changed = False
        for relay in list(self.reservations):
            slot = self.reservations[relay]
            if relay not in connected or slot.expire <= now:
                del self.reservations[relay]  # its relay went away: our address with it
                changed = True
            elif slot.expire - now <= _RENEW_MARGIN:
                renewed = await self._reserve(relay)
                if renewed is not None:
                    self.reservations[relay] = renewed
                    changed |= renewed.addrs != slot.addrs
        for relay in self._peers_speaking(HOP_PROTOCOL_ID):
            if len(self.reservations) >= MAX_RELAYS:
                break
            if relay in self.reservations or not self._direct_to(relay):
                continue
            fresh = await self._reserve(relay)
            if fresh is None:
                continue
            self.reservations[relay] = slot = fresh
            changed = True
            _log.info(
                "not reachable from outside: reachable through relay %s at %s (it carries "
                "at most %s bytes and %s s per relayed connection)",
                relay,
                ", ".join(slot.addrs),
                slot.data or "unstated",
                slot.seconds or "unstated",
            )
            if 0 < slot.data < self.max_message:
                _log.warning(
                    "relay %s carries at most %d bytes per relayed connection, less than "
                    "the largest message (network.max_message_bytes = %d): a model larger "
                    "than that cannot reach this node through it",
                    relay,
                    slot.data,
                    self.max_message,
                )
        if changed:
            self._advertise([a for slot in self.reservations.values() for a in slot.addrs])

    async def _reserve(self, relay: ID) -> _Slot | None:
        """Ask ``relay`` for a slot (circuit relay v2 RESERVE); ``None`` if refused."""
        try:
            with trio.fail_after(_QUERY_TIMEOUT):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])
                try:
                    request = HopMessage(
                        type=HopMessage.RESERVE, peer=CircuitPeerId(id=self.me.to_bytes())
                    )
                    await write_delimited_msg(stream, request)
                    answer = await read_delimited_msg(stream, HopMessage)
                finally:
                    await stream.close()
        except Exception as exc:  # noqa: BLE001 - the relay left or stalled: next tick
            _log.debug("reservation on %s failed: %r", relay, exc)
            return None
        status = answer.status if answer.HasField("status") else StatusCode.OK
        if status != StatusCode.OK or not answer.HasField("reservation"):
            _log.warning("relay %s refused a reservation (status %s)", relay, status)
            return None
        suffix = f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{self.me.to_base58()}"
        stated = []
        for raw in answer.reservation.addrs:
            try:
                stated.append(str(Multiaddr(raw)))
            except Exception:  # noqa: BLE001 - an address we cannot read: skip it
                continue
        if not stated:  # the relay named none: where we reached it
            stated = [str(a) for a in known_addrs(self.host, relay)]
        loopback_ok = _all_loopback(self.host)
        addrs = sorted(
            {
                a.partition("/p2p/")[0] + suffix
                for a in stated
                if not is_circuit(a) and (loopback_ok or "/127." not in a)
            }
        )
        limit = answer.limit if answer.HasField("limit") else None
        return _Slot(
            addrs,
            float(answer.reservation.expire),
            int(limit.data) if limit is not None else 0,
            int(limit.duration) if limit is not None else 0,
        )

    # -- dialling through a relay ----------------------------------------------------------
    async def dial(self, addr: Multiaddr, peer: ID) -> None:
        """Connect to ``peer`` through the relay named in a /p2p-circuit address."""
        await self.ready.wait()
        if self.circuits is None:
            raise ConnectionError("the circuit relay protocol is not running")
        await self.circuits.dial(addr)  # registered with the swarm, typed RELAYED

    # -- relayed -> direct where an address is known -----------------------------------------
    def _upgrade_relayed(self) -> None:
        """Dial, in the background, each relayed-only peer at the direct addresses we know
        of it and have not tried yet (module docstring, "Direct upgrade")."""
        nursery = self._nursery
        if nursery is None:
            return
        for peer, kind in self.current_kinds().items():
            if kind != RELAYED or peer in self._dialling:
                continue
            addrs = self._untried_direct(peer)
            if addrs:
                self._dialling.add(peer)
                nursery.start_soon(self._dial_direct, peer, addrs)

    def _untried_direct(self, peer: ID) -> list[Multiaddr]:
        """``peer``'s TCP addresses outside any relay, not tried yet, not one of ours (two
        homes' nodes may share a private address and port: we would dial ourselves)."""
        tried = self._direct_tried.get(peer)
        if tried is None:
            if len(self._direct_tried) >= _DIRECT_PEERS:
                self._direct_tried.pop(next(iter(self._direct_tried)))
            tried = self._direct_tried[peer] = set()
        room = _DIRECT_ADDRS_PER_PEER - len(tried)
        if room <= 0:
            return []
        ours = {str(a).partition("/p2p/")[0] for a in self.host.get_addrs()}
        loopback_ok = _all_loopback(self.host)
        fresh = []
        for addr in known_addrs(self.host, peer):
            text = str(addr).partition("/p2p/")[0]
            if (
                is_circuit(str(addr))
                or "/tcp/" not in text
                or text in tried
                or text in ours
                or (not loopback_ok and _is_loopback(text))
            ):
                continue
            tried.add(text)
            fresh.append(Multiaddr(text))
            if len(fresh) >= room:
                break
        return fresh

    async def _dial_direct(self, peer: ID, addrs: list[Multiaddr]) -> None:
        """Open a direct connection to ``peer`` at the first of ``addrs`` that answers as
        ``peer``; new streams prefer it (the swarm picks direct connections first)."""
        store = self.host.get_peerstore()
        network = self.host.get_network()
        try:
            for addr in addrs:
                known = known_addrs(self.host, peer)
                try:
                    with trio.fail_after(_DIRECT_DIAL_TIMEOUT):
                        await network.dial_addr(addr, peer)
                except Exception as exc:  # noqa: BLE001 - refused, another host there, timed out
                    _log.debug("direct dial of relayed peer %s at %s failed: %r", peer, addr, exc)
                    # the swarm forgets a peer's addresses when one answers with another id
                    store.add_addrs(peer, known, 600)
                    continue
                if self._direct_to(peer):
                    _log.info("connection to %s upgraded from relayed to direct at %s", peer, addr)
                    return
        finally:
            self._dialling.discard(peer)

    # -- a relay that stops ---------------------------------------------------------------------
    def circuits_in_use(self) -> int:
        """Circuits this host relays for others right now (0 when it is no relay)."""
        protocol = self.protocol
        if protocol is None or not protocol.allow_hop:
            return 0
        reservations = getattr(protocol.resource_manager, "_reservations", {})
        return sum(max(0, int(r.active_connections)) for r in list(reservations.values()))

    async def linger(self) -> None:
        """Keep relaying while circuits are in use, at most ``settings.linger`` seconds."""
        limit = self.settings.linger
        if limit <= 0 or self.circuits_in_use() == 0:
            return
        _log.info(
            "relaying %d circuits for others: staying up until they close (at most %.0f s)",
            self.circuits_in_use(),
            limit,
        )
        with trio.move_on_after(limit):
            while self.circuits_in_use() > 0:
                await trio.sleep(0.1)
        left = self.circuits_in_use()
        if left:
            _log.warning("closing with %d circuits still in use after %.0f s", left, limit)

    # -- how peers are connected -------------------------------------------------------------
    def _connections(self) -> dict[ID, list[INetConn]]:
        conns = getattr(self.host.get_network(), "connections", {}) or {}
        return {peer: (c if isinstance(c, list) else [c]) for peer, c in conns.items()}

    def current_kinds(self) -> dict[ID, str]:
        """Each connected peer: ``"direct"`` if any connection to it is, else ``"relayed"``."""
        kinds = {}
        for peer, conns in self._connections().items():
            if conns and peer != self.me:
                direct = any(connection_kind(c) == DIRECT for c in conns)
                kinds[peer] = DIRECT if direct else RELAYED
        return kinds

    def note_kinds(self) -> None:
        """Log each change of how a peer is connected; warn once of a relay that stays."""
        now = time.monotonic()
        kinds = self.current_kinds()
        for peer, kind in kinds.items():
            if self.kinds.get(peer) != kind:
                _log.info("connection to %s: %s", peer, kind)
                self.kinds[peer] = kind
            if kind == DIRECT:
                self._relayed_since.pop(peer, None)
                continue
            since = self._relayed_since.setdefault(peer, now)
            if now - since >= self.settings.punch_grace and peer not in self._warned:
                self._warned.add(peer)
                limits = self.settings.limits
                _log.warning(
                    "connection to %s stays relayed: %s; messages go through the relay, "
                    "which may cut a circuit at its limits (a p2pfl relay: %d bytes, %d s "
                    "per circuit by default) and is dialled again on the next send",
                    peer,
                    "hole punching is off (network.hole_punching)"
                    if not self.settings.hole_punching
                    else "hole punching failed (both sides behind NATs that give each "
                    "connection a new port, or a firewall)",
                    limits.data,
                    limits.duration,
                )
        for peer in [p for p in self.kinds if p not in kinds]:
            del self.kinds[peer]
            self._relayed_since.pop(peer, None)


def _subnet(addr: str) -> str | None:
    """The /24 (IPv4) or /64 (IPv6) an address is in; ``None`` for a relayed or DNS one."""
    if is_circuit(addr):
        return None
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        prefix = 24 if parts[1] == "ip4" else 64
        return str(ipaddress.ip_network(f"{parts[2]}/{prefix}", strict=False))
    except ValueError:
        return None


def _all_loopback(host: IHost) -> bool:
    """Whether this host only listens on loopback (tests): loopback relay addresses count."""
    own = [str(a) for a in host.get_addrs() if not is_circuit(str(a))]
    return all(_is_loopback(a) for a in own)


def _is_loopback(addr: str) -> bool:
    """Whether a multiaddr's IP is a loopback one (IPv4 127/8, IPv6 ::1)."""
    return "/127." in addr or "/::1/" in addr
