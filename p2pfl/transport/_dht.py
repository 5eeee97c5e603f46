"""Finding the peers of one training run in a Kademlia DHT (``Libp2pTransport``, trio thread).

Peers of a run share nothing but its name (``network.run``) and one or more bootstrap
addresses. Each peer joins py-libp2p's Kademlia DHT (``libp2p.kad_dht``, server mode,
so that a handful of peers form a DHT of their own), advertises itself as a *provider*
of the run's key and looks the key's providers up; every provider found goes to the
transport's discovery handler, exactly as a peer found by mDNS, and whom to dial stays
the node's decision. The bootstrap addresses only seed the DHT: any peer met there is
a first hop for the lookups.

- The key is the sha2-256 multihash of ``p2pfl/run/<name>`` (a content key any
  Kademlia implementation routes), so two runs never see each other's peers and a run
  name is not readable from the key.
- Advertise and look up are repeated with backoff: from ``FIRST_DELAY`` doubling to
  ``interval`` while nothing new turns up, back to ``FIRST_DELAY`` when a new peer is
  found; each round is bounded by ``ROUND_TIMEOUT``. Re-advertising every ``interval``
  keeps the records of a long run alive at late joiners (py-libp2p keeps a provider
  record 48 h, and at most 20 providers per key per peer: peer exchange covers the rest).
- py-libp2p 0.8.1's ``KadDHT.find_providers`` answers from the local record store as
  soon as it holds *any* provider of the key, and ``provide`` puts our own record
  there first: after advertising, a peer would never ask the network again and would
  find only itself. ``lookup`` therefore asks the closest peers itself, through the
  provider store's per-peer query (a private method, hence the version check below),
  and merges the answers with the local store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any, cast

import libp2p.kad_dht.kad_dht as kad_module
import trio
from libp2p.abc import IHost
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2pfl.versions import require

from ._inbound import Shares, peer_source
from ._streams import reset_quietly

require(
    "libp2p",
    at_least="0.8.1",
    below="0.8.2",
    why="p2pfl.transport._dht (ProviderStore._get_providers_from_peer_with_closers)",
)

__all__ = ["FIRST_DELAY", "MAX_ROUNDS", "ROUND_TIMEOUT", "RunFinder", "run_key"]

_log = logging.getLogger(__name__)

#: the first wait between rounds of advertise + look up, and each round's time bound
FIRST_DELAY = 0.5
ROUND_TIMEOUT = 20.0
#: bound on the rounds of one transport's life (at ``interval`` = 30 s: > 80 days)
MAX_ROUNDS = 250_000
#: peers asked for providers in one round, at once
_QUERIED = 20
_QUERY_TIMEOUT = 5.0
#: addresses handed on per provider, and providers remembered
_ADDRS_PER_PEER = 4
_MAX_REPORTED = 4096
#: inbound DHT streams served at once per source (of py-libp2p's 12), and each one's time
_STREAMS_PER_SOURCE = 4
_STREAM_TIME = 10.0
#: provider records kept: addresses per record, and keys (the stalest key goes first)
_RECORD_ADDRS = 8
_MAX_KEYS = 1024
#: the largest inbound DHT request read. py-libp2p 0.8.1 reads 4 MiB, and parsing an
#: ADD_PROVIDER of that size (300,000 addresses) took ~0.5 s of the trio thread that also
#: carries the node's models: one peer sending one a second kept it busy half the time.
#: Our requests are far smaller (a provider record: its id and a few addresses).
_REQUEST_BYTES = 64 << 10
kad_module.MAX_DHT_MESSAGE_SIZE = min(kad_module.MAX_DHT_MESSAGE_SIZE, _REQUEST_BYTES)


class _Announcing:
    """The host as the DHT sees it: its addresses plus ``extra()`` (our relayed ones),
    which ``BasicHost.get_addrs`` cannot carry (see ``Libp2pTransport._announced``);
    everything else is the host's own."""

    def __init__(self, host: IHost, extra: Callable[[], list[Multiaddr]]) -> None:
        self._host = host
        self._extra = extra

    def get_addrs(self) -> list[Multiaddr]:
        return list(self._host.get_addrs()) + self._extra()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


class _ServedDHT(KadDHT):
    """``KadDHT`` whose inbound streams cannot shut its service for everyone.

    py-libp2p 0.8.1 serves at most 12 inbound DHT streams at once (``_inbound_limiter``;
    one more is reset at once) and reads each with no time bound: one peer that opened
    12 streams and wrote nothing left the node's DHT serving no one, for as long as it
    kept them open. Here a source (``_inbound.peer_source``: an IP address, or the peer
    when it has no direct connection) holds at most ``_STREAMS_PER_SOURCE`` of them, and
    a stream is served at most ``_STREAM_TIME`` seconds (a request takes milliseconds;
    py-libp2p opens a stream per request).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served: Shares[str] = Shares()
        store = self.provider_store
        keep = store.add_provider

        def add_provider(key: bytes, provider: PeerInfo) -> None:
            """py-libp2p 0.8.1 kept every address an ADD_PROVIDER listed (4 MiB of them:
            300,000, ~36 MiB held per message) under any number of keys, for 48 hours:
            one peer grew a DHT server's memory by ~36 MiB a second. A record keeps
            ``_RECORD_ADDRS`` addresses, and a new key past ``_MAX_KEYS`` pushes out the
            key refreshed least lately (a run's peers refresh theirs every ``interval``)."""
            addrs = list(provider.addrs)[:_RECORD_ADDRS]
            if key not in store.providers and len(store.providers) >= _MAX_KEYS:
                store.cleanup_expired()
                if len(store.providers) >= _MAX_KEYS:
                    stalest = min(
                        store.providers,
                        key=lambda k: max(
                            (r.timestamp for r in store.providers[k].values()), default=0.0
                        ),
                    )
                    del store.providers[stalest]
            keep(key, PeerInfo(provider.peer_id, addrs))

        setattr(store, "add_provider", add_provider)  # noqa: B010 - one instance's method

    async def handle_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        source = peer_source(cast(Swarm, self.host.get_network()), peer) or str(peer)
        if not self._served.take(source, _STREAMS_PER_SOURCE):
            await reset_quietly(stream)
            return
        try:
            with trio.move_on_after(_STREAM_TIME) as bound:
                await super().handle_stream(stream)
            if bound.cancelled_caught:
                await reset_quietly(stream)
        finally:
            self._served.give(source)


Found = Callable[[str, list[str]], None]
"""Told (peer id, dialable multiaddrs with /p2p) of each provider found (trio thread)."""


def run_key(run: str) -> str:
    """The DHT key of a run, as the hex multihash py-libp2p's ``KadDHT`` accepts."""
    digest = hashlib.sha256(f"p2pfl/run/{run}".encode()).digest()
    return (bytes([0x12, len(digest)]) + digest).hex()  # multihash: sha2-256, 32 bytes


class RunFinder:
    """One host's DHT membership: serves the DHT, advertises and looks up one run's key.

    ``run`` is ``None`` for a node that only serves the DHT (a public bootstrap/relay
    box): it answers queries and stores records, but advertises nothing.
    """

    def __init__(
        self,
        host: IHost,
        run: str | None,
        found: Found,
        *,
        interval: float = 30.0,
        extra: Callable[[], list[Multiaddr]] | None = None,
    ) -> None:
        self.host = host
        # the DHT announces the host's addresses plus ``extra`` ones (through relays)
        announcing = cast(IHost, _Announcing(host, extra)) if extra is not None else host
        self.dht = _ServedDHT(announcing, DHTMode.SERVER)
        self.key_hex = run_key(run) if run is not None else None
        self.found = found
        self.interval = max(interval, FIRST_DELAY)
        self.reported: dict[ID, list[str]] = {}  # provider -> the addresses told
        self.rounds = 0

    async def run(self) -> None:
        """Serve the DHT and, for a run, advertise and look up until cancelled."""
        from libp2p.tools.anyio_service import background_trio_service

        async with background_trio_service(self.dht):
            if self.key_hex is None:
                await trio.sleep_forever()
            delay = FIRST_DELAY
            for _ in range(MAX_ROUNDS):
                new = 0
                with trio.move_on_after(ROUND_TIMEOUT):
                    new = await self.round()
                delay = FIRST_DELAY if new else min(delay * 2, self.interval)
                await trio.sleep(delay)

    async def round(self) -> int:
        """Seed the routing table with the peers we are connected to, advertise, look up;
        the number of providers reported for the first time."""
        self.rounds += 1
        for peer in list(self.host.get_connected_peers()):
            try:
                await self.dht.add_peer(peer)  # only DHT servers are taken (identify)
            except Exception:  # noqa: BLE001 - a peer that left meanwhile
                pass
        assert self.key_hex is not None
        try:
            await self.dht.provide(self.key_hex)
        except Exception as exc:  # noqa: BLE001 - no peer to tell yet: next round
            _log.debug("advertising the run failed: %r", exc)
        new = 0
        for info in await self.lookup():
            if info.peer_id == self.host.get_id():
                continue
            addrs = self._dialable(info)
            told = self.reported.get(info.peer_id)
            # told again when its addresses changed (a relay slot since: a new address)
            if addrs and (told is None or set(addrs) - set(told)):
                if told is None and len(self.reported) >= _MAX_REPORTED:
                    continue
                self.reported[info.peer_id] = addrs
                new += 1
                self.found(info.peer_id.to_base58(), addrs)
        return new

    async def lookup(self) -> list[PeerInfo]:
        """Providers of the run's key: the local store's and the closest peers' answers."""
        assert self.key_hex is not None
        store = self.dht.provider_store
        key = bytes.fromhex(self.key_hex)
        providers = {info.peer_id: info for info in store.get_providers(key)}
        try:
            closest = await self.dht.peer_routing.find_closest_peers_network(key)
        except Exception as exc:  # noqa: BLE001 - no route yet: next round
            _log.debug("closest-peer lookup failed: %r", exc)
            closest = []
        me = self.host.get_id()

        async def ask(peer: ID) -> None:
            with trio.move_on_after(_QUERY_TIMEOUT):
                answer, _closer = await store._get_providers_from_peer_with_closers(peer, key)
                for info in answer:
                    providers.setdefault(info.peer_id, info)

        async with trio.open_nursery() as nursery:
            for peer in closest[:_QUERIED]:
                if peer != me:
                    nursery.start_soon(ask, peer)
        return list(providers.values())

    def _dialable(self, info: PeerInfo) -> list[str]:
        """Addresses of a provider with its /p2p suffix: its record's, else the peerstore's."""
        addrs = list(info.addrs)
        if not addrs:
            try:
                addrs = list(self.host.get_peerstore().addrs(info.peer_id))
            except Exception:  # noqa: BLE001 - unknown to the peerstore
                addrs = []
        suffix = f"/p2p/{info.peer_id.to_base58()}"
        direct: list[str] = []
        relayed: list[str] = []
        for addr in addrs:
            text = str(addr)
            if "/p2p-circuit" in text:
                if text.endswith("/p2p-circuit"):
                    text += suffix
                elif not text.endswith(suffix):
                    continue  # a circuit to some other peer
                kind = relayed
            else:
                text = text.partition("/p2p/")[0] + suffix
                kind = direct
            if text not in kind:
                kind.append(text)
        # direct addresses first (dialled in this order), relayed ones kept in any case
        half = _ADDRS_PER_PEER // 2
        return direct[: _ADDRS_PER_PEER - min(half, len(relayed))] + relayed[:half]
