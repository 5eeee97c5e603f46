"""Liveness: which neighbours answer, told to the driver as "peer down" / "peer up".

A dead neighbour must be noticed even when nothing is being sent to it, or a protocol
whose round waits for its neighbours waits for it until the round times out, every round.
So the node pings its neighbours every ``ping_interval`` seconds; ``ping_failures`` misses
in a row report the peer down, and the first answer of a peer reported down -- by pings or
by a failed send (:meth:`Liveness.mark_down`) -- reports it up again.

A neighbour whose signed, fresh message arrived within the last interval
(:meth:`Liveness.heard_from`) has just shown it is alive: it is not pinged that time and
counts as an answer. In a run whose rounds are faster than ``ping_interval`` pings then
stop while models flow (a ping opens a stream and negotiates it: in py-libp2p, several
milliseconds of Python on each side), and start again as soon as a neighbour falls silent.
A peer reported down is pinged whatever it sends: only an answer to us brings it back.

Kept apart from the node so that it knows nothing of protocols, wire formats or the guard:
it is given the transport (to ping), the peers to watch, a test of whether a peer may come
back (a banned one may not) and the two callbacks. Its logger is a child of the node's, so
a node's log configuration still covers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from p2pfl.transport.base import Transport, TransportError

log = logging.getLogger("p2pfl.node.liveness")

#: the most peers whose last message is remembered at once (far above any neighbour list)
MAX_HEARD = 4096


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
        #: when each peer's last authenticated message arrived (``time.monotonic``)
        self._heard: dict[str, float] = {}
        self.pings_skipped = 0  # pings not sent: the peer had just been heard from

    def heard_from(self, peer: str) -> None:
        """A message from ``peer`` passed the wire's checks (signature, freshness): it is
        alive now. Called for every such message: one dictionary store. Remembered for
        one interval, for at most ``MAX_HEARD`` peers (senders need not be neighbours)."""
        if self.interval <= 0:
            return
        heard = self._heard
        if len(heard) >= MAX_HEARD and peer not in heard:
            recent = time.monotonic() - self.interval
            for stale in [p for p, at in heard.items() if at < recent]:
                del heard[stale]
            if len(heard) >= MAX_HEARD:
                return  # the peer is pinged as usual
        heard[peer] = time.monotonic()

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
            recent = time.monotonic() - self.interval
            heard = self._heard
            asked = [p for p in peers if p in self.down or heard.get(p, -1.0) < recent]
            self.pings_skipped += len(peers) - len(asked)
            pinged = dict(zip(asked, await asyncio.gather(*(self.ping(p) for p in asked)), strict=True))
            answers = [pinged.get(peer, True) for peer in peers]
            for peer in [p for p in heard if heard[p] < recent]:
                del heard[peer]  # bounded by the peers heard from in one interval
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
