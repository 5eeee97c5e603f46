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
#: addresses of one peer found by the transport that are dialled, all rediscoveries together
MAX_GREET_ADDRS = 16
#: entries of one hello looked at (the rest is ignored), and the longest address kept
MAX_HELLO_ENTRIES = 256
MAX_ADDR_CHARS = 256
#: addresses per met peer saved in a checkpoint, and dialled per peer after a restart
SAVED_ADDRS = 4
REDIAL_ADDRS = 2

#: bootstrap dials: the wait after the first failed round of dials, doubled after each
#: (up to MAX_RETRY_DELAY), the timeout of one dial, and a bound on the rounds of dials
#: (the discovery timeout ends them first in practice)
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
DIAL_TIMEOUT = 5.0
MAX_BOOTSTRAP_ATTEMPTS = 10_000
#: the longest failure reason quoted in a log line
MAX_REASON_CHARS = 160

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
        #: bootstrap addresses dialled, with the outcome of the last attempt (for messages)
        self.tried: dict[str, str] = {}
        #: peers found by the transport (mDNS, the DHT) that we dialled and greeted, with
        #: the addresses tried (bounded by MAX_KNOWN_PEERS peers, MAX_GREET_ADDRS each)
        self._greeted: dict[str, set[str]] = {}
        self._dial_slots = asyncio.Semaphore(MAX_CONCURRENT_DIALS)
        self._peers_changed = asyncio.Event()

    # -- start-up ------------------------------------------------------------------------
    async def discover(self) -> None:
        """Dial the bootstrap peers (retrying with backoff until ``discovery_timeout``), then
        wait until enough peers are met (:meth:`found_enough`) or the timeout passes.

        Each failed dial is logged at WARNING with its address: a typo in a bootstrap
        address, or a peer that is down, shows at once, not after the timeout. Whether
        the node may start with what it met is :meth:`shortfall`'s answer.
        """
        net = self.network
        deadline = time.monotonic() + net.discovery_timeout
        own = f"/p2p/{self.peer_id}"  # one bootstrap list for every node may name us too
        pending = [addr for addr in net.bootstrap if not addr.endswith(own)]
        delay = FIRST_RETRY_DELAY
        for attempt in range(1, MAX_BOOTSTRAP_ATTEMPTS + 1):
            if not pending or time.monotonic() >= deadline:
                break
            pending = await self._dial_bootstrap(pending, attempt, deadline, delay)
            wait = min(delay, deadline - time.monotonic())
            if pending and wait > 0:
                await asyncio.sleep(wait)  # backoff, bounded by the deadline
            delay = min(delay * 2, MAX_RETRY_DELAY)
        while not self.found_enough():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._peers_changed.clear()
            try:
                await asyncio.wait_for(self._peers_changed.wait(), remaining)
            except TimeoutError:
                break
        if not self.found_enough() and self.shortfall() is None:
            log.warning(
                "only %d of %d peers found before the discovery timeout (%gs); starting with "
                "them (network.min_peers = %d)",
                self.met_count(),
                len(self.graph.neighbours(self.peer_id)) if self.graph else net.min_peers,
                net.discovery_timeout,
                net.min_peers,
            )

    async def _dial_bootstrap(
        self, addrs: list[str], attempt: int, deadline: float, delay: float
    ) -> list[str]:
        """Dial each bootstrap address once; the ones that failed (to retry)."""
        retry = []
        for addr in addrs:
            timeout = min(DIAL_TIMEOUT, max(0.1, deadline - time.monotonic()))
            try:
                peer = await self.transport.connect(addr, timeout=timeout)
            except TransportError as error:
                reason = _short(error, addr)
                self.tried[addr] = reason
                left = deadline - time.monotonic()
                log.warning(
                    "bootstrap peer %s not reachable (attempt %d: %s); %s",
                    addr,
                    attempt,
                    reason,
                    f"retrying in {delay:.1f}s"
                    if left > delay
                    else "no time left for another attempt (network.discovery_timeout)",
                )
                retry.append(addr)
                continue
            self.tried[addr] = "reached"
            self.known.setdefault(peer, []).append(addr)
            if not self.beyond_lan():
                self.meet(peer)  # we dialled it: the transport authenticated its id
            self._spawn(self.send_hello(peer))
        return retry

    def beyond_lan(self) -> bool:
        """Whether bootstrap peers may be mere DHT seeds or relays (``network.dht``, NAT
        traversal): then a bootstrap peer is met, like any other, only by its hello, so
        that a ``p2pfl relay`` (which trains nothing and greets no one) never becomes a
        neighbour. On a LAN a bootstrap peer is a node of the run: met once dialled."""
        net = self.network
        return net.dht or net.relay or net.reachability != "off"

    def met_count(self) -> int:
        """Peers met that count towards ``min_peers`` (with a graph: graph neighbours only)."""
        if self.graph is not None:
            return len(set(self.graph.neighbours(self.peer_id)) & self.met)
        return len(self.met)

    def shortfall(self) -> str | None:
        """Why the node may not start learning after discovery (``None``: it may).

        Fewer peers met than ``network.min_peers`` (with a graph: than its degree, if that
        is smaller) is a failure, not a node training alone that looks like it works: the
        message names the addresses tried and what became of them. ``min_peers = 0``
        lets a node learn alone.
        """
        net = self.network
        need = net.min_peers
        if self.graph is not None:
            need = min(need, len(self.graph.neighbours(self.peer_id)))
        have = self.met_count()
        if have >= need:
            return None
        if self.tried:
            tried = "; ".join(f"{addr} ({what})" for addr, what in self.tried.items())
        elif net.mdns or net.dht:
            tried = "no bootstrap address, " + " and ".join(
                what for what, on in (("mDNS", net.mdns), ("the DHT", net.dht)) if on
            ) + " found none"
        else:
            tried = "no bootstrap address given (network.bootstrap), mDNS off"
        return (
            f"met {have} of the {need} peers network.min_peers asks for within "
            f"network.discovery_timeout = {net.discovery_timeout:g}s; tried: {tried}; "
            "set network.min_peers = 0 to learn alone"
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
        timeout = min(DIAL_TIMEOUT, self.network.discovery_timeout)

        async def dial(addr: str) -> None:
            try:
                peer = await self.transport.connect(addr, timeout=timeout)
            except TransportError as error:
                self.tried[addr] = _short(error, addr)
                log.warning("resuming: %s not reachable (%s)", addr, self.tried[addr])
                return
            self.tried[addr] = "reached"
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
        addrs: dict[str, list[str]] = {self.peer_id: list(self.transport.listen_addrs)}
        if self.network.peer_exchange:
            addrs.update(self._exchanged(self.transport.known_addrs()))
        message = Message(HELLO, 0, None, {"addrs": addrs, "reply": reply})
        try:
            await self._send(peer, message)
        except TransportError as error:  # a peer that connects but takes nothing (issue 8)
            log.debug("hello to %s failed: %s", peer, error)

    def _exchanged(self, store: dict[str, list[str]]) -> dict[str, list[str]]:
        """The peers (other than us) a hello of ours lists: no more than a receiver looks
        at (``MAX_HELLO_ENTRIES`` entries, ours first, ``MAX_ADDRS_PER_PEER`` addresses of
        under ``MAX_ADDR_CHARS`` each), peers met first.

        The transport's peerstore holds whatever connected peers announced (py-libp2p
        keeps up to 1,000 addresses per peer from identify, for 2 hours): listed whole,
        a few keys that announced long made-up addresses made every hello of this node
        larger than any receiver takes (4 MiB of meta, ``WireLimits``), so honest peers
        dropped it as oversized, charged this node for it, and never learnt the peers it
        should have told them of. Bounded so, a hello is at most ~0.3 MB.
        """
        listed: dict[str, list[str]] = {}
        met_first = sorted(store, key=lambda peer: (peer not in self.met, peer))
        for peer in met_first:
            if len(listed) >= MAX_HELLO_ENTRIES - 1:  # the entry left is our own
                break
            clean = [a for a in store[peer] if len(a) < MAX_ADDR_CHARS][:MAX_ADDRS_PER_PEER]
            if peer != self.peer_id and clean:
                listed[peer] = clean
        return listed

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
                (peer != sender and not self.network.peer_exchange)  # its own addresses only
                or peer == self.peer_id
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
            elif not self.known[peer] or (peer == sender and clean):
                # a peer's own word on its addresses replaces what others said of it: the
                # first hello naming a peer used to fix its addresses for good, so a hostile
                # one naming an honest peer's id with dead addresses first had a node save
                # those in its checkpoints (and dial them after a restart), whatever the
                # peer itself said later
                self.known[peer] = clean
        if meta.get("reply"):
            self._spawn(self.send_hello(sender, reply=False))
        self._peers_changed.set()
        return "new" if new_peer else "known"

    def on_discovered(self, peer: str, addrs: list[str]) -> None:
        """A peer the transport found by itself (mDNS, the DHT): greet it once, if we want it.

        It becomes known only when its hello arrives, so a LAN peer that is not a p2pfl
        node (any libp2p host announces the same mDNS service) never turns neighbour. A
        peer not met yet that is found again with new addresses is dialled at those --
        also one first heard of by peer exchange, whose addresses then may have been
        private ones (behind NAT) and now include a relayed one from the DHT.
        """
        if peer == self.peer_id or peer in self.met or not self.wanted(peer):
            return
        tried = self._greeted.get(peer)
        if tried is None:
            if len(self._greeted) >= MAX_KNOWN_PEERS:
                return
            tried = self._greeted[peer] = set()
        # found again with new addresses (a peer behind NAT that got a relay slot since):
        # dialled again, at those only
        fresh = [addr for addr in addrs if addr not in tried][:MAX_ADDRS_PER_PEER]
        if fresh and len(tried) < MAX_GREET_ADDRS:
            tried.update(fresh)
            self._spawn(self.dial_and_greet(peer, fresh))

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


def _short(error: Exception, addr: str) -> str:
    """A dial error in a few words: without the address (the line names it already) and
    without libp2p's nested exception reprs."""
    text = " ".join(str(error).split()).replace(f"connect to {addr}: ", "")
    if "SwarmDialAllFailedError" in text or "no addresses established" in text:
        return "connection refused or no answer"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
