"""An in-process network of transports, for testing the node without sockets.

``MemoryNetwork`` plays the part of the internet: it knows which transports are
listening, and it can be told to lose payloads (``drop_rate``), to delay them
(``latency``), to cut single links, or to split the peers into partitions.
``MemoryTransport`` honours the same contract as the libp2p transport: a send
returns once the receiver has the payload and its handler is scheduled, and any
failure surfaces as ``TransportError``.  A payload over the receiver's cap is also
reported to the receiver's abuse handler (the only frame fault a memory wire has).

Everything runs on the asyncio loop that starts each transport; nothing here
is thread-safe, nor needs to be.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterable

from .base import FrameAbuse, Transport, TransportError
from .limits import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "MemoryNetwork", "MemoryTransport"]

DEFAULT_MAX_MESSAGE_SIZE = DEFAULT_MAX_MESSAGE_BYTES


def _peer_of(addr: str) -> str:
    """The peer id named by the trailing ``/p2p/<id>`` of a multiaddr string."""
    head, sep, peer = addr.rpartition("/p2p/")
    if not sep or not peer or "/" in peer:
        raise TransportError(f"address {addr!r} does not end in /p2p/<peer id>")
    return peer


class MemoryNetwork:
    """The shared medium of a set of ``MemoryTransport`` objects, with injectable faults.

    Faults are decided when a payload is sent: a dropped payload fails the send at
    once (as a reset stream would) and never reaches the receiver; a payload across
    a cut link or between partitions fails the same way, as do connects and pings.
    ``seed`` makes the drop decisions reproducible.
    """

    def __init__(
        self, *, drop_rate: float = 0.0, latency: float = 0.0, seed: int | None = None
    ) -> None:
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        if latency < 0:
            raise ValueError(f"latency must be >= 0, got {latency}")
        self.drop_rate = drop_rate
        self.latency = latency
        self._rng = random.Random(seed)
        self._listening: dict[str, MemoryTransport] = {}
        self._cut: set[frozenset[str]] = set()
        self._group_of: dict[str, int] | None = None
        self._names = itertools.count(1)

    def transport(
        self, peer_id: str | None = None, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> MemoryTransport:
        """A new transport on this network; ``peer_id`` defaults to ``mem<n>``."""
        return MemoryTransport(
            self, peer_id or f"mem{next(self._names)}", max_message_size=max_message_size
        )

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: peers in different groups cannot reach each other.

        Peers named in no group form one more group together.  Replaces any
        earlier partition; ``heal`` removes it.
        """
        group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for peer in group:
                if peer in group_of:
                    raise ValueError(f"peer {peer} is in more than one group")
                group_of[peer] = index
        self._group_of = group_of

    def cut(self, a: str, b: str) -> None:
        """Break the link between two peers (both directions)."""
        self._cut.add(frozenset((a, b)))

    def restore(self, a: str, b: str) -> None:
        """Repair a link broken by ``cut``."""
        self._cut.discard(frozenset((a, b)))

    def heal(self) -> None:
        """Remove the partition and every cut link."""
        self._group_of = None
        self._cut.clear()

    def reachable(self, a: str, b: str) -> bool:
        """Whether a payload from ``a`` could reach ``b`` now (ignoring random drops)."""
        if frozenset((a, b)) in self._cut:
            return False
        if self._group_of is not None:
            return self._group_of.get(a, -1) == self._group_of.get(b, -1)
        return True

    def _listener(self, sender: str, peer: str) -> MemoryTransport:
        target = self._listening.get(peer)
        if target is None:
            raise TransportError(f"peer {peer} is not listening")
        if not self.reachable(sender, peer):
            raise TransportError(f"peer {peer} is unreachable from {sender}")
        return target

    def _drops(self) -> bool:
        return self.drop_rate > 0 and self._rng.random() < self.drop_rate


class MemoryTransport(Transport):
    """A ``Transport`` whose wire is a ``MemoryNetwork``; see the module docstring."""

    def __init__(
        self,
        network: MemoryNetwork,
        peer_id: str,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        super().__init__()
        self.network = network
        self.peer_id = peer_id
        self.max_message_size = max_message_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected: set[str] = set()
        self._known: dict[str, str] = {}

    @property
    def address(self) -> str:
        return f"/memory/{self.peer_id}/p2p/{self.peer_id}"

    async def start(self) -> None:
        if self.peer_id in self.network._listening:
            raise TransportError(f"peer id {self.peer_id} is already listening")
        self._loop = asyncio.get_running_loop()
        self.network._listening[self.peer_id] = self
        self.listen_addrs = [self.address]

    async def close(self) -> None:
        if self.network._listening.get(self.peer_id) is not self:
            return
        del self.network._listening[self.peer_id]
        for peer in self._connected:
            other = self.network._listening.get(peer)
            if other is not None:
                other._connected.discard(self.peer_id)
        self._connected.clear()
        self.listen_addrs = []

    def _require_started(self) -> None:
        if self.network._listening.get(self.peer_id) is not self:
            raise TransportError("transport is not started")

    def _link(self, peer: str) -> MemoryTransport:
        """Check that ``peer`` can be reached, and record the connection on both sides."""
        self._require_started()
        target = self.network._listener(self.peer_id, peer)
        self._connected.add(peer)
        self._known[peer] = target.address
        target._connected.add(self.peer_id)
        target._known[self.peer_id] = self.address
        return target

    async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
        peer = _peer_of(addr)
        if peer == self.peer_id:
            raise TransportError("cannot connect to oneself")
        self._link(peer)
        return peer

    async def send(self, peer: str, data: bytes, *, timeout: float) -> None:
        try:
            target = self._link(peer)
            if self.network._drops():
                raise TransportError(f"payload to {peer} was lost")
            if self.network.latency:
                if self.network.latency > timeout:
                    await asyncio.sleep(timeout)
                    raise TransportError(f"no acknowledgement from {peer} within {timeout}s")
                await asyncio.sleep(self.network.latency)
                target = self.network._listener(self.peer_id, peer)
            target._receive(self.peer_id, bytes(data))
        except TransportError:
            self._count(send_failures=1)
            raise
        self._count(messages_sent=1, bytes_sent=len(data))

    def _receive(self, sender: str, data: bytes) -> None:
        if self.is_banned(sender):
            self._count(refused_banned=1)
            raise TransportError(f"peer {self.peer_id} refuses {sender}: banned")
        if len(data) > self.max_message_size:
            self._count(rejected_oversized=1)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._report_abuse, sender, FrameAbuse.OVERSIZED)
            raise TransportError(
                f"payload of {len(data)} bytes exceeds the receiver's cap of {self.max_message_size}"
            )
        if self._handler is None:
            self._count(unhandled=1)
            raise TransportError(f"peer {self.peer_id} has no handler")
        self._count(messages_received=1, bytes_received=len(data))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, sender, data)

    async def ping(self, peer: str, *, timeout: float) -> float:
        self._link(peer)
        rtt = 2 * self.network.latency
        if rtt > timeout:
            await asyncio.sleep(timeout)
            raise TransportError(f"no pong from {peer} within {timeout}s")
        if rtt:
            await asyncio.sleep(rtt)
        return rtt

    def connected_peers(self) -> list[str]:
        return sorted(self._connected)

    def known_addrs(self) -> dict[str, list[str]]:
        return {peer: [addr] for peer, addr in sorted(self._known.items())}
