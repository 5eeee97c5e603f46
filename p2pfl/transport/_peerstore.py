"""Reading py-libp2p's peerstore without its exceptions for ordinary states."""

from __future__ import annotations

from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from multiaddr import Multiaddr

__all__ = ["known_addrs"]


def known_addrs(host: IHost, peer: ID) -> list[Multiaddr]:
    """``peer``'s addresses in ``host``'s peerstore; none when it has none left.

    py-libp2p's peerstore raises for a peer it never knew or whose addresses all expired
    (their time to live passed): an ordinary state for a peer we are connected to through
    a relay long after identify, not an error to end a send or a background task over.
    """
    try:
        return list(host.get_peerstore().addrs(peer))
    except PeerStoreError:
        return []
