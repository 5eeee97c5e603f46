"""Liveness: which neighbours answer, told to the driver as "peer down" / "peer up".

A dead neighbour must be noticed even when nothing is being sent to it, or a protocol
whose round waits for its neighbours waits for it until the round times out, every round.
So the node pings its neighbours every ``ping_interval`` seconds; ``ping_failures`` misses
in a row report the peer down, and the first answer of a peer reported down -- by pings or
by a failed send (:meth:`Liveness.mark_down`) -- reports it up again.

Kept apart from the node so that it knows nothing of protocols, wire formats or the guard:
it is given the transport (to ping), the peers to watch, a test of whether a peer may come
back (a banned one may not) and the two callbacks. Its logger is a child of the node's, so
a node's log configuration still covers it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from p2pfl.transport.base import Transport, TransportError

log = logging.getLogger("p2pfl.node.liveness")


class Liveness:
    """Pings the watched peers and reports changes; remembers who is down.

    ``watched`` gives the peers to ping now (read before each round of pings, as the
    neighbours change); ``running`` says whether to go on; ``may_return(peer)`` whether a
    peer reported down may be reported up when it answers; ``on_down`` / ``on_up`` are
    called once per change (the driver logs them, with its round).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        interval: float,
        timeout: float,
        failures: int,
        watched: Callable[[], Iterable[str]],
        running: Callable[[], bool],
        may_return: Callable[[str], bool],
        on_down: Callable[[str], None],
        on_up: Callable[[str], None],
        on_unreachable: Callable[[str, str], None] | None = None,
        backlog: Callable[[str], float] | None = None,
    ) -> None:
        self.transport = transport
        #: seconds a ping to a peer may wait behind what is queued to it (a model on a
        #: slow link), on top of ``timeout``: a saturated link is not a dead peer
        self._backlog = backlog
        self.interval = interval
        self.timeout = timeout
        self.failures = failures
        self._watched = watched
        self._running = running
        self._may_return = may_return
        self._on_down = on_down
        self._on_up = on_up
        self._on_unreachable = on_unreachable
        #: peers reported down (missed pings, failed sends) until they answer a ping
        self.down: set[str] = set()

    @property
    def enabled(self) -> bool:
        """Whether to ping at all (``ping_interval = 0``: failed sends only)."""
        return self.interval > 0

    def mark_down(self, peer: str, why: str = "a send failed") -> None:
        """A send to ``peer`` failed: the next ping it answers brings it back (the driver
        has already told the protocol, as ``SendFailed``); ``on_unreachable`` hears of it
        once, when the peer was not down already."""
        if peer in self.down:
            return
        self.down.add(peer)
        if self._on_unreachable is not None:
            self._on_unreachable(peer, why)

    async def run(self) -> None:
        """Ping the watched peers every ``interval`` seconds and report changes.

        One ping per peer is in flight at most, each bounded by ``timeout``.
        """
        misses: dict[str, int] = {}
        while self._running():
            await asyncio.sleep(self.interval)
            peers = list(self._watched())
            answers = await asyncio.gather(*(self.ping(peer) for peer in peers))
            for peer, alive in zip(peers, answers, strict=True):
                if alive:
                    misses.pop(peer, None)
                    if peer in self.down and self._may_return(peer):
                        self.down.discard(peer)
                        log.debug("neighbour %s answers again", peer)
                        self._on_up(peer)
                    continue
                misses[peer] = misses.get(peer, 0) + 1
                if misses[peer] >= self.failures and peer not in self.down:
                    self.down.add(peer)
                    log.debug("neighbour %s missed %d pings: down", peer, misses[peer])
                    self._on_down(peer)

    async def ping(self, peer: str) -> bool:
        """Whether ``peer`` answered a ping within ``timeout`` (plus the backlog to it)."""
        wait = self.timeout + (self._backlog(peer) if self._backlog is not None else 0.0)
        try:
            await self.transport.ping(peer, timeout=wait)
        except TransportError:
            return False
        return True
