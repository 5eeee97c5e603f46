"""Ed25519 identities: one key for the libp2p transport and for signed payloads.

A peer is named by its libp2p peer id. For Ed25519 keys libp2p *inlines* the public key
in the id (an identity multihash of the protobuf-encoded key), so anyone holding a peer
id can check that peer's signatures without a key exchange or a directory. That is what
makes relayed data (gossiped histories, population views) verifiable from its origin.

Only Ed25519 peer ids are accepted by :func:`verify`: ids of other key types (RSA,
secp256k1 hashed ids) do not carry a key we could check, so they are treated as unknown.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from pathlib import Path

import base58
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair, KeyType, PrivateKey
from libp2p.peer.id import ID

__all__ = [
    "Identity",
    "peer_id_from_bytes",
    "peer_id_to_bytes",
    "public_key_of",
    "verify",
]

SEED_BYTES = 32
SIGNATURE_BYTES = 64
#: identity multihash (code 0x00, length 36) of a protobuf PublicKey
#: {key_type: Ed25519 (1), data: <32 bytes>}: the fixed prefix of every Ed25519 peer id.
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
PEER_ID_BYTES = len(_ED25519_PEER_ID_PREFIX) + 32
# An Ed25519 peer id is 52 base58 characters; anything much longer is not one, and
# base58 decoding is quadratic pure Python, so refuse long strings before decoding.
_MAX_PEER_ID_CHARS = 64


class Identity:
    """An Ed25519 key pair and the libp2p peer id derived from it."""

    __slots__ = ("_private", "_keypair", "peer_id", "peer_id_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        public = private_key.get_public_key()
        self._private = private_key
        self._keypair = KeyPair(private_key, public)
        pid = ID.from_pubkey(public)
        #: base58 peer id, exactly as libp2p prints it (``12D3KooW...``)
        self.peer_id: str = pid.to_base58()
        #: the binary peer id (38 bytes), as carried on the wire
        self.peer_id_bytes: bytes = pid.to_bytes()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def generate(cls, seed: bytes | None = None) -> Identity:
        """A fresh identity; with a 32-byte ``seed`` (the Ed25519 seed) a reproducible one.

        For a seed derived from a name use e.g. ``hashlib.sha256(name).digest()``.
        """
        if seed is not None and len(seed) != SEED_BYTES:
            raise ValueError(f"an Ed25519 seed is {SEED_BYTES} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.new(seed))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> Identity:
        """Load a key serialised by :meth:`private_bytes` (libp2p's protobuf key format).

        Both py-libp2p's 32-byte and go-libp2p's 64-byte (seed + public key) Ed25519
        encodings are accepted.
        """
        try:
            proto = PrivateKey.deserialize_from_protobuf(data)
        except Exception as exc:  # protobuf raises its own DecodeError
            raise ValueError(f"not a libp2p private key: {exc}") from None
        if proto.key_type != KeyType.Ed25519.value:
            raise ValueError(f"only Ed25519 keys are supported, got key type {proto.key_type}")
        raw = bytes(proto.data)
        if len(raw) == 2 * SEED_BYTES:
            seed, public = raw[:SEED_BYTES], raw[SEED_BYTES:]
            identity = cls(Ed25519PrivateKey.from_bytes(seed))
            if identity.public_key_bytes != public:
                raise ValueError("64-byte Ed25519 key: public half does not match the seed")
            return identity
        if len(raw) != SEED_BYTES:
            raise ValueError(f"Ed25519 private key of {len(raw)} bytes")
        return cls(Ed25519PrivateKey.from_bytes(raw))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """The identity stored at ``path``, creating (and persisting) one if there is none.

        The key is written atomically with permissions 0600: a crash leaves either no file
        or a complete one, and two processes racing on the same path end up with the same
        key (the loser of the race loads the winner's file).
        """
        path = Path(path)
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        identity = cls.generate()
        if _write_new_file(path, identity.private_bytes()):
            return identity
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path) -> Identity:
        data = path.read_bytes()
        if os.name == "posix" and path.stat().st_mode & 0o077:
            warnings.warn(
                f"private key {path} is readable by other users; chmod 600 it",
                stacklevel=3,
            )
        return cls.from_private_bytes(data)

    # -- use -----------------------------------------------------------------------------
    def private_bytes(self) -> bytes:
        """The private key in libp2p's protobuf serialisation (what the key file holds)."""
        return self._private.serialize()

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._keypair.public_key.to_bytes()

    @property
    def libp2p_keypair(self) -> KeyPair:
        """The key pair to hand to ``libp2p.new_host(key_pair=...)``."""
        return self._keypair

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data``."""
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``peer_id``'s signature of ``data``.

    The public key comes from the peer id itself; an id that does not embed an Ed25519
    key, or is not a well-formed id at all, verifies nothing (``False``).
    """
    try:
        key = public_key_of(peer_id)
    except ValueError:
        return False
    return verify_with_key(key, data, signature)


def verify_with_key(key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """Signature check against an already extracted key (no exception on bad input)."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        return key.verify(data, signature)
    except Exception:  # PyNaCl raises on malformed keys/signatures besides BadSignature
        return False


def public_key_of(peer_id: str) -> Ed25519PublicKey:
    """The Ed25519 public key inlined in ``peer_id``; ``ValueError`` if there is none."""
    return public_key_from_bytes(peer_id_to_bytes(peer_id))


@functools.lru_cache(maxsize=4096)
def public_key_from_bytes(raw_peer_id: bytes) -> Ed25519PublicKey:
    """The key inlined in a binary peer id (cached: ids repeat on every message)."""
    if len(raw_peer_id) != PEER_ID_BYTES or not raw_peer_id.startswith(_ED25519_PEER_ID_PREFIX):
        raise ValueError("not an Ed25519 (identity multihash) peer id")
    return Ed25519PublicKey.from_bytes(raw_peer_id[len(_ED25519_PEER_ID_PREFIX) :])


@functools.lru_cache(maxsize=4096)
def peer_id_to_bytes(peer_id: str) -> bytes:
    """Decode a base58 peer id, insisting on the one canonical spelling of the bytes."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        raise ValueError("not a peer id")
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raise ValueError("peer id is not base58") from None
    if base58.b58encode(raw).decode() != peer_id:
        raise ValueError("peer id is not in canonical base58")
    return raw


@functools.lru_cache(maxsize=4096)
def peer_id_from_bytes(raw_peer_id: bytes) -> str:
    """The base58 form of a binary peer id (libp2p's ``ID.to_base58``)."""
    return base58.b58encode(raw_peer_id).decode()


def _write_new_file(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` (mode 0600) atomically; False if it appeared first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes it 0600 already; say so explicitly
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if someone else created the key meanwhile
        except FileExistsError:
            return False
        except OSError:  # file systems without hard links: last writer wins
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
