"""Signed records: relayed data that stays verifiable from its origin's peer id (issue 8).

Every message on the wire is a signed envelope, so a receiver knows which peer *sent* it.
Some protocols also *relay* what other peers said: MoDeST gossips its population view
(entries about every member), SybilWall gossips histories of peers several hops away.
Hop-by-hop signatures only say who relayed such data, not whether its subject ever said
it: a hostile relayer could mark an honest peer as left, bump its round, or fabricate its
history. So the subject signs what it says about itself, and relayers forward those bytes
verbatim; receivers check them against the subject's peer id (which embeds its key).

Protocols stay sans-I/O: they get a :class:`RecordSigner` (``None`` means "unsigned", the
simulator's default, for speed) and call ``sign``/``verify`` on plain dicts and bytes.

- :class:`IdentitySigner` signs with the node's own :class:`~p2pfl.identity.Identity`
  (records in the :mod:`p2pfl.wire.signed` container: Ed25519 over a SHA-256 digest, with
  a domain tag distinct from messages'); origins are the peers' libp2p ids.
- :class:`Keyring` gives peers that are *not* named by their keys (the simulator's
  ``p0``, ``p1``...) one identity each, derived from a seed, and signers that translate
  between names and keys: the signed path then runs in the simulator too.

A record carries no freshness of its own: protocols put a round or counter in it and keep
only the newest record per origin, so a replayed older record changes nothing.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from p2pfl.identity import Identity
from p2pfl.protocols.base import PeerId
from p2pfl.wire.errors import WireError
from p2pfl.wire.limits import WireLimits
from p2pfl.wire.signed import SignedRecord, sign_record, verify_record

__all__ = ["RECORD_LIMITS", "IdentitySigner", "Keyring", "RecordSigner"]

#: records are small (an entry, a digest): anything bigger is refused before hashing
RECORD_LIMITS = WireLimits(
    max_message_bytes=4 << 10, max_str_len=256, max_container_len=64, max_meta_items=256
)


class RecordSigner(ABC):
    """Signs this peer's records and checks anybody's.

    ``verify`` never raises: it answers ``(origin, record)`` for bytes whose signature
    verifies, ``None`` for anything else (forged, truncated, not bytes, too big).
    """

    @abstractmethod
    def sign(self, record: dict[str, Any]) -> bytes:
        """``record`` (plain data, string keys) signed as coming from this peer."""

    @abstractmethod
    def verify(self, data: Any) -> tuple[PeerId, dict[str, Any]] | None:
        """The origin and content of a signed record, or ``None`` if it does not verify."""


def _open(data: Any) -> tuple[str, dict[str, Any]] | None:
    if type(data) is not bytes:
        return None
    try:
        record = verify_record(data, limits=RECORD_LIMITS)
        return SignedRecord(data).origin, record
    except WireError:
        return None


class IdentitySigner(RecordSigner):
    """Records signed by ``identity``; origins are libp2p peer ids (the node's signer)."""

    __slots__ = ("identity",)

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def sign(self, record: dict[str, Any]) -> bytes:
        return sign_record(self.identity, record).data

    def verify(self, data: Any) -> tuple[PeerId, dict[str, Any]] | None:
        return _open(data)

    def __repr__(self) -> str:
        return f"IdentitySigner({self.identity.peer_id})"


class Keyring:
    """One identity per named peer, for drivers whose peer names are not key-derived.

    ``Keyring.derive(names, seed)`` is deterministic (the same seed gives the same keys),
    so simulations with signing stay reproducible.

    Verification is a pure function of the record's bytes, and a simulator's peers share
    one process: the signers of one keyring share a memo of the last ``VERIFIED_KEPT``
    records verified, so a record relayed to a thousand peers is checked once, not a
    thousand times (each peer still decides on it exactly as a node would). A node
    verifies every record itself (:class:`IdentitySigner`).
    """

    VERIFIED_KEPT = 1 << 16

    def __init__(self, identities: Mapping[PeerId, Identity]) -> None:
        self.identities = dict(identities)
        self.names = {identity.peer_id: name for name, identity in self.identities.items()}
        if len(self.names) != len(self.identities):
            raise ValueError("two names share one identity")
        self._verified: OrderedDict[bytes, tuple[PeerId, dict[str, Any]] | None] = OrderedDict()

    @classmethod
    def derive(cls, names: Iterable[PeerId], seed: int | str = 0) -> Keyring:
        identities = {}
        for name in names:
            key_seed = hashlib.sha256(f"p2pfl/keyring/v1:{seed}:{name}".encode()).digest()
            identities[name] = Identity.generate(key_seed)
        return cls(identities)

    def signer(self, name: PeerId) -> RecordSigner:
        """The signer of peer ``name`` (``KeyError`` if it has no identity here)."""
        return _KeyringSigner(self.identities[name], self)

    def verify(self, data: Any) -> tuple[PeerId, dict[str, Any]] | None:
        """The origin's name and the record, or ``None``; memoised by the record's bytes."""
        if type(data) is not bytes:
            return None
        verified = self._verified
        if data in verified:
            verified.move_to_end(data)
            return verified[data]
        opened = _open(data)
        name = None if opened is None else self.names.get(opened[0])
        result = None if opened is None or name is None else (name, opened[1])
        verified[data] = result
        if len(verified) > self.VERIFIED_KEPT:
            verified.popitem(last=False)
        return result


class _KeyringSigner(RecordSigner):
    __slots__ = ("identity", "keyring")

    def __init__(self, identity: Identity, keyring: Keyring) -> None:
        self.identity = identity
        self.keyring = keyring  # shared by all its signers: names and the verification memo

    def sign(self, record: dict[str, Any]) -> bytes:
        return sign_record(self.identity, record).data

    def verify(self, data: Any) -> tuple[PeerId, dict[str, Any]] | None:
        return self.keyring.verify(data)
