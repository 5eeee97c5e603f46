"""Ed25519 identities: one key for the libp2p transport and for signed payloads.

A peer is named by its libp2p peer id. For Ed25519 keys libp2p *inlines* the public key
in the id (an identity multihash of the protobuf-encoded key), so anyone holding a peer
id can check that peer's signatures without a key exchange or a directory. That is what
makes relayed data (gossiped histories, population views) verifiable from its origin.

This module builds those ids itself (they are a fixed 6-byte prefix plus the key, in
base58) instead of importing py-libp2p: the wire codec, and so every protocol and the
simulator, depends on it, and importing libp2p costs seconds and is off limits for them
(see DESIGN.md). The ids, signatures and key files are byte-for-byte libp2p's (the tests
check against libp2p itself); the transport gets a libp2p key pair from
:attr:`Identity.libp2p_keypair`.

Keys are kept and serialised with ``cryptography``; signing and checking go through
libsodium (PyNaCl, the library py-libp2p itself signs with), which checks an Ed25519
signature in about half the time OpenSSL's takes (50 us instead of 100 us here, issue 17:
a node checks every model it receives). Ed25519 signatures are deterministic, so both
produce the same bytes; libsodium is the stricter checker (it also refuses small-order
and non-canonical keys and points, which no honest signer produces).

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
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair
    from nacl.signing import SigningKey, VerifyKey

__all__ = [
    "Identity",
    "peer_id_from_bytes",
    "peer_id_to_bytes",
    "public_key_of",
    "verify",
]

SEED_BYTES = 32
SIGNATURE_BYTES = 64
# libp2p's protobuf keys: field 1 (key type) = 1 (Ed25519), field 2 (data) = the key bytes
_PROTO_ED25519_32 = bytes([0x08, 0x01, 0x12, 0x20])
_PROTO_ED25519_64 = bytes([0x08, 0x01, 0x12, 0x40])  # go-libp2p private keys: seed + public
#: identity multihash (code 0x00, length 36) of the protobuf public key: the fixed
#: prefix of every Ed25519 peer id, followed by the 32-byte key.
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24]) + _PROTO_ED25519_32
PEER_ID_BYTES = len(_ED25519_PEER_ID_PREFIX) + 32
# An Ed25519 peer id is 52 base58 characters; anything much longer is not one, and
# base58 decoding is quadratic, so refuse long strings before decoding.
_MAX_PEER_ID_CHARS = 64
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


class Identity:
    """An Ed25519 key pair and the libp2p peer id derived from it."""

    __slots__ = ("_private", "_signing", "public_key_bytes", "peer_id", "peer_id_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        #: libsodium's key, made on first use (a simulator makes thousands of identities)
        self._signing: SigningKey | None = None
        #: the raw 32-byte Ed25519 public key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        #: the binary peer id (38 bytes), as carried on the wire
        self.peer_id_bytes: bytes = _ED25519_PEER_ID_PREFIX + self.public_key_bytes
        #: base58 peer id, exactly as libp2p prints it (``12D3KooW...``)
        self.peer_id: str = peer_id_from_bytes(self.peer_id_bytes)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def generate(cls, seed: bytes | None = None) -> Identity:
        """A fresh identity; with a 32-byte ``seed`` (the Ed25519 seed) a reproducible one.

        For a seed derived from a name use e.g. ``hashlib.sha256(name).digest()``.
        """
        if seed is None:
            return cls(Ed25519PrivateKey.generate())
        if len(seed) != SEED_BYTES:
            raise ValueError(f"an Ed25519 seed is {SEED_BYTES} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> Identity:
        """Load a key serialised by :meth:`private_bytes` (libp2p's protobuf key format).

        Both py-libp2p's 32-byte and go-libp2p's 64-byte (seed + public key) Ed25519
        encodings are accepted.
        """
        if len(data) == 4 + SEED_BYTES and data.startswith(_PROTO_ED25519_32):
            return cls.generate(data[4:])
        if len(data) == 4 + 2 * SEED_BYTES and data.startswith(_PROTO_ED25519_64):
            identity = cls.generate(data[4 : 4 + SEED_BYTES])
            if identity.public_key_bytes != data[4 + SEED_BYTES :]:
                raise ValueError("64-byte Ed25519 key: public half does not match the seed")
            return identity
        raise ValueError("not a libp2p Ed25519 private key")

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
        seed = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return _PROTO_ED25519_32 + seed

    @property
    def libp2p_keypair(self) -> KeyPair:
        """The key pair to hand to ``libp2p.new_host(key_pair=...)`` (imports libp2p)."""
        from libp2p.crypto.ed25519 import create_new_key_pair

        return create_new_key_pair(self.private_bytes()[len(_PROTO_ED25519_32) :])

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data``."""
        signing = self._signing
        if signing is None:
            from nacl.signing import SigningKey

            seed = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            signing = self._signing = SigningKey(seed)
        return signing.sign(data).signature

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


def verify_with_key(key: VerifyKey, data: bytes, signature: bytes) -> bool:
    """Signature check against an already extracted key (no exception on bad input)."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(data, signature)
    except Exception:  # BadSignatureError, or anything odd about the inputs
        return False
    return True


def public_key_of(peer_id: str) -> VerifyKey:
    """The Ed25519 public key inlined in ``peer_id``; ``ValueError`` if there is none."""
    return public_key_from_bytes(peer_id_to_bytes(peer_id))


@functools.lru_cache(maxsize=4096)
def public_key_from_bytes(raw_peer_id: bytes) -> VerifyKey:
    """The key inlined in a binary peer id (cached: ids repeat on every message)."""
    from nacl.signing import VerifyKey

    if len(raw_peer_id) != PEER_ID_BYTES or not raw_peer_id.startswith(_ED25519_PEER_ID_PREFIX):
        raise ValueError("not an Ed25519 (identity multihash) peer id")
    return VerifyKey(raw_peer_id[len(_ED25519_PEER_ID_PREFIX) :])


@functools.lru_cache(maxsize=4096)
def peer_id_to_bytes(peer_id: str) -> bytes:
    """The binary form of a base58 peer id (``ValueError`` if it is not base58)."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        raise ValueError("not a peer id")
    value = 0
    for char in peer_id:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise ValueError("peer id is not base58")
        value = value * 58 + digit
    zeros = len(peer_id) - len(peer_id.lstrip("1"))  # leading '1's are leading zero bytes
    return bytes(zeros) + value.to_bytes((value.bit_length() + 7) // 8, "big")


@functools.lru_cache(maxsize=4096)
def peer_id_from_bytes(raw_peer_id: bytes) -> str:
    """The base58 (Bitcoin alphabet) form of a binary peer id, as libp2p prints it."""
    value = int.from_bytes(raw_peer_id, "big")
    digits = []
    while value:
        value, digit = divmod(value, 58)
        digits.append(_B58[digit])
    zeros = len(raw_peer_id) - len(raw_peer_id.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(digits))


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
