"""The runtime-neutral transport interface the asyncio node talks to.

A transport moves opaque byte payloads between peers named by their libp2p peer
id (the base58 string).  The node never sees streams, muxers or trio: it calls
``send`` and gets either a return (the receiver has the whole payload) or a
``TransportError``, and it receives payloads through one synchronous handler
called on its own asyncio loop.  Two implementations exist: ``memory`` for
socket-free tests and ``libp2p`` for real networks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from p2pfl.errors import P2PFLError

__all__ = [
    "AbuseHandler",
    "DiscoveryHandler",
    "FrameAbuse",
    "Handler",
    "SendDone",
    "Transport",
    "TransportError",
    "TransportStats",
]

Handler = Callable[[str, bytes], None]
"""Called on the asyncio loop with (sender peer id, payload); must not block."""

DiscoveryHandler = Callable[[str, list[str]], None]
"""Called on the asyncio loop with (peer id, dialable multiaddrs) of a peer found on the LAN."""

AbuseHandler = Callable[[str, str], None]
"""Called on the asyncio loop with (peer id, ``FrameAbuse`` reason) of a refused inbound frame."""

SendDone = Callable[[BaseException | None], None]
"""Called on the asyncio loop with a ``send_soon``'s outcome: None (acknowledged) or the error."""

_log = logging.getLogger(__name__)


class FrameAbuse(StrEnum):
    """Why a transport refused an inbound frame from an authenticated peer."""

    OVERSIZED = "oversized"  # the length prefix exceeded the receiver's cap
    TRUNCATED = "truncated"  # the stream ended or was reset in the middle of a frame
    STALLED = "stalled"  # the sender went silent in the middle of a frame


class TransportError(P2PFLError):
    """A send, connect or ping that did not succeed (refused, reset, timed out, closed)."""


@dataclass
class TransportStats:
    """Counters one transport keeps; a snapshot is what ``Transport.stats()`` returns.

    ``rejected_oversized`` counts inbound frames whose length prefix exceeded the cap
    (refused before reading the body), ``truncated`` inbound frames that ended or were
    reset before their declared length, ``unhandled`` payloads that arrived while no
    handler was set, ``handler_errors`` exceptions raised by the handler.
    The resource bounds (``p2pfl.transport.limits``) add ``refused_banned``
    (connections, streams and frames of banned peers, refused unread),
    ``refused_streams`` (inbound streams over the per-peer or per-node bound, reset
    before negotiation), ``frames_cut`` (frames not whole by their deadline: trickled,
    stalled, or kept waiting for buffer space), ``idle_streams_cut`` (streams opened
    and left without a frame) and ``refused_connections`` (inbound connections over
    one source address's share of the swarm's inbound slots, closed before their handshake);
    ``handshakes_cut`` counts inbound connections, direct or relayed, that did not finish
    their security and muxer handshake in time.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    send_failures: int = 0
    rejected_oversized: int = 0
    truncated: int = 0
    unhandled: int = 0
    handler_errors: int = 0
    refused_banned: int = 0
    refused_streams: int = 0
    frames_cut: int = 0
    idle_streams_cut: int = 0
    refused_connections: int = 0
    handshakes_cut: int = 0


class Transport(ABC):
    """Send byte payloads to peers, acknowledged, and deliver received ones to a handler.

    Subclasses fill ``peer_id`` at construction and ``listen_addrs`` once started.
    Counters are updated through ``_count`` so that implementations whose network
    side runs on another thread stay consistent.
    """

    peer_id: str
    listen_addrs: list[str]
    max_message_size: int

    def __init__(self) -> None:
        self.listen_addrs = []
        self._handler: Handler | None = None
        self._discovery_handler: DiscoveryHandler | None = None
        self._abuse_handler: AbuseHandler | None = None
        self._stats = TransportStats()
        self._stats_lock = threading.Lock()
        self._banned: dict[str, float] = {}  # peer -> time.monotonic() when its ban ends
        self._sending: set[asyncio.Task[None]] = set()  # the default send_soon's tasks

    @abstractmethod
    async def start(self) -> None:
        """Start listening; ``listen_addrs`` is filled when this returns."""

    @abstractmethod
    async def close(self) -> None:
        """Stop listening and drop all connections. Idempotent."""

    @abstractmethod
    async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
        """Dial a full multiaddr (ending in ``/p2p/<id>``) and return the peer id."""

    @abstractmethod
    async def send(self, peer: str, data: bytes, *, timeout: float) -> None:
        """Deliver ``data`` to ``peer``; return once the receiver acknowledged the whole payload.

        Raises ``TransportError`` when the payload was not acknowledged within ``timeout``
        seconds, for whatever reason: then the receiver may or may not have it.
        """

    def send_soon(self, peer: str, data: bytes, *, timeout: float, done: SendDone) -> None:
        """``send`` without awaiting it: returns at once (called on the asyncio loop), and
        ``done(None)`` is called on that loop once the receiver acknowledged the whole
        payload, ``done(error)`` if it did not (a ``TransportError``, as ``send`` raises;
        anything else is a bug) -- exactly once, never before this returns.

        For a sender that needs no task per message (a node sends each of its models to
        every neighbour); this default runs ``send`` in a task of its own."""
        task = asyncio.get_running_loop().create_task(self.send(peer, data, timeout=timeout))
        self._sending.add(task)  # (the loop keeps only weak references to tasks)
        task.add_done_callback(functools.partial(_sent, self._sending, done))

    @abstractmethod
    async def ping(self, peer: str, *, timeout: float) -> float:
        """Round-trip time to ``peer`` in seconds; raises ``TransportError`` on failure."""

    @abstractmethod
    def connected_peers(self) -> list[str]:
        """Peer ids with an open connection right now."""

    @abstractmethod
    def known_addrs(self) -> dict[str, list[str]]:
        """Dialable multiaddrs (with ``/p2p/<id>``) of the peers this transport knows, for peer exchange."""

    def connection_kinds(self) -> dict[str, str]:
        """How each connected peer is reached: ``"direct"`` or ``"relayed"`` (through a
        circuit relay). A transport without relays reaches every peer directly."""
        return dict.fromkeys(self.connected_peers(), "direct")

    def reachability(self) -> str:
        """``"public"``, ``"private"`` (behind NAT), ``"unknown"`` (not decided yet) or
        ``"off"`` (this transport does no NAT traversal)."""
        return "off"

    def set_handler(self, handler: Handler | None) -> None:
        """Set the callback for received payloads (``None`` to refuse them)."""
        self._handler = handler

    def set_discovery_handler(self, handler: DiscoveryHandler | None) -> None:
        """Set the callback for peers the transport finds by itself (mDNS); most never call it."""
        self._discovery_handler = handler

    def set_abuse_handler(self, handler: AbuseHandler | None) -> None:
        """Set the callback told about each inbound frame refused from a known peer.

        The transport counts such frames in its stats either way; the handler lets the
        node charge them to the peer (its ban score).  Reasons are ``FrameAbuse`` values.
        """
        self._abuse_handler = handler

    def ban(self, peer: str, seconds: float) -> None:
        """Cut ``peer`` off for ``seconds``: its connections are closed, its new ones,
        its streams and its frames refused unread.  Called on the asyncio loop when the
        node bans a peer; the transport's refusals cost it nothing to read."""
        now = time.monotonic()
        with self._stats_lock:
            if len(self._banned) >= 10_000:  # forget served bans (never a running one)
                self._banned = {p: until for p, until in self._banned.items() if until > now}
            self._banned[peer] = max(self._banned.get(peer, now), now + seconds)

    def is_banned(self, peer: str) -> bool:
        """Whether ``peer`` serves a ban of this transport right now."""
        with self._stats_lock:
            until = self._banned.get(peer)
            if until is not None and time.monotonic() >= until:
                del self._banned[peer]
                until = None
        return until is not None

    def _report_abuse(self, peer: str, reason: str) -> None:
        """Run the abuse handler on the asyncio thread, keeping its errors contained."""
        _run_contained("abuse", self._abuse_handler, peer, reason)

    def _discovered(self, peer: str, addrs: list[str]) -> None:
        """Run the discovery handler on the asyncio thread, keeping its errors contained."""
        _run_contained("discovery", self._discovery_handler, peer, addrs)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters as a plain dict."""
        with self._stats_lock:
            return asdict(self._stats)

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def _dispatch(self, sender: str, data: bytes) -> None:
        """Run the handler on the current (asyncio) thread, keeping its errors contained.

        A handler exception must not take the transport down: the payload was
        delivered, so it is counted and logged, never propagated to the sender.
        """
        handler = self._handler
        if handler is None:
            self._count(unhandled=1)
            return
        try:
            handler(sender, data)
        except Exception:
            self._count(handler_errors=1)
            _log.exception("message handler failed on a payload from %s", sender)


def _run_contained(what: str, handler: Callable[..., None] | None, peer: str, arg: Any) -> None:
    """Call an application handler about ``peer``: a handler's bug must not kill the
    transport's loop, so it is logged, not raised."""
    if handler is None:
        return
    try:
        handler(peer, arg)
    except Exception:
        _log.exception("%s handler failed on peer %s", what, peer)


def _sent(tasks: set[asyncio.Task[None]], done: SendDone, task: asyncio.Task[None]) -> None:
    """A default ``send_soon``'s task ended: its outcome to ``done``."""
    tasks.discard(task)
    done(TransportError("the send was cancelled") if task.cancelled() else task.exception())
