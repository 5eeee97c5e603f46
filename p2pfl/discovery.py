"""Peer discovery: bootstrap dialling, peer exchange (``hello``), mDNS greetings, restarts.

Peers find each other through bootstrap addresses and peer exchange: each ``hello``
lists the addresses its sender knows. A name heard of in someone's hello is only an
address to dial (*known*); a peer may become a neighbour, or a member of the protocol's
population, only once *met* -- its own hello arrived over a connection the transport
authenticated as that peer id, or we dialled it as a bootstrap peer -- so one hello naming
thousands of made-up peers cannot fill the neighbour list. The same hostile hello must not
turn the node into a dialling flood or fill its memory either: known peers, addresses per
peer and dials running at once are bounded.

Kept apart from the node so that it knows nothing of protocols or the guard: it is given
the transport (to dial and to read addresses), a function that sends one of the node's own
messages, a function that runs a background task (the node watches those), the topology
graph if there is one and the network settings. Its logger is a child of the node's, so a
node's log configuration still covers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

from p2pfl.config import NodeNetworkConfig
from p2pfl.messages import Message
from p2pfl.neighbours import PeerGraph
from p2pfl.transport.base import Transport, TransportError

log = logging.getLogger("p2pfl.node.discovery")

#: kind of the node's own message that introduces its sender and lists addresses it knows
HELLO = "hello"
#: peers a node keeps addresses of; a hello naming more (a hostile one) adds nothing beyond
MAX_KNOWN_PEERS = 1024
#: addresses kept per peer, and dials (connection attempts) running at once: a hello can
#: name many peers, and must not turn the node into a dialling flood
MAX_ADDRS_PER_PEER = 4
MAX_CONCURRENT_DIALS = 8
#: entries of one hello looked at (the rest is ignored), and the longest address kept
MAX_HELLO_ENTRIES = 256
MAX_ADDR_CHARS = 256
#: addresses per met peer saved in a checkpoint, and dialled per peer after a restart
SAVED_ADDRS = 4
REDIAL_ADDRS = 2

#: what a hello did: ``malformed`` (no address map: the sender is to be charged), ``new``
#: (the sender was met by it), ``known`` (the sender had been met before)
HelloOutcome = Literal["malformed", "new", "known"]


class Discovery:
    """The peers a node knows of and has met, and the dialling and greeting that finds them.

    ``send(peer, message)`` sends one of the node's own (control) messages and raises
    :class:`~p2pfl.transport.base.TransportError` when it fails; ``spawn(coroutine)`` runs
    a background task the node watches (and cancels when it stops).
    """

    def __init__(
        self,
        peer_id: str,
        transport: Transport,
        network: NodeNetworkConfig,
        *,
        graph: PeerGraph | None,
        send: Callable[[str, Message], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.peer_id = peer_id
        self.transport = transport
        self.network = network
        self.graph = graph
        self._send = send
        self._spawn = spawn
        #: addresses of peers heard of (dial candidates), bounded by MAX_KNOWN_PEERS
        self.known: dict[str, list[str]] = {}
        #: peers met directly: only these may become neighbours or population members
        self.met: set[str] = set()
        #: peers found by the transport (mDNS) that we dialled and greeted
        self._greeted: set[str] = set()
        self._dial_slots = asyncio.Semaphore(MAX_CONCURRENT_DIALS)
        self._peers_changed = asyncio.Event()

    # -- start-up ------------------------------------------------------------------------
    async def discover(self) -> None:
        """Dial the bootstrap peers (retrying until ``discovery_timeout``), then wait until
        enough peers are met (:meth:`found_enough`) or the timeout passes."""
        net = self.network
        deadline = time.monotonic() + net.discovery_timeout
        pending = list(net.bootstrap)
        while pending and time.monotonic() < deadline:
            retry = []
            for addr in pending:
                try:
                    peer = await self.transport.connect(
                        addr, timeout=min(5.0, net.discovery_timeout)
                    )
                except TransportError as error:
                    log.debug("bootstrap %s not reachable yet: %s", addr, error)
                    retry.append(addr)
                    continue
                self.known.setdefault(peer, []).append(addr)
                self.meet(peer)  # we dialled it: the transport authenticated its id
                self._spawn(self.send_hello(peer))
            pending = retry
            if pending:
                await asyncio.sleep(0.2)  # back off before dialling again (bounded by deadline)
        while not self.found_enough():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._peers_changed.clear()
            try:
                await asyncio.wait_for(self._peers_changed.wait(), remaining)
            except TimeoutError:
                break
        if not self.found_enough():
            log.warning(
                "only %d of %d peers found before the discovery timeout",
                len(self.met),
                len(self.graph.neighbours(self.peer_id)) if self.graph else net.min_peers,
            )

    async def reconnect(self, known: dict[str, list[str]]) -> None:
        """After a restart: dial the peers we knew (and the bootstrap peers), then go on.

        A resuming node does not wait for ``min_peers``: its neighbours are fixed by the
        checkpoint, and those that are gone are found out by failed sends.
        """
        self.known.update({peer: list(addrs) for peer, addrs in known.items()})
        self.met.update(peer for peer in known if peer != self.peer_id)  # met before (saved)
        addrs = [a for peer_addrs in self.known.values() for a in peer_addrs[:REDIAL_ADDRS]]
        addrs += list(self.network.bootstrap)
        timeout = min(5.0, self.network.discovery_timeout)

        async def dial(addr: str) -> None:
            try:
                peer = await self.transport.connect(addr, timeout=timeout)
            except TransportError:
                return
            await self.send_hello(peer)

        await asyncio.gather(*(dial(addr) for addr in dict.fromkeys(addrs)), return_exceptions=True)

    def found_enough(self) -> bool:
        """Discovery is over: all graph neighbours, or ``min_peers`` peers, are met
        (names only heard of do not count: they may be made up)."""
        if self.graph is not None:
            return set(self.graph.neighbours(self.peer_id)) <= self.met
        return len(self.met) >= self.network.min_peers

    def saved(self) -> dict[str, list[str]]:
        """What a checkpoint keeps: the peers met only, with a few addresses each (a
        restart dials these, not every name heard of)."""
        return {peer: self.known.get(peer, [])[:SAVED_ADDRS] for peer in sorted(self.met)}

    # -- who may be a neighbour ------------------------------------------------------------
    def meet(self, peer: str) -> None:
        """``peer`` proved its id on a connection: from now on it may be a neighbour."""
        if peer != self.peer_id:
            self.met.add(peer)

    def wanted(self, peer: str) -> bool:
        """Whether to dial a peer we heard of: with a graph, only our graph neighbours."""
        return self.graph is None or peer in self.graph.neighbours(self.peer_id)

    # -- peer exchange ---------------------------------------------------------------------
    async def send_hello(self, peer: str, *, reply: bool = True) -> None:
        """Introduce ourselves to ``peer`` with the addresses we know (``reply``: ask it
        to introduce itself back)."""
        addrs = {p: a for p, a in self.transport.known_addrs().items() if a}
        addrs[self.peer_id] = list(self.transport.listen_addrs)
        message = Message(HELLO, 0, None, {"addrs": addrs, "reply": reply})
        try:
            await self._send(peer, message)
        except TransportError as error:  # a peer that connects but takes nothing (issue 8)
            log.debug("hello to %s failed: %s", peer, error)

    def on_hello(self, sender: str, meta: dict[str, Any]) -> HelloOutcome:
        """``sender``'s hello (on a connection authenticated as ``sender``): meet it, note
        the addresses it names (bounded) and dial those we want; answer if asked to."""
        addrs = meta.get("addrs")
        if not isinstance(addrs, dict):
            return "malformed"
        new_peer = sender not in self.met
        self.known.setdefault(sender, [])
        self.meet(sender)  # its own hello, on a connection authenticated as ``sender``
        for peer, peer_addrs in list(addrs.items())[:MAX_HELLO_ENTRIES]:
            if (
                peer == self.peer_id
                or not isinstance(peer, str)
                or not isinstance(peer_addrs, list)
            ):
                continue
            clean = [a for a in peer_addrs if isinstance(a, str) and len(a) < MAX_ADDR_CHARS]
            clean = clean[:MAX_ADDRS_PER_PEER]
            if peer not in self.known:
                if len(self.known) >= MAX_KNOWN_PEERS:
                    continue  # the sender itself is always kept (above); strangers are not
                self.known[peer] = clean
                if clean and self.wanted(peer):
                    self._spawn(self.dial_and_greet(peer, clean))
            elif not self.known[peer]:
                self.known[peer] = clean
        if meta.get("reply"):
            self._spawn(self.send_hello(sender, reply=False))
        self._peers_changed.set()
        return "new" if new_peer else "known"

    def on_discovered(self, peer: str, addrs: list[str]) -> None:
        """A peer the transport found by itself (mDNS): greet it once, if we want it.

        It becomes known only when its hello arrives, so a LAN peer that is not a p2pfl
        node (any libp2p host announces the same mDNS service) never turns neighbour.
        """
        if peer == self.peer_id or peer in self.known or peer in self._greeted:
            return
        if self.wanted(peer):
            self._greeted.add(peer)
            self._spawn(self.dial_and_greet(peer, addrs[:MAX_ADDRS_PER_PEER]))

    async def dial_and_greet(self, peer: str, addrs: list[str]) -> None:
        """Dial ``peer`` at the first of ``addrs`` that answers and say hello."""
        async with self._dial_slots:  # at most MAX_CONCURRENT_DIALS peers dialled at once
            for addr in addrs:
                try:
                    await self.transport.connect(addr, timeout=5.0)
                except TransportError:
                    continue
                break
            else:
                return
        await self.send_hello(peer)
