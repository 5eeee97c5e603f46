"""py-libp2p 0.8.1 behind the ``Transport`` interface.

Wire protocol ``/p2pfl/msg/2.0.0``: frames on long-lived streams.  A frame is a
4-byte big-endian length and the payload (the format of :mod:`p2pfl.wire.framing`,
the one place it is defined); the receiver reads the whole frame,
hands it to the asyncio loop and answers one acknowledgement byte, after which
the sender may write the next frame on the same stream.  A sender therefore has
at most one unacknowledged frame per stream, and frames never interleave.

- Sender: each payload takes an idle outbound stream to the peer, or opens one
  (negotiating a stream costs ~4-5 ms of CPU in py-libp2p, more than moving a
  1 MB payload); concurrent sends to one peer use a stream each, and up to
  ``MAX_IDLE_STREAMS`` per peer are kept for reuse.  A kept stream the receiver
  has closed meanwhile is discarded before use; one that turns out closed during
  the send (EOF where the acknowledgement should be) is retried once on a fresh
  stream, and so is a frame whose connection closed under it while another
  connection to the peer is open (a relayed one retired for a direct one; a copy
  that did arrive is dropped by the receiving node as a replay).  A reset (the
  receiver refused the frame) is never retried.  Kept streams are closed when idle
  for half of ``stream_idle_timeout``, when the peer disconnects and on ``close()``.
  A small frame to a peer with a fresh kept stream and no other send in flight is
  written at once and its acknowledgement taken by the connection's reader as it
  arrives, without a task for the send (``_DirectSend``); anything unexpected on the
  stream hands the send to a task that finishes it as above, and one watcher keeps
  the deadlines of such sends.
- Receiver: the handler reads frames until the sender closes the stream, always
  draining at once (yamux resets a stream whose reader stalls for 5 s).  A length
  above the cap is refused before any body is read, a stream that ends, is reset
  or stays silent for ``read_idle_timeout`` within a frame is a truncated frame:
  either way the stream is reset, counted in the stats and reported to the abuse
  handler.  A stream silent *between* frames for ``stream_idle_timeout`` is
  closed cleanly (FIN; reset if the sender does not close its side in turn).
  While a kept stream's handler waits between frames, a frame that arrives whole
  and may be taken now is taken by the connection's reader as it arrives, with the
  same checks and outcome (``_InlineFrames``): no wake-up of the handler per frame.
- Resource bounds (``TransportLimits``, kept by ``_admission``), all checked
  before a frame's body is read: inbound streams per peer, per source address
  (half of all) and in all (one over is reset before its protocol is negotiated);
  bytes of inbound frames held per peer and in all, from a frame's length prefix
  until the node has handled it (a frame that does not fit waits, unread, and its
  stream is granted no yamux window beyond the initial 256 KiB meanwhile; handled frames give their bytes back when
  the next frame is admitted, or at once while one waits); a deadline on the whole frame
  (``frame_timeout + size / min_frame_rate`` from its first byte, or from the
  stream's opening for its first frame), so trickled and idle streams are cut.
  Bytes that streams hold unread outside admitted frames (up to the initial 256 KiB
  window each) are counted and bounded per node and per source (``_unread``).
  A banned peer (``ban``) has its connections closed, its new connections and
  streams refused, and its frames on streams already open refused unread.
  A sender keeps at most ``max_sends_per_peer`` frames in flight to one peer.

The host runs on the process-wide trio thread of ``_trio_bridge`` and is built
with the settings measured in DESIGN.md ("py-libp2p facts"):

- Noise is the only security offered (py-libp2p also offers plaintext, TLS and
  secio by default); yamux is the only muxer (mplex is ~6x slower), patched
  against a two-way deadlock and given 4 MiB windows for admitted frames (see
  ``_yamux``);
- ``max_connections_per_peer=1``: more makes every connect cost >= 250 ms;
- the receiving handler drains the stream at once, because yamux resets a
  stream whose reader stalls for 5 s, and never runs node code on trio;
- identify and ping stay registered (``new_host`` adds them), so peers of other
  libp2p implementations can connect, and ``ping()`` uses ``/ipfs/ping/1.0.0``;
- an inbound connection gives its slot of the swarm's inbound cap (250) back when
  it closes, not when the host stops, and one source address holds at most half
  of the slots (``_inbound``): otherwise 250 connections over a node's lifetime,
  or 250 sockets left before their handshake, left it deaf to newcomers;
- the swarm's auto-connector is neutered (see ``_NoAutoConnect``), and an
  explicit ``connect`` lifts the swarm's 60 s ban on a peer whose dial failed;
- leaving ``host.run()`` does not close the listener: ``close()`` calls
  ``host.close()`` explicitly, then the trio thread is joined by its last user;
- a dial is retried once, not three times with backoff (0.7 s to learn that a
  port is closed); whom to retry and when is the node's decision;
- py-libp2p listens with SO_REUSEPORT and ignores a failed listen, so a taken
  port or an address that is not ours would go unnoticed: ``start()`` checks
  both and raises ``TransportError``;
- wildcard listen addresses are announced as this host's interface addresses;
- ``mdns=True`` turns on py-libp2p's mDNS discovery (zeroconf, the standard
  ``_p2p._udp.local`` service): peers it finds on the LAN go to the discovery
  handler; whom to dial stays the node's decision.
- ``dht=True`` joins the Kademlia DHT and, with ``run``, finds the run's other peers
  there (``_dht``): they go to the discovery handler like mDNS peers.
- ``nat`` (a ``_nat.NatSettings``) turns on reachability checks (AutoNAT), circuit
  relay v2 (serving as a relay; reserving a slot and announcing the relayed address
  when unreachable; dialling ``/p2p-circuit`` addresses) and DCUtR hole punching.
  ``connection_kinds()`` tells for each connected peer whether it is reached directly
  or through a relay; kept streams on a relayed connection are dropped once a direct
  one exists, a peer reached by relay whose direct address is known is dialled there
  too, and a peer reached by relay is dialled through it again when the relay cut the
  circuit. A node that relays for others keeps relaying on ``close()`` while circuits
  through it are in use (at most ``nat.linger`` seconds).

Logging: py-libp2p sets its ``libp2p`` logger to WARNING with ``propagate=False``
on import, and some of its modules call the *root* ``logging.debug``, which
installs a root handler behind the application's back; applications should call
``logging.basicConfig(..., force=True)`` (see ``configure_libp2p_logging``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import trio

from p2pfl.transport import _slim_imports  # noqa: F401  # isort: skip  (before libp2p)
from libp2p import new_host
from libp2p.abc import IHost, IMuxedStream, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamEOF
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import YamuxStream
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr import Multiaddr

from p2pfl.errors import P2PFLError
from p2pfl.wire.framing import ACK, FRAME_HEADER_BYTES, frame_header, frame_length

from . import _trio_bridge
from ._admission import Admission, Gate
from ._inbound import guard_inbound_slots, peer_source
from ._peerstore import known_addrs
from ._streams import close_quietly as _close
from ._streams import reset_quietly as _reset
from ._unread import UnreadBudget
from ._yamux import PatchedYamux, _PatchedYamuxStream, count_unread, use_patched_yamux
from .base import FrameAbuse, SendDone, Transport, TransportError
from .limits import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TRANSPORT_LIMITS, TransportLimits

__all__ = [
    "ACK",
    "DEFAULT_LISTEN_ADDRS",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEADER_SIZE",
    "MAX_IDLE_STREAMS",
    "PROTOCOL_ID",
    "Libp2pTransport",
    "configure_libp2p_logging",
]

PROTOCOL_ID = TProtocol("/p2pfl/msg/2.0.0")
HEADER_SIZE = FRAME_HEADER_BYTES  # frames are p2pfl.wire.framing's (ACK is re-exported)
DEFAULT_LISTEN_ADDRS = ("/ip4/127.0.0.1/tcp/0",)
DEFAULT_MAX_MESSAGE_SIZE = DEFAULT_MAX_MESSAGE_BYTES
MAX_IDLE_STREAMS = 4
"""Idle outbound streams kept open per peer for later sends."""

T = TypeVar("T")

_COALESCE_LIMIT = 64 * 1024
#: seconds a peer known by direct and relayed addresses is tried directly before the relay
_DIRECT_FIRST = 3.0

_log = logging.getLogger(__name__)


#: py-libp2p loggers that report a network's ordinary events as warnings or errors, kept
#: quiet by ``configure_libp2p_logging``: a dial to a peer that is down (peers crash,
#: restart, leave; the node reports it in its own terms), the DHT's peers that could not
#: be told of a record and its records older than one it holds, the relay's peer that
#: closed its stream after a reservation
NOISY_LOGGERS = ("libp2p.transport.tcp", "libp2p.kad_dht", "libp2p.relay.circuit_v2.protocol")


def configure_libp2p_logging(
    level: int = logging.WARNING, *, propagate: bool = True, quiet: bool = True
) -> None:
    """Set the level of py-libp2p's ``libp2p`` logger and let its records reach the root
    handlers; with ``quiet``, :data:`NOISY_LOGGERS` report only critical records.

    py-libp2p turns propagation off, so without this its warnings bypass the
    application's handlers and go to Python's last-resort stderr handler.
    """
    logger = logging.getLogger("libp2p")
    logger.setLevel(level)
    logger.propagate = propagate
    for name in NOISY_LOGGERS:  # NOTSET: the ``libp2p`` logger's level applies
        logging.getLogger(name).setLevel(logging.CRITICAL if quiet else logging.NOTSET)


class _NoAutoConnect(AutoConnector):
    """The swarm's auto-connector, minus the dialling.

    py-libp2p's swarm dials every peer in its peerstore, every 10 s and after each
    disconnect, until it holds ``min_connections`` (50) connections.  Which peers a
    node talks to is the node's decision (its topology policy), so this
    transport dials only when asked.
    """

    async def maybe_connect(self) -> None:
        return


# what a frame's timer was timing when it ran out (see ``_receive_frame``)
_AWAITED = "awaited"  # the frame's first bytes
_PREFIX = "prefix"  # the rest of its length prefix
_ROOM = "room"  # room to hold its body
_BODY = "body"  # its body


class _FrameError(P2PFLError):
    """An inbound frame that is not acceptable.

    ``counter`` names the stat it counts as, ``abuse`` what to report to the abuse
    handler (``None``: nothing, the sender is not to blame).
    """

    def __init__(self, counter: str, message: str, abuse: FrameAbuse | None = None) -> None:
        super().__init__(message)
        self.counter = counter
        self.abuse = abuse


class _StaleStream(P2PFLError):
    """A kept outbound stream that the receiver had closed: the frame may be sent again."""


async def _read_exactly(stream: INetStream, size: int, idle_timeout: float) -> bytes:
    """Read ``size`` bytes of a frame; a stream that ends early or stays silent is truncated.

    Memory grows with the bytes actually received, not with the length a peer
    claims, and each read asks for no more than what is still due.  Chunks are
    appended to one buffer (no second copy of a whole frame to join them), which
    is handed on as it is.  Frames are read and written on the muxed stream
    itself: ``NetStream`` adds only a state check behind a lock, which costs a
    trip through the trio scheduler per call.
    """
    buffer = bytearray()
    received = 0
    muxed = _muxed(stream)
    while received < size:
        want = size - received
        try:
            if _buffered(stream) >= want:
                chunk = await muxed.read(want)  # here already: no idle timer to set up
            else:
                with trio.fail_after(idle_timeout):
                    chunk = await muxed.read(want)
        except trio.TooSlowError:
            raise _FrameError(
                "truncated",
                f"silent for {idle_timeout}s after {received} of {size} bytes",
                FrameAbuse.STALLED,
            ) from None
        except Exception as exc:  # EOF, reset, connection lost
            raise _FrameError(
                "truncated",
                f"stream ended after {received} of {size} bytes: {exc!r}",
                FrameAbuse.TRUNCATED,
            ) from exc
        if not chunk:
            raise _FrameError(
                "truncated", f"stream ended after {received} of {size} bytes", FrameAbuse.TRUNCATED
            )
        if not buffer and len(chunk) == size:
            return chunk  # the whole frame in one read: no copy at all
        buffer += chunk
        del chunk  # the buffer holds it; do not keep a second copy alive
        received = len(buffer)
    return buffer  # type: ignore[return-value]  # a bytearray: a bytes-like payload


def _net(stream: INetStream) -> NetStream:
    """The py-libp2p ``NetStream`` behind the interface (the only kind its hosts make)."""
    assert isinstance(stream, NetStream), type(stream)
    return stream


def _muxed(stream: INetStream) -> IMuxedStream:
    """The muxed stream under ``stream``: frames are read and written on it directly."""
    return _net(stream).muxed_stream


def _buffered(stream: INetStream) -> int:
    """Bytes received on ``stream`` and not read yet (0 where the muxer does not say)."""
    buffered = getattr(_muxed(stream), "buffered", None)
    return buffered() if buffered is not None else 0


def _reusable(stream: INetStream) -> bool:
    """Whether a kept stream is still open both ways, as far as this side knows."""
    muxed = _muxed(stream)
    if isinstance(muxed, YamuxStream):  # every stream here: its flags read directly
        if muxed.closed or muxed.send_closed or muxed.recv_closed or muxed.reset_received:
            return False
    else:
        for flag in ("closed", "send_closed", "recv_closed", "reset_received"):
            if getattr(muxed, flag, False):
                return False
    return not getattr(stream.muxed_conn, "is_closed", False)


def _ended(conn: object) -> bool:
    """Whether a swarm or muxed connection is closed or closing (a yamux GO_AWAY sent
    or received counts: no new frame gets through it)."""
    if getattr(conn, "is_closed", False):
        return True
    shutting_down = getattr(conn, "event_shutting_down", None)
    return shutting_down is not None and bool(shutting_down.is_set())


def _was_reset(stream: INetStream) -> bool:
    return bool(getattr(_muxed(stream), "reset_received", False))


async def _failed(stream: INetStream, exc: BaseException) -> NoReturn:
    """Reset ``stream`` after ``exc`` (raised writing a frame or reading its
    acknowledgement) and raise: ``_StaleStream`` for an error on a stream that was not
    reset (the receiver closed it before this frame: the frame goes on a new stream),
    ``exc`` itself otherwise (a cancel or a timeout too: the frame may be half sent)."""
    stale = isinstance(exc, Exception) and not _was_reset(stream)
    await _reset(stream)
    if stale:
        raise _StaleStream(repr(exc)) from exc
    raise exc


async def _await_ack(stream: INetStream) -> None:
    """Read a frame's acknowledgement; the stream is reset if it does not come (see
    ``_failed``), or something else does."""
    try:
        ack = await _muxed(stream).read(1)
    except BaseException as exc:
        await _failed(stream, exc)
    if ack != ACK:
        await _reset(stream)
        if not ack:
            raise _StaleStream("stream ended where the acknowledgement was due")
        raise TransportError(f"peer answered {ack!r} instead of an acknowledgement")


async def _awaited(work: Coroutine[Any, Any, None]) -> None:
    await work


def _transport_error(what: str, error: Exception) -> TransportError:
    """``error`` of a call to the trio side as the ``TransportError`` the node sees."""
    if isinstance(error, TransportError):
        return error
    if isinstance(error, trio.TooSlowError):
        mapped = TransportError(f"{what}: timed out")
    else:
        mapped = TransportError(f"{what}: {error!r}")
    mapped.__cause__ = error
    return mapped



class _Disconnects(INotifee):
    """Drops the kept streams of a connection that closed; has a change of how a peer is
    connected (direct / relayed) logged at once, not on NAT traversal's next tick (a
    node that ends its run within that second would not say so)."""

    def __init__(self, transport: Libp2pTransport) -> None:
        self._transport = transport

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._transport._forget_connection(conn)
        self._transport._note_kinds()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._transport._note_kinds()

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class Libp2pTransport(Transport):
    """A ``Transport`` over py-libp2p: TCP, Noise, yamux, frames on reused streams.

    ``key_pair`` is the node's persisted Ed25519 libp2p key pair: the peer id is
    derived from it.  ``max_message_size`` caps inbound (and outbound) payloads;
    ``read_idle_timeout`` bounds how long an inbound stream may stay silent within
    a frame before it is dropped as truncated, ``stream_idle_timeout`` how long
    between frames before it is closed; ``limits`` are the per-peer and per-node
    resource bounds (``TransportLimits``).  ``mdns`` announces this host on the LAN
    and reports peers found there to the discovery handler.
    """

    def __init__(
        self,
        key_pair: KeyPair,
        *,
        listen_addrs: Sequence[str] = DEFAULT_LISTEN_ADDRS,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        read_idle_timeout: float = 30.0,
        stream_idle_timeout: float = 60.0,
        mdns: bool = False,
        limits: TransportLimits | None = None,
        dht: bool = False,
        run: str | None = None,
        dht_interval: float = 30.0,
        nat: Any = None,
    ) -> None:
        super().__init__()
        if not 0 < max_message_size < 2 ** (8 * HEADER_SIZE):
            raise ValueError(f"max_message_size must fit the {HEADER_SIZE}-byte length prefix")
        self._key_pair = key_pair
        self.peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
        self._listen = [Multiaddr(addr) for addr in listen_addrs]
        self.max_message_size = max_message_size
        self.read_idle_timeout = read_idle_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.mdns = mdns
        self.limits = limits or DEFAULT_TRANSPORT_LIMITS
        if run is not None and not dht:
            raise ValueError("a run name is looked up in the DHT: it needs dht=True")
        self.dht = dht
        self.run = run
        self.dht_interval = dht_interval
        self._finder: Any = None  # the _dht.RunFinder while the host runs (trio thread)
        self.nat = nat  # a _nat.NatSettings: reachability, relay, hole punching (None: off)
        self._nat: Any = None  # the _nat.NatTraversal while the host runs (trio thread)
        self._relayed_addrs: list[Multiaddr] = []  # ours through relays (trio thread)
        self._circuit_addrs: dict[ID, Multiaddr] = {}  # how we reached a peer by relay
        self._admission: Admission | None = None  # built on the trio thread by _serve
        # bytes the streams hold unread beyond admitted frames, bounded (see _unread)
        self._unread = UnreadBudget(self.limits.max_unread)
        # bytes of handled frames not yet given back to the admission (from the asyncio
        # thread), and how many frames wait for room meanwhile; under ``_frees_lock``
        self._frees: list[tuple[str, int]] = []
        self._frees_lock = threading.Lock()
        self._waiting_room = 0
        self._frees_called = False
        # per peer: frames this side may still have in flight to it (trio thread only)
        self._send_slots: dict[ID, trio.Semaphore] = {}
        self._bridge: _trio_bridge.TrioThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host: IHost | None = None
        self._stop: trio.Event | None = None
        self._stopped: trio.Event | None = None
        self._closed = False
        # kept outbound streams per peer, with the trio time they became idle (trio thread only)
        self._idle: dict[ID, list[tuple[INetStream, float]]] = {}
        # the deadlines of sends without a task of their own, while the host serves
        self._deadlines: _SendDeadlines | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._bridge is not None or self._closed:
            raise TransportError("a transport can be started only once")
        for addr in self._listen:
            _check_port_free(addr)
        self._loop = asyncio.get_running_loop()
        self._bridge = _trio_bridge.acquire()
        try:
            addrs = await self._bridge.run(self._bridge_start)
        except BaseException as exc:
            bridge, self._bridge = self._bridge, None
            self._closed = True
            _trio_bridge.release(bridge)
            if isinstance(exc, Exception):
                raise TransportError(f"could not start listening: {exc!r}") from exc
            raise
        self.listen_addrs = addrs

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        bridge, self._bridge = self._bridge, None
        if bridge is None:
            return
        try:
            await bridge.run(self._shutdown)
        except Exception:  # noqa: BLE001 - closing must not fail; the thread is stopped below
            _log.warning("libp2p host did not shut down cleanly", exc_info=True)
        finally:
            self.listen_addrs = []
            _trio_bridge.release(bridge)

    async def _bridge_start(self) -> list[str]:
        assert self._bridge is not None
        return await self._bridge.nursery.start(self._serve)

    async def _serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the host until ``close``; lives in the bridge's root nursery."""
        self._stop, self._stopped = trio.Event(), trio.Event()
        started = False
        self._admission = Admission(self.limits, self.max_message_size)
        for peer in list(self._banned):  # bans decided before the start
            if self.is_banned(peer):
                self._admission.ban(peer, self._banned[peer] - time.monotonic())
        gate = Gate(self._admission, self._refused)
        try:
            host = new_host(
                key_pair=self._key_pair,
                sec_opt={
                    NOISE_PROTOCOL_ID: NoiseTransport(
                        self._key_pair, noise_privkey=create_x25519_key_pair().private_key
                    )
                },
                muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): PatchedYamux},
                listen_addrs=self._listen,
                connection_config=ConnectionConfig(max_connections_per_peer=1),
                addrs_factory=concrete_addrs,
                enable_mDNS=self.mdns,
                resource_manager=gate,
            )
            if self.mdns:
                peerDiscovery.register_peer_discovered_handler(self._on_mdns_peer)
            use_patched_yamux(host, on_abuse=self._on_flow_abuse)
            count_unread(host, self._unread)
            network = host.get_network()
            assert isinstance(network, Swarm)  # what new_host builds
            network.auto_connector = _NoAutoConnect(network)
            guard_inbound_slots(network, self._refused)  # see _inbound
            gate.source_of = lambda peer: _source_of(network, peer)
            network.retry_config = RetryConfig(max_retries=1)
            network.register_notifee(_Disconnects(self))
            async with host.run(listen_addrs=self._listen):
                try:
                    # The swarm logs a failed listen at debug level and carries on without it.
                    missing = [str(a) for a in self._listen if str(a) not in network.listeners]
                    if missing:
                        raise TransportError(f"could not listen on {', '.join(missing)}")
                    host.set_stream_handler(PROTOCOL_ID, self._on_stream)
                    self._host = host
                    async with trio.open_nursery() as services:
                        self._deadlines = _SendDeadlines()
                        services.start_soon(self._deadlines.run)
                        if self.nat is not None:
                            await services.start(self._run_nat, host)
                        if self.dht:
                            await services.start(self._run_dht, host)
                        task_status.started([str(addr) for addr in host.get_addrs()])
                        started = True
                        await self._stop.wait()
                        nat = self._nat
                        if nat is not None:  # a relay: the circuits it carries end first
                            await nat.linger()
                        services.cancel_scope.cancel()
                finally:
                    self._host = None
                    self._deadlines = None
                    with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                        await self._close_kept_streams()
                        await host.close()
        except Exception:
            if not started:
                raise  # reported to start() through nursery.start
            # Raising here would take down the shared trio loop with every transport on it.
            _log.exception("libp2p host of %s failed", self.peer_id)
        finally:
            if self.mdns:
                peerDiscovery.unregister_peer_discovered_handler(self._on_mdns_peer)
            self._stopped.set()

    async def _run_dht(self, host: IHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the DHT and look the run's peers up (see ``_dht``) until the host stops."""
        from ._dht import RunFinder

        finder = RunFinder(
            host, self.run, self._on_dht_peer, interval=self.dht_interval, extra=self._announced
        )
        self._finder = finder
        task_status.started()
        try:
            await finder.run()
        except Exception:  # noqa: BLE001 - must not take the host (and the trio loop) down
            _log.exception(
                "DHT discovery of %s failed; bootstrap, peer exchange and mDNS go on", self.peer_id
            )
        finally:
            self._finder = None

    def _announced(self) -> list[Multiaddr]:
        """Our addresses through relays, announced after the host's own ones.

        Not through the host's ``addrs_factory``: ``BasicHost.get_addrs`` cuts every
        address at its first ``/p2p/`` and appends our id, which turns
        ``<relay>/p2p/R/p2p-circuit`` into the relay's own address under our id.
        """
        return list(self._relayed_addrs)

    async def _run_nat(self, host: IHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Reachability, relay, reservations and hole punching (see ``_nat``) until the host stops."""
        from ._nat import NatTraversal

        nat = NatTraversal(
            host, self.nat, self._advertise_relayed, max_message=self.max_message_size
        )
        self._nat = nat
        try:
            await nat.run(task_status=task_status)
        except Exception:  # noqa: BLE001 - must not take the host (and the trio loop) down
            _log.exception("NAT traversal of %s failed; direct connections go on", self.peer_id)
        finally:
            self._nat = None

    def _advertise_relayed(self, addrs: list[str]) -> None:
        """Our addresses through relays changed (trio thread): announce them from now on."""
        self._relayed_addrs = [Multiaddr(addr) for addr in addrs]
        host = self._host
        if host is not None:
            own = [str(addr) for addr in host.get_addrs()]
            # a hello keeps 4 addresses per peer: the relayed ones must be among them
            announced = own[:2] + list(addrs) + own[2:]
            self._to_asyncio(setattr, self, "listen_addrs", announced)

    def _on_dht_peer(self, peer: str, addrs: list[str]) -> None:
        """A peer of our run found in the DHT (trio thread): to the discovery handler."""
        if peer != self.peer_id and not self._closed:
            self._to_asyncio(self._discovered, peer, addrs)

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        """A peer found by mDNS; called on a zeroconf thread, handed over to asyncio.

        py-libp2p's discovery events are process-wide: every mDNS host of this process
        reports here, which on one LAN names peers this host can reach as well.
        """
        peer = info.peer_id.to_base58()
        loop = self._loop
        if peer == self.peer_id or loop is None or self._closed:
            return
        suffix = f"/p2p/{peer}"
        addrs = sorted({_without_p2p(str(addr)) + suffix for addr in info.addrs})
        if addrs:
            try:
                loop.call_soon_threadsafe(self._discovered, peer, addrs)
            except RuntimeError:  # the asyncio loop is closed
                pass

    async def _shutdown(self) -> None:
        assert self._stop is not None and self._stopped is not None
        self._stop.set()
        linger = self.nat.linger if self.nat is not None else 0.0
        with trio.move_on_after(10.0 + linger):
            await self._stopped.wait()

    # -- calls from asyncio ------------------------------------------------

    def _running_bridge(self) -> _trio_bridge.TrioThread:
        if self._bridge is None or self._closed:
            raise TransportError("transport is not started")
        return self._bridge

    def _running_host(self) -> IHost:
        host = self._host
        if host is None:
            raise TransportError("transport is closed")
        return host

    async def _call(
        self,
        what: str,
        fn: Any,
        *args: Any,
        timeout: float | None = None,
        now: Callable[[_trio_bridge.BridgeCall], bool] | None = None,
    ) -> Any:
        """Run a trio coroutine for this transport, mapping every failure to ``TransportError``
        (``timeout``: seconds the trio side may take; ``now``: a direct attempt first; see
        ``TrioThread.run``)."""
        bridge = self._running_bridge()
        try:
            return await bridge.run(fn, *args, timeout=timeout, now=now)
        except Exception as exc:
            raise _transport_error(what, exc) from exc

    async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
        try:
            info = info_from_p2p_addr(Multiaddr(addr))
        except Exception as exc:
            raise TransportError(f"not a dialable /p2p multiaddr: {addr!r}") from exc
        if info.peer_id.to_base58() == self.peer_id:
            raise TransportError("cannot connect to oneself")
        await self._call(f"connect to {addr}", self._connect_in_trio, info, timeout)
        return info.peer_id.to_base58()

    async def send(self, peer: str, data: bytes, *, timeout: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done = functools.partial(_trio_bridge.resolve, future, None)
        call = self._start_send(peer, data, timeout, done)
        if call is None:  # refused before it began: its error is on the way to the future
            await future
        else:
            await call.owner.outcome_of(call, future)

    def send_soon(self, peer: str, data: bytes, *, timeout: float, done: SendDone) -> None:
        self._start_send(peer, data, timeout, done)

    def _start_send(
        self, peer: str, data: bytes, timeout: float, done: SendDone
    ) -> _trio_bridge.BridgeCall | None:
        """Start a send (see ``send_soon``); the bridge call, to cancel it, if one began."""
        try:
            peer_id = _parse_peer(peer)
            if len(data) > self.max_message_size:
                raise TransportError(
                    f"payload of {len(data)} bytes exceeds the cap of {self.max_message_size}"
                )
            data = bytes(data)
            return self._running_bridge().start_call(
                self._send_in_trio,
                peer_id,
                data,
                timeout=timeout,
                now=functools.partial(_DirectSend.start, self, peer_id, data),
                outcome=functools.partial(self._sent, peer, len(data), done),
            )
        except (TransportError, _trio_bridge.BridgeClosed) as exc:
            error = _transport_error(f"send to {peer}", exc)
            self._count(send_failures=1)
            asyncio.get_running_loop().call_soon(done, error)
            return None

    def _sent(
        self,
        peer: str,
        size: int,
        done: SendDone,
        result: Any,
        error: BaseException | None,
    ) -> None:
        """A send's outcome, on the asyncio loop: counted, then handed to ``done``."""
        if error is None:
            self._count(messages_sent=1, bytes_sent=size)
            done(None)
            return
        if isinstance(error, Exception):  # (a cancel is the caller's own doing: not counted)
            error = _transport_error(f"send to {peer}", error)
            self._count(send_failures=1)
        done(error)

    async def ping(self, peer: str, *, timeout: float) -> float:
        return await self._call(f"ping {peer}", self._ping_in_trio, _parse_peer(peer), timeout)

    def ban(self, peer: str, seconds: float) -> None:
        super().ban(peer, seconds)
        bridge = self._bridge
        if bridge is None or self._closed:
            return  # applied at the start (see _serve), or nothing left to cut off
        try:
            peer_id = _parse_peer(peer)
            bridge.call_soon(self._ban_in_trio, peer_id, seconds)
        except (TransportError, _trio_bridge.BridgeClosed):
            pass

    def connected_peers(self) -> list[str]:
        return self._read_trio_state(
            lambda host: sorted(peer.to_base58() for peer in host.get_connected_peers()), []
        )

    def known_addrs(self) -> dict[str, list[str]]:
        return self._read_trio_state(self._known_addrs_in_trio, {})

    def connection_kinds(self) -> dict[str, str]:
        """How each connected peer is reached: ``"direct"`` if any connection to it is
        direct, ``"relayed"`` if all go through a circuit relay."""
        return self._read_trio_state(self._connection_kinds_in_trio, {})

    def reachability(self) -> str:
        """``"public"``, ``"private"`` (behind NAT: reached through relays), ``"unknown"``
        (not decided yet) or ``"off"`` (NAT traversal not enabled)."""

        def read(host: IHost) -> str:
            nat = self._nat
            if nat is None:
                return "off"
            return {1: "public", 2: "private"}.get(int(nat.status), "unknown")

        return self._read_trio_state(read, "off")

    def _read_trio_state(self, read: Any, default: T) -> T:
        """Read host state on the trio thread (the only thread that mutates it)."""
        bridge, host = self._bridge, self._host
        if bridge is None or host is None:
            return default
        try:
            return bridge.run_sync(read, host)
        except _trio_bridge.BridgeClosed:
            return default

    # -- trio side ---------------------------------------------------------

    async def _connect_in_trio(self, info: PeerInfo, timeout: float) -> None:
        host = self._running_host()
        _forget_failed_dial(host, info.peer_id)
        circuits = [addr for addr in info.addrs if "/p2p-circuit" in str(addr)]
        with trio.fail_after(timeout):
            if not circuits:
                await host.connect(info)
            elif info.peer_id not in host.get_connected_peers():
                # info_from_p2p_addr cut the destination's /p2p/<id> off: put it back
                suffix = f"/p2p/{info.peer_id.to_base58()}"
                circuit = str(circuits[0])
                circuit = circuit if circuit.endswith(suffix) else circuit + suffix
                await self._dial_relayed(info.peer_id, Multiaddr(circuit))

    async def _dial_relayed(self, peer: ID, addr: Multiaddr) -> None:
        """Connect to ``peer`` through the relay in a /p2p-circuit address (``_nat``)."""
        nat = self._nat
        if nat is None:
            raise TransportError(
                f"{addr} is an address through a relay: dialling it needs "
                "network.reachability (auto, public or private)"
            )
        await nat.dial(addr, peer)
        self._circuit_addrs[peer] = addr
        if len(self._circuit_addrs) > 4096:  # bounded: forget the oldest
            del self._circuit_addrs[next(iter(self._circuit_addrs))]

    async def _redial_relayed(self, host: IHost, peer: ID, timeout: float | None) -> None:
        """Reconnect to a peer reached through a relay before (the relay cut the circuit
        at its limits) or known only by a relayed address, before a send or ping; the
        swarm itself never dials /p2p-circuit addresses."""
        if self._nat is None:
            return
        conns = host.get_network().get_connections(peer)
        if any(not getattr(conn, "is_closed", False) for conn in conns):
            return  # (a cut circuit's connection may linger in the swarm's map, closed)
        circuit = self._circuit_addrs.get(peer)
        if circuit is None:
            known = known_addrs(host, peer)
            relayed = [a for a in known if "/p2p-circuit" in str(a)]
            if not relayed:
                return  # the swarm dials direct addresses itself
            direct = [a for a in known if "/p2p-circuit" not in str(a)]
            if direct:  # its direct addresses first, briefly: behind NAT they fail
                with trio.move_on_after(_DIRECT_FIRST):
                    try:
                        await host.connect(PeerInfo(peer, direct))
                        return
                    except Exception:  # noqa: BLE001 - not reachable directly: the relay
                        pass
            circuit = Multiaddr(_with_peer(str(relayed[0]), peer.to_base58()))
        with trio.fail_after(timeout if timeout is not None else math.inf):
            await self._dial_relayed(peer, circuit)

    def _connection_kinds_in_trio(self, host: IHost) -> dict[str, str]:
        nat = self._nat
        if nat is None:  # no relay protocol runs: every connection is direct
            return {peer.to_base58(): "direct" for peer in host.get_connected_peers()}
        return {peer.to_base58(): kind for peer, kind in nat.current_kinds().items()}

    def _ban_in_trio(self, peer: ID, seconds: float) -> None:
        """Refuse ``peer`` from now on and close its connections (in the background)."""
        admission, host, bridge = self._admission, self._host, self._bridge
        if admission is None or host is None or bridge is None:
            return
        admission.ban(peer.to_base58(), seconds)
        try:
            bridge.nursery.start_soon(self._cut_off, host, peer)
        except (_trio_bridge.BridgeClosed, RuntimeError):
            pass

    async def _cut_off(self, host: IHost, peer: ID) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            try:
                await host.get_network().close_peer(peer)
            except Exception:  # noqa: BLE001 - must not take the shared trio loop down
                _log.debug("closing the connections of %s failed", peer, exc_info=True)
        _log.debug("closed the connections of %s", peer)

    def stats(self) -> dict[str, int]:
        """The counters, and the unread bytes of ``_unread``: held now, at the peak, and
        the streams reset (with the bytes dropped) because they did not fit."""
        return {**super().stats(), **self._unread.summary()}

    def _refused(self, counter: str) -> None:
        """A connection or stream the admission refused, or an inbound handshake cut at
        its deadline (called on the trio thread)."""
        self._count(**{counter: 1})

    def _on_flow_abuse(self, peer: ID, why: str) -> None:
        """A peer sent past its yamux window (trio thread): close its connections."""
        _log.debug("closing the connections of %s: %s", peer, why)
        self._count(rejected_oversized=1)
        host, bridge = self._host, self._bridge
        if host is None or bridge is None:
            return
        self._to_asyncio(self._report_abuse, peer.to_base58(), FrameAbuse.OVERSIZED)
        try:
            bridge.nursery.start_soon(self._cut_off, host, peer)
        except (_trio_bridge.BridgeClosed, RuntimeError):
            pass

    async def _send_in_trio(self, peer: ID, data: bytes) -> None:
        """Send one frame to ``peer``; runs under the send's deadline (``_call``'s timeout)."""
        slots = self._slots_of(peer)
        try:
            try:  # a free slot is taken without a trip through the scheduler
                slots.acquire_nowait()
            except trio.WouldBlock:  # the receiver resets streams over its bound: wait instead
                await slots.acquire()
            try:
                await self._send_frame(peer, data)
            finally:
                slots.release()
        finally:
            self._forget_slots(peer, slots)

    def _slots_of(self, peer: ID) -> trio.Semaphore:
        """The frames this side may still have in flight to ``peer`` (``max_sends_per_peer``)."""
        slots = self._send_slots.get(peer)
        if slots is None:
            slots = self._send_slots[peer] = trio.Semaphore(self.limits.max_sends_per_peer)
        return slots

    def _forget_slots(self, peer: ID, slots: trio.Semaphore) -> None:
        """Drop ``peer``'s slots once none is taken or waited for (one per peer sent to)."""
        if (
            slots.value == self.limits.max_sends_per_peer
            and not slots.statistics().tasks_waiting
            and self._send_slots.get(peer) is slots
        ):
            del self._send_slots[peer]

    async def _send_frame(self, peer: ID, data: bytes) -> None:
        host = self._running_host()
        await self._redial_relayed(host, peer, None)
        stream = await self._take_kept(peer)
        if stream is not None and await self._sent_on_kept(
            peer, stream, self._exchange(stream, data)
        ):
            return
        await self._send_on_new_stream(host, peer, data)

    async def _sent_on_kept(
        self, peer: ID, stream: INetStream, exchange: Coroutine[Any, Any, None]
    ) -> bool:
        """Finish ``exchange`` (a frame's, on a kept stream) and keep the stream again;
        false if the stream turned out closed, or its connection gone while another one
        to ``peer`` is open: the frame goes on a new stream then."""
        try:
            await exchange
        except _StaleStream as exc:  # closed by the receiver meanwhile: once more
            _log.debug("kept stream to %s was closed (%s): retrying", peer, exc)
            return False
        except Exception as exc:
            if not self._moved_away(peer, stream):
                raise
            _log.debug("connection to %s closed during a send (%r): retrying", peer, exc)
            return False
        await self._keep(peer, stream)
        return True

    async def _send_on_new_stream(self, host: IHost, peer: ID, data: bytes) -> None:
        stream = await host.new_stream(peer, [PROTOCOL_ID])
        try:
            await self._exchange(stream, data)
        except Exception as exc:
            if not self._moved_away(peer, stream):
                raise
            # its connection closed under the frame (a relayed one retired once a direct
            # one exists): once more on another; a copy that did arrive is a replay the
            # receiver drops (same signed sequence number)
            _log.debug("connection to %s closed during a send (%r): retrying", peer, exc)
            stream = await host.new_stream(peer, [PROTOCOL_ID])
            await self._exchange(stream, data)
        await self._keep(peer, stream)

    def _moved_away(self, peer: ID, stream: INetStream) -> bool:
        """Whether ``stream``'s connection is ending while another one to ``peer`` is open.

        Ending is read from the swarm's side as well as the muxer's: the swarm marks its
        connection closed first and only then closes the muxer, which yields (a relayed
        connection's secure channel closes through the relay) before it reports closed.
        A frame cut in that gap failed the send although the direct connection was there.
        """
        if self._host is None:
            return False
        muxed = stream.muxed_conn
        live = [c for c in self._host.get_network().get_connections(peer) if not _ended(c)]
        if any(c.muxed_conn is muxed for c in live) and not _ended(muxed):
            return False
        return any(c.muxed_conn is not muxed and not _ended(c.muxed_conn) for c in live)

    async def _exchange(self, stream: INetStream, data: bytes) -> None:
        """Write one frame and wait for its acknowledgement; a failed stream is reset.

        Raises ``_StaleStream`` when the stream turned out closed without a reset
        (the receiver closed it before this frame), any other error otherwise.
        """
        muxed = _muxed(stream)  # frames skip NetStream (see _read_exactly)
        try:
            header = frame_header(len(data))
            small = len(data) <= _COALESCE_LIMIT
            frame = header + data if small else b""  # one frame instead of two
            # A small frame goes to the socket at once when the window and the connection
            # allow (no write in progress): nothing to wait for, nothing a cancel can cut.
            write_now = getattr(muxed, "try_write_now", None)  # (streams of our yamux)
            if not (small and write_now is not None and write_now(frame)):
                # Cancelling a write can cut a Noise message of the connection in half,
                # which breaks the connection and every stream on it (other frames,
                # circuits a relay carries on it): a node that stops cancels its sends
                # still in flight. The frame is written whole, shielded from that; the
                # send's deadline still holds.
                with trio.CancelScope(deadline=trio.current_effective_deadline(), shield=True):
                    if small:
                        await muxed.write(frame)
                    else:  # not worth copying a model for
                        await muxed.write(header)
                        await muxed.write(data)
                await trio.lowlevel.checkpoint_if_cancelled()  # cancelled or timed out meanwhile
        except BaseException as exc:  # (a cancel too: the frame may be half sent)
            await _failed(stream, exc)
        await _await_ack(stream)

    async def _take_kept(self, peer: ID) -> INetStream | None:
        """A kept stream to ``peer`` that is still open and fresh; stale ones are closed."""
        kept = self._idle.get(peer)
        if not kept:
            return None
        found: INetStream | None = None
        stale: list[INetStream] = []
        relayed = self._relayed_only_streams(peer)
        while kept and found is None:
            stream, since = kept.pop()  # the most recently used first
            if self._fresh(stream, since) and stream.muxed_conn not in relayed:
                found = stream
            else:
                stale.append(stream)
        if not kept:
            del self._idle[peer]
        for stream in stale:
            await _close(stream)
        return found

    def _fresh(self, stream: INetStream, since: float) -> bool:
        """Whether a stream kept since ``since`` may carry the next frame: open both ways,
        and idle for less than half of ``stream_idle_timeout`` (the receiver closes it at
        the whole)."""
        return since > trio.current_time() - self.stream_idle_timeout / 2 and _reusable(stream)

    def _relayed_only_streams(self, peer: ID) -> list[Any]:
        """The muxed connections to ``peer`` that are relayed while a direct one exists:
        streams kept on them are dropped, so that traffic moves to the direct one."""
        if self._nat is None or self._host is None:
            return []
        from ._nat import DIRECT, connection_kind

        conns = self._host.get_network().get_connections(peer)
        kinds = [(conn, connection_kind(conn)) for conn in conns]
        if not any(kind == DIRECT for _, kind in kinds):
            return []
        return [conn.muxed_conn for conn, kind in kinds if kind != DIRECT]

    async def _keep(self, peer: ID, stream: INetStream) -> None:
        """Put a stream back for the next send to ``peer``, or close it if enough are kept."""
        if not self._keep_now(peer, stream):
            await _close(stream)

    def _keep_now(self, peer: ID, stream: INetStream) -> bool:
        """Put a stream back for the next send to ``peer``; false if it is not to be kept
        (enough are, it is not open both ways, the host is closed): then close it."""
        kept = self._idle.setdefault(peer, [])
        if self._host is None or len(kept) >= MAX_IDLE_STREAMS or not _reusable(stream):
            if not kept:
                del self._idle[peer]
            return False
        kept.append((stream, trio.current_time()))
        return True

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a reset, a close) in the trio loop's root nursery; dropped, not
        raised, when the loop is stopping."""
        bridge = self._bridge
        try:
            if bridge is None:
                raise _trio_bridge.BridgeClosed("no trio loop")
            bridge.nursery.start_soon(_awaited, work)
        except (_trio_bridge.BridgeClosed, RuntimeError):
            work.close()

    def _note_kinds(self) -> None:
        nat = self._nat
        if nat is not None:
            nat.note_kinds()

    def _forget_connection(self, conn: INetConn) -> None:
        """Drop the kept streams of a closed connection (they died with it)."""
        muxed = conn.muxed_conn
        kept = self._idle.get(muxed.peer_id)
        if kept:
            kept[:] = [entry for entry in kept if entry[0].muxed_conn is not muxed]
            if not kept:
                del self._idle[muxed.peer_id]

    async def _close_kept_streams(self) -> None:
        kept = [stream for streams in self._idle.values() for stream, _ in streams]
        self._idle.clear()
        for stream in kept:
            await _close(stream)

    async def _ping_in_trio(self, peer: ID, timeout: float) -> float:
        host = self._running_host()
        _forget_failed_dial(host, peer)  # a ping is the liveness probe: it must really try
        await self._redial_relayed(host, peer, timeout)
        with trio.fail_after(timeout):
            stream = await host.new_stream(peer, [PING_PROTOCOL_ID])
            try:
                began = time.perf_counter()
                await perform_ping_roundtrip(stream)
                rtt = time.perf_counter() - began
            except BaseException:
                await _reset(stream)
                raise
            await stream.close()
        return rtt

    def _known_addrs_in_trio(self, host: IHost) -> dict[str, list[str]]:
        store = host.get_peerstore()
        known: dict[str, list[str]] = {}
        for peer in store.peers_with_addrs():
            peer_b58 = peer.to_base58()
            if peer_b58 == self.peer_id:
                continue
            addrs = sorted({_with_peer(str(addr), peer_b58) for addr in known_addrs(host, peer)})
            if addrs:
                known[peer_b58] = addrs
        return known

    async def _on_stream(self, stream: INetStream) -> None:
        """Receive frames until the sender closes the stream (see the module docstring)."""
        sender = stream.muxed_conn.peer_id.to_base58()
        muxed = _muxed(stream)
        inline = _InlineFrames(self, muxed, sender) if hasattr(muxed, "inline") else None
        try:
            first = True
            while await self._receive_frame(stream, sender, first, inline):
                first = False
        except _FrameError as exc:
            self._count(**{exc.counter: 1})
            _log.debug("refused a frame from %s: %s", sender, exc)
            if exc.abuse is not None and self._host is not None:  # not our own shutdown
                # reported before the reset, so that asyncio hears of it before the sender's failure
                self._to_asyncio(self._report_abuse, sender, exc.abuse)
            await _reset(stream)

    async def _receive_frame(
        self, stream: INetStream, sender: str, first: bool, inline: _InlineFrames | None = None
    ) -> bool:
        """Receive one frame, hand it to asyncio and acknowledge it; False once the stream is over.

        Everything that decides whether the body is read at all (the cap, a ban, the
        room to hold it) is checked on the length prefix; the whole frame, waiting
        for room included, must arrive by its deadline. A stream's first frame must
        begin within ``frame_timeout`` of its opening (an honest sender writes at once),
        later ones within ``stream_idle_timeout``.

        One timer covers the frame from the wait for it to its last byte: its deadline
        moves from one step to the next (a cancel scope entered per step cost the trio
        thread ~5% of a node's round), and ``step`` says which one it cut.

        While it waits for a kept stream's next frame, ``inline`` may take whole frames
        as the connection's reader sees them arrive (see ``_InlineFrames``); the wait goes
        on, its timer restarted by each.
        """
        admission = self._admission
        assert admission is not None  # set before the handler is
        limits = self.limits
        began = trio.current_time()  # a stream's first frame: from the stream's opening
        wait = limits.frame_timeout if first else self.stream_idle_timeout
        step = _AWAITED
        size = 0
        own = held = False
        try:
            with trio.CancelScope(deadline=began + wait) as timer:
                if inline is None or first:
                    header = await self._await_frame(stream)
                else:
                    header = await inline.await_frame(stream, timer)
                if header is None:
                    return False
                if not first:
                    began = trio.current_time()  # between frames the clock starts at the first byte
                if len(header) < HEADER_SIZE:
                    step = _PREFIX
                    timer.deadline = began + limits.frame_timeout
                    rest = HEADER_SIZE - len(header)
                    header += await _read_exactly(stream, rest, self.read_idle_timeout)
                size = frame_length(header)
                refusal = self._refusal(sender, size)
                if refusal is not None:
                    raise refusal
                step = _ROOM
                timer.deadline = began + limits.frame_seconds(size)
                self._apply_frees()
                # waiting for room that the peer's own frames take is the peer's doing
                own = admission.over_own_share(sender, size)
                if admission.fits(sender, size):
                    await admission.hold(sender, size)  # room now: no wait
                else:
                    await self._hold_waiting(admission, sender, size)  # the body unread
                held = True
                step = _BODY
                if admission.is_banned(sender):  # banned while it waited
                    raise _FrameError("refused_banned", "the sender is banned")
                grant = getattr(_muxed(stream), "admit", None)
                if grant is not None:
                    await grant(size)
                data = await _read_exactly(stream, size, self.read_idle_timeout) if size else b""
            if timer.cancelled_caught:
                await self._timed_out(
                    stream, step, first, size, timer.deadline - began, own, sender
                )
                return False
            if self._handler is None:
                raise _FrameError("unhandled", "no handler is set")
            if not self._to_asyncio(self._dispatch_held, sender, data, size):
                raise _FrameError("unhandled", "the asyncio loop is closed")
            held = False  # freed by _dispatch_held once the node has handled it
        finally:
            if held:
                admission.free(sender, size)
        self._count(messages_received=1, bytes_received=len(data))
        try:
            await _muxed(stream).write(ACK)
        except Exception as exc:  # noqa: BLE001 - the sender will time out and retry
            _log.debug("could not acknowledge a frame from %s: %r", sender, exc)
            await _reset(stream)
            return False
        return True

    def _refusal(self, sender: str, size: int) -> _FrameError | None:
        """Why a frame of ``size`` bytes from ``sender`` is refused on its length prefix
        alone (before its body is read), or None."""
        if size > self.max_message_size:
            return _FrameError(
                "rejected_oversized",
                f"frame of {size} bytes exceeds the cap of {self.max_message_size}",
                FrameAbuse.OVERSIZED,
            )
        admission = self._admission
        if admission is not None and admission.is_banned(sender):
            return _FrameError("refused_banned", "the sender is banned")
        if self._handler is None:  # nobody takes messages here (a relay server): unread
            return _FrameError("unhandled", "no handler is set")
        return None

    async def _timed_out(
        self,
        stream: INetStream,
        step: str,
        first: bool,
        size: int,
        seconds: float,
        own: bool,
        sender: str,
    ) -> None:
        """A frame's timer ran out at ``step``: end the stream, or raise ``_FrameError``
        (charged to the sender where the wait was its doing)."""
        if step == _AWAITED:  # no frame began
            if first:
                self._count(idle_streams_cut=1)
                await _reset(stream)
            else:
                await self._close_idle(stream)
            return
        if step == _PREFIX:
            raise _FrameError(
                "frames_cut",
                f"length prefix not whole within {self.limits.frame_timeout:.1f}s",
                FrameAbuse.STALLED,
            )
        if step == _BODY:
            raise _FrameError(
                "frames_cut",
                f"frame of {size} bytes not whole within {seconds:.1f}s",
                FrameAbuse.STALLED,
            )
        admission = self._admission
        own = own or (admission is not None and admission.over_own_share(sender, size))
        raise _FrameError(
            "frames_cut",
            f"no room for a frame of {size} bytes within {seconds:.1f}s"
            + (" (its own frames hold its share)" if own else ""),
            FrameAbuse.STALLED if own else None,
        )

    def _dispatch_held(self, sender: str, data: bytes, size: int) -> None:
        """Hand a frame to the node (asyncio thread), then free the bytes it held.

        The bytes go back to the admission on the trio thread: at once (one wake-up of
        that thread) only while a frame waits for room; otherwise with the next frame
        the trio side admits (``_apply_frees``), which is the only one to look at them.
        """
        try:
            self._dispatch(sender, data)
        finally:
            del data
            with self._frees_lock:
                self._frees.append((sender, size))
                wake = self._waiting_room > 0 and not self._frees_called
                if wake:
                    self._frees_called = True
            bridge = self._bridge
            if wake and bridge is not None:
                try:
                    bridge.call_soon(self._apply_frees)
                except _trio_bridge.BridgeClosed:
                    pass

    def _apply_frees(self) -> None:
        """Give the bytes of the frames the node has handled back to the admission (trio)."""
        if not self._frees and not self._frees_called:  # nothing handed over: no lock to take
            return
        with self._frees_lock:
            frees, self._frees = self._frees, []
            self._frees_called = False
        admission = self._admission
        if admission is not None:
            for sender, size in frees:
                admission.free(sender, size)

    async def _hold_waiting(self, admission: Admission, sender: str, size: int) -> None:
        """``admission.hold`` for a frame that does not fit now: frees handed over from
        then on wake this thread (see ``_dispatch_held``)."""
        with self._frees_lock:
            self._waiting_room += 1
        try:
            self._apply_frees()  # those handed over before it counted as waiting
            await admission.hold(sender, size)
        finally:
            with self._frees_lock:
                self._waiting_room -= 1

    async def _await_frame(self, stream: INetStream) -> bytes | None:
        """The first bytes (at most a length prefix) of the next frame; ``None`` when the
        stream ended (closed, or reset between frames). The caller's timer bounds the wait."""
        try:
            first = await _muxed(stream).read(HEADER_SIZE)
        except (StreamEOF, MuxedStreamEOF):  # the sender closed the stream: so do we
            first = b""
        except Exception as exc:  # noqa: BLE001 - reset, connection closed: the sender is gone
            begun = _buffered(stream)
            if begun:  # a frame had begun: cut half-way, whether this reader looked before
                # the reset or (its bytes and the reset read in one go) only after it
                raise _FrameError(
                    "truncated",
                    f"stream ended after {begun} bytes of a frame, before any was read: {exc!r}",
                    FrameAbuse.TRUNCATED,
                ) from exc
            await _reset(stream)
            return None
        if not first:
            await _close(stream)
            return None
        return first

    async def _close_idle(self, stream: INetStream) -> None:
        """Close an idle stream: our FIN, then the sender's (any frame that crossed it is dropped)."""
        try:
            await _net(stream).close_write()
            with trio.fail_after(self.read_idle_timeout):
                while await stream.read():
                    pass
        except Exception:  # noqa: BLE001 - EOF (the sender closed too), reset, or it stayed open
            pass
        if getattr(_muxed(stream), "recv_closed", False):
            await _close(stream)
        else:
            await _reset(stream)

    def _to_asyncio(self, fn: Any, *args: Any) -> bool:
        """Schedule ``fn(*args)`` on the asyncio loop; False if that loop is gone.

        Batched with the bridge's other hand-offs to that loop (the results of sends
        among them): frames that arrive together wake the asyncio thread once, not once
        each (every wake-up is a socket write here and an epoll return there)."""
        loop = self._loop
        if loop is None:
            return False
        return _trio_bridge.to_asyncio(loop, fn, *args)


def concrete_addrs(candidates: list[Multiaddr]) -> list[Multiaddr]:
    """The addresses to announce: wildcard listen addresses replaced by this host's interfaces.

    A host listening on ``/ip4/0.0.0.0`` would otherwise announce that address
    (through ``listen_addrs``, identify and peer exchange), which no peer can dial.
    """
    announced: list[Multiaddr] = []
    for addr in candidates:
        for concrete in expand_wildcard_address(addr):
            if concrete not in announced:
                announced.append(concrete)
    return announced


def _forget_failed_dial(host: IHost, peer: ID) -> None:
    """Lift the swarm's 60 s ban on dialling a peer whose last dial failed.

    ``send`` keeps the ban (a dead peer fails fast); ``connect`` and ``ping`` are
    explicit attempts, which must reach a peer that has restarted meanwhile.
    """
    unblock = getattr(host.get_network(), "unblock_peer", None)
    if unblock is not None:
        unblock(peer)


def _check_port_free(addr: Multiaddr) -> None:
    """Refuse a fixed TCP port that another socket listens on.

    py-libp2p binds its listeners with SO_REUSEPORT (for hole punching), so a
    second node on a taken port starts without error and the kernel then splits
    incoming connections between the two.  A probe bound without SO_REUSEPORT
    fails on such a port; SO_REUSEADDR lets it ignore TIME_WAIT leftovers of a
    node that just stopped.
    """
    names = {proto.name for proto in addr.protocols()}
    if "tcp" not in names or not names & {"ip4", "ip6"} or int(addr.value_for_protocol("tcp")) == 0:
        return
    family = socket.AF_INET6 if "ip6" in names else socket.AF_INET
    host = addr.value_for_protocol("ip6" if "ip6" in names else "ip4")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(addr.value_for_protocol("tcp"))))
        except OSError as exc:
            raise TransportError(f"cannot listen on {addr}: {exc.strerror}") from exc


#: peer ids already parsed (base58 decoding is pure Python, ~50 us: once per peer, not per
#: message); bounded, forgotten all at once when full (a node talks to few peers)
_PEER_IDS: dict[str, ID] = {}
_MAX_PEER_IDS = 4096


def _source_of(network: Swarm, peer: str) -> str | None:
    """Where ``peer``'s direct connection comes from (``_inbound.peer_source``)."""
    try:
        return peer_source(network, _parse_peer(peer))
    except TransportError:  # not a peer id: py-libp2p's own streams always name one
        return None


def _parse_peer(peer: str) -> ID:
    known = _PEER_IDS.get(peer)
    if known is not None:
        return known
    try:
        parsed = ID.from_base58(peer)
    except Exception as exc:
        raise TransportError(f"not a peer id: {peer!r}") from exc
    if len(_PEER_IDS) >= _MAX_PEER_IDS:
        _PEER_IDS.clear()
    _PEER_IDS[peer] = parsed
    return parsed


def _with_peer(addr: str, peer: str) -> str:
    """``addr`` ending in ``/p2p/<peer>``; a relayed address keeps its relay's /p2p part."""
    suffix = f"/p2p/{peer}"
    if "/p2p-circuit" in addr:
        return addr if addr.endswith(suffix) else addr.rstrip("/") + suffix
    return _without_p2p(addr) + suffix


def _without_p2p(addr: str) -> str:
    head, sep, _ = addr.partition("/p2p/")
    return head if sep else addr


class _InlineFrames:
    """Takes a kept stream's frames as the connection's reader sees them arrive, while
    the stream's task waits for the next one (``_PatchedYamuxStream.inline``).

    Each frame a node receives woke the stream's task, which read it out of the stream's
    buffer, held its bytes, handed it to asyncio and wrote the acknowledgement: a pass
    of trio's scheduler and a task switch per frame, on top of the reader's. A frame
    that arrives whole in one data frame, from a sender that is not banned, with room
    for it now, is taken here instead, with the same checks and the same outcome: held,
    handed over, counted, acknowledged (``write_now``), the wait's timer restarted. Any
    other frame (cut, oversized, no room, a ban, a stream no longer open both ways) is
    left in the buffer, and the waiting task takes it as before, with the timers and
    the charges of ``_receive_frame``.
    """

    __slots__ = ("muxed", "sender", "timer", "transport")

    def __init__(self, transport: Libp2pTransport, muxed: Any, sender: str) -> None:
        self.transport = transport
        self.muxed = muxed
        self.sender = sender
        self.timer: trio.CancelScope | None = None

    async def await_frame(self, stream: INetStream, timer: trio.CancelScope) -> bytes | None:
        """``Libp2pTransport._await_frame``, taking whole frames meanwhile."""
        muxed = self.muxed
        self.timer = timer
        muxed.inline = self
        try:
            return await self.transport._await_frame(stream)
        finally:
            muxed.inline = None
            self.timer = None

    def __call__(self, body: bytes) -> bool:
        """Take ``body`` (a data frame's, just arrived) if it is exactly one whole frame
        that may be taken now; called by the connection's reader."""
        transport = self.transport
        admission = transport._admission
        size = len(body) - HEADER_SIZE
        sender = self.sender
        if (
            admission is None
            or size <= 0
            or frame_length(body[:HEADER_SIZE]) != size
            or transport._refusal(sender, size) is not None  # refused there, and charged
            or not self.muxed.can_write_now(len(ACK))
        ):
            return False
        transport._apply_frees()
        if not admission.fits(sender, size):
            return False
        admission.hold_now(sender, size)
        if not transport._to_asyncio(transport._dispatch_held, sender, body[HEADER_SIZE:], size):
            admission.free(sender, size)
            return False
        transport._count(messages_received=1, bytes_received=size)
        self.muxed.write_now(ACK)
        timer = self.timer
        if timer is not None:  # between frames, the wait restarts with each one
            timer.deadline = trio.current_time() + transport.stream_idle_timeout
        return True


# -- sends without a task of their own -------------------------------------------------
_WAITING, _RESUMED, _DONE = 0, 1, 2


class _DirectSend:
    """A send over a kept stream, carried out without a task of its own (issue 17).

    A send's task took a kept stream, wrote the frame, slept until the acknowledgement
    woke it, kept the stream again and handed the outcome to asyncio: a task spawned, a
    cancel scope, a sleep and a wake-up per frame, most of the trio thread's work for a
    send. When the peer has a fresh kept stream on a connection of ours, no other send to
    it is in flight and the frame goes to the socket at once (``try_write_now``), the
    bridge call is taken here instead (``BridgeCall.now``): the frame is written, and the
    connection's reader hands the acknowledgement to :meth:`acknowledged` as it arrives
    (the stream's ``inline``), which keeps the stream and delivers the outcome. Anything
    else on the stream -- another byte, a close, a reset, the connection's end, an
    acknowledgement the reader cannot take there -- and the send goes on as a task from
    the acknowledgement's read on, exactly as the send's task would have (:meth:`told`,
    through ``PatchedYamux.watch``). The send's deadline is kept by the transport's one
    watcher (``_SendDeadlines``) and a cancel from asyncio reaches :meth:`cancelled`: both
    reset the stream and deliver what the task's timeout or cancel would.
    """

    __slots__ = (
        "call",
        "data",
        "deadline",
        "deadlines",
        "muxed",
        "peer",
        "slots",
        "state",
        "stream",
        "transport",
    )

    def __init__(
        self,
        transport: Libp2pTransport,
        call: _trio_bridge.BridgeCall,
        peer: ID,
        stream: INetStream,
        muxed: _PatchedYamuxStream,
        data: bytes,
        deadline: float,
        deadlines: _SendDeadlines,
    ) -> None:
        self.transport = transport
        self.call = call
        self.peer = peer
        self.stream = stream
        self.muxed = muxed
        self.data = data
        self.deadline = deadline
        self.deadlines = deadlines
        self.slots: trio.Semaphore | None = None
        self.state = _WAITING

    @classmethod
    def start(
        cls, transport: Libp2pTransport, peer: ID, data: bytes, call: _trio_bridge.BridgeCall
    ) -> bool:
        """Write ``data``'s frame and take ``call`` (true), or do nothing (false): the
        send's task does it all then (a relay to dial or a stream to choose among
        relayed ones, another send in flight, no fresh kept stream, a large frame, a
        connection busy writing)."""
        deadlines, timeout = transport._deadlines, call.timeout
        if (
            deadlines is None
            or not deadlines.running
            or timeout is None
            or transport._nat is not None
            or peer in transport._send_slots
            or len(data) > _COALESCE_LIMIT
        ):
            return False
        kept = transport._idle.get(peer)
        if not kept:
            return False
        stream, since = kept[-1]  # the one ``_take_kept`` would take
        if not transport._fresh(stream, since):
            return False  # the task closes it and takes another
        muxed = _muxed(stream)
        if not isinstance(muxed, _PatchedYamuxStream) or muxed.inline is not None:
            return False
        conn = muxed.conn
        deadline = trio.current_time() + timeout
        send = cls(transport, call, peer, stream, muxed, data, deadline, deadlines)
        if not isinstance(conn, PatchedYamux) or not conn.watch(muxed.stream_id, send.told):
            return False
        if not muxed.try_write_now(frame_header(len(data)) + data):
            conn.unwatch(muxed.stream_id)
            return False
        kept.pop()
        if not kept:
            del transport._idle[peer]
        send.slots = transport._slots_of(peer)
        send.slots.acquire_nowait()  # (none was taken: no send was in flight)
        muxed.inline = send.acknowledged
        call.on_cancel = send.cancelled
        deadlines.add(send)
        return True

    def acknowledged(self, body: bytes) -> bool:
        """The connection's reader, with a data frame's body on the stream as it arrived:
        take it if it is the acknowledgement (true); anything else is buffered, and
        :meth:`told` follows."""
        if self.state != _WAITING or body != ACK:
            self.muxed.inline = None
            return False
        self._settle()
        transport = self.transport
        if not transport._keep_now(self.peer, self.stream):
            transport._in_background(_close(self.stream))
        self._release()
        self.call.deliver(None, None)
        return True

    def told(self) -> None:
        """The connection's reader: something else arrived on the stream, or the
        connection ended. The send goes on as a task (under what is left of its
        deadline), from the acknowledgement's read on."""
        if self.state != _WAITING:
            return
        self.state = _RESUMED
        self.muxed.inline = None
        self.deadlines.discard(self)
        call = self.call
        call.on_cancel = None
        call.fn, call.args = self._finish, ()
        call.timeout = max(0.0, self.deadline - trio.current_time())
        call.start_task()

    async def _finish(self) -> None:
        transport, peer, stream = self.transport, self.peer, self.stream
        try:
            if not await transport._sent_on_kept(peer, stream, _await_ack(stream)):
                await transport._send_on_new_stream(transport._running_host(), peer, self.data)
        finally:
            self._release()

    def expired(self) -> None:
        """The watcher: the send's deadline passed without an acknowledgement."""
        if self.state == _WAITING:
            self._end(trio.TooSlowError())

    def cancelled(self) -> None:
        """asyncio cancelled the send."""
        if self.state == _WAITING:
            self._end(asyncio.CancelledError())

    def abandoned(self) -> None:
        """The transport stops serving."""
        if self.state == _WAITING:
            self._end(_trio_bridge.BridgeClosed("the transport stopped during the send"))

    def _end(self, error: BaseException) -> None:
        self._settle()
        self.transport._in_background(_reset(self.stream))  # the frame may be unread
        self._release()
        self.call.deliver(None, error)

    def _settle(self) -> None:
        self.state = _DONE
        self.muxed.inline = None
        conn = self.muxed.conn
        if isinstance(conn, PatchedYamux):
            conn.unwatch(self.muxed.stream_id)
        self.deadlines.discard(self)

    def _release(self) -> None:
        slots = self.slots
        if slots is not None:
            self.slots = None
            slots.release()
            self.transport._forget_slots(self.peer, slots)


class _SendDeadlines:
    """The deadlines of the sends waiting for their acknowledgement without a task
    (``_DirectSend``): one task sleeps until the earliest and ends those past theirs;
    when the transport stops serving, it ends those still waiting."""

    def __init__(self) -> None:
        self._sends: set[_DirectSend] = set()
        self._scope: trio.CancelScope | None = None
        self.running = False

    def add(self, send: _DirectSend) -> None:
        self._sends.add(send)
        scope = self._scope
        if scope is not None and send.deadline < scope.deadline:
            scope.deadline = send.deadline

    def discard(self, send: _DirectSend) -> None:
        self._sends.discard(send)

    async def run(self) -> None:
        self.running = True
        try:
            while True:
                deadline = min((send.deadline for send in self._sends), default=math.inf)
                with trio.CancelScope(deadline=deadline) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
                now = trio.current_time()
                for send in [send for send in self._sends if send.deadline <= now]:
                    send.expired()
        finally:
            self.running = False
            self._scope = None
            sends, self._sends = self._sends, set()
            for send in sends:
                send.abandoned()
