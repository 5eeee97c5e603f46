"""Who may open a stream or have a frame read, for ``Libp2pTransport`` (trio thread only).

One ``Admission`` per transport keeps the bans, the inbound streams open per peer and
the bytes held for inbound frames per peer, and answers before anything is read:

- a connection or stream of a banned peer is refused (py-libp2p asks its resource
  manager, ``_Gate`` below, before a stream's protocol is negotiated and once a
  connection's peer is authenticated);
- a stream over the per-peer or per-node bound is reset before it is negotiated, and so
  is one over its source's share of the per-node bound (``per_source_streams``: half);
- a frame's bytes are held from the moment its length is known until the node has
  handled it; a frame that does not fit waits, its body unread (``hold``).

Everything runs on the transport's trio thread, ``free`` too: the transport applies it
there for the frames the asyncio side has handled (``Libp2pTransport._apply_frees``),
with the next frame it admits, or at once while a frame waits for room.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio
from libp2p.rcmgr import ResourceManager
from libp2p.rcmgr.manager import ConnectionScope
from libp2p.rcmgr.metrics import Direction

from ._inbound import Shares
from .limits import TransportLimits

__all__ = ["Admission", "Gate"]

_MAX_BANS = 100_000
"""Bans remembered at most; expired ones are dropped first (a Sybil flood cannot unban)."""


class Admission:
    """Bans, inbound stream counts and held frame bytes, per peer and in all."""

    def __init__(self, limits: TransportLimits, max_message_size: int) -> None:
        self.limits = limits
        self.per_peer_bytes = limits.per_peer_bytes(max_message_size)
        self.total_bytes = limits.total_bytes(max_message_size)
        self._banned: dict[str, float] = {}  # peer -> time.monotonic() when its ban ends
        self._streams: Counter[str] = Counter()
        self.streams_open = 0
        # Streams per source address (``_inbound.source_of``): without a share per source,
        # one host with 33 keys (32 streams each, left open) held all 1024 and the node
        # reset every stream of its honest neighbours, their pings too: they saw it dead.
        self.per_source_streams = max(limits.max_streams_per_peer, limits.max_streams // 2)
        self._by_source: Shares[str] = Shares()
        self._source_of_peer: dict[str, str] = {}  # set while the peer has streams open
        self._held: Counter[str] = Counter()
        self.held_bytes = 0
        self._freed = trio.Event()

    # -- bans --------------------------------------------------------------------------
    def ban(self, peer: str, seconds: float) -> None:
        if len(self._banned) >= _MAX_BANS:
            now = time.monotonic()
            self._banned = {p: until for p, until in self._banned.items() if until > now}
        self._banned[peer] = max(self._banned.get(peer, 0.0), time.monotonic() + seconds)

    def is_banned(self, peer: str) -> bool:
        until = self._banned.get(peer)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._banned[peer]
        return False

    # -- inbound streams ---------------------------------------------------------------
    def open_stream(self, peer: str, source: str | None = None) -> str | None:
        """Count a new inbound stream of ``peer`` (connected from ``source``, ``None``: not
        known, e.g. relayed); or the stat that names why it is refused. A peer's streams
        count against the source it had when its first open one was opened."""
        if self.is_banned(peer):
            return "refused_banned"
        if self._streams[peer] >= self.limits.max_streams_per_peer:
            return "refused_streams"
        if self.streams_open >= self.limits.max_streams:
            return "refused_streams"
        source = self._source_of_peer.get(peer, source)
        if source is not None and not self._by_source.take(source, self.per_source_streams):
            return "refused_streams"
        self._streams[peer] += 1
        self.streams_open += 1
        if source is not None:
            self._source_of_peer[peer] = source
        return None

    def close_stream(self, peer: str) -> None:
        count = self._streams.get(peer, 0)
        if count <= 0:
            return
        if count == 1:
            del self._streams[peer]
        else:
            self._streams[peer] = count - 1
        self.streams_open -= 1
        source = self._source_of_peer.get(peer)
        if source is not None:
            self._by_source.give(source)
            if count == 1:
                del self._source_of_peer[peer]

    def streams_of(self, peer: str) -> int:
        return self._streams.get(peer, 0)

    # -- frame bytes ---------------------------------------------------------------------
    def fits(self, peer: str, size: int) -> bool:
        return (
            self._held[peer] + size <= self.per_peer_bytes
            and self.held_bytes + size <= self.total_bytes
        )

    def over_own_share(self, peer: str, size: int) -> bool:
        """Whether ``peer``'s own frames (not other peers') keep this one waiting."""
        return self._held[peer] + size > self.per_peer_bytes

    async def hold(self, peer: str, size: int) -> None:
        """Wait until ``size`` more bytes fit ``peer``'s share and the node's, then hold them.

        The caller's deadline bounds the wait; a frame larger than a share never fits
        (the transport's size cap keeps it below one).
        """
        while not self.fits(peer, size):
            await self._freed.wait()
        self.hold_now(peer, size)

    def hold_now(self, peer: str, size: int) -> None:
        """Hold ``size`` bytes that fit now (``fits``), without waiting."""
        assert self.fits(peer, size)
        self._held[peer] += size
        self.held_bytes += size

    def free(self, peer: str, size: int) -> None:
        held = self._held.get(peer, 0)
        if held <= size:
            self._held.pop(peer, None)
        else:
            self._held[peer] = held - size
        self.held_bytes = max(0, self.held_bytes - min(size, held))
        self._freed.set()
        self._freed = trio.Event()

    def held_by(self, peer: str) -> int:
        return self._held.get(peer, 0)


class Gate(ResourceManager):
    """py-libp2p's resource manager (its defaults, as ``new_host`` builds it) that also
    asks an ``Admission``: inbound connections of banned peers are denied once their
    peer id is authenticated, inbound streams over the bounds are reset before their
    protocol is negotiated.  ``refused(stat)`` is told of each refusal."""

    def __init__(self, admission: Admission, refused: Callable[[str], None]) -> None:
        super().__init__(enable_memory_pooling=True)  # what new_resource_manager() passes
        self.admission = admission
        self._refused = refused
        #: the source address of a peer's direct connection, given its peer id (set once
        #: the host exists; see ``_inbound.peer_source``)
        self.source_of: Callable[[str], str | None] = lambda peer: None

    def open_connection(
        self,
        peer_id: Any | None = None,
        endpoint_ip: str | None = None,
        direction: str = "inbound",
    ) -> ConnectionScope | None:
        # our own dials are the node's decision; only a banned peer's calls are refused
        if direction == "inbound" and peer_id is not None:
            if self.admission.is_banned(str(peer_id)):
                self._refused("refused_banned")
                return None
        return super().open_connection(peer_id, endpoint_ip=endpoint_ip, direction=direction)

    def acquire_stream(self, peer_id: str, direction: Direction) -> bool:
        if direction != Direction.INBOUND:
            return super().acquire_stream(peer_id, direction)
        peer = str(peer_id)
        refusal = self.admission.open_stream(peer, self.source_of(peer))
        if refusal is not None:
            self._refused(refusal)
            return False
        if super().acquire_stream(peer_id, direction):
            return True
        self.admission.close_stream(peer)
        return False

    def release_stream(self, peer_id: str, direction: Direction) -> None:
        if direction == Direction.INBOUND:
            self.admission.close_stream(str(peer_id))
        super().release_stream(peer_id, direction)
