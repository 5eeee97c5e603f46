"""Transports: how a node's payloads reach other peers.

``base`` holds the runtime-neutral interface the node is written against;
``memory`` is an in-process network for tests, ``libp2p`` the real one (import
it explicitly: it pulls in py-libp2p and trio).
"""

from .base import Handler, Transport, TransportError, TransportStats

__all__ = ["Handler", "Transport", "TransportError", "TransportStats"]
