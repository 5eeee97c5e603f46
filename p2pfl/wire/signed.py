"""The signed container shared by messages and relayed records.

Layout (valid msgpack: a 3-element array)::

    0x93 | bin8(38) sender peer id | body (one msgpack object) | bin8(64) signature

The signature is Ed25519 by the sender over ``domain || SHA-256(everything before the
signature)``. Signing the exact bytes sent (rather than a re-encoding of the decoded
values) leaves no canonicalisation to get wrong, and because the layout around the body
is fixed, a receiver verifies the signature *before* parsing the body: bytes nobody
signed never reach the msgpack parser. Hashing first and signing the 32-byte digest keeps
signing cost independent of model size apart from one SHA-256 pass (see
``benchmarks/codec.py``: Ed25519 over a whole 40 MB model hashes it twice with SHA-512
and copies it in PyNaCl). The domain tag keeps a message signature from ever being
accepted as a record signature and vice versa.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pfl.identity import (
    PEER_ID_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_from_bytes,
    public_key_from_bytes,
    verify_with_key,
)

from .errors import DropReason, WireError
from .limits import DEFAULT_LIMITS, WireLimits, check_value

__all__ = ["SignedRecord", "sign_record", "verify_record"]

Buffer = bytes | bytearray | memoryview

MESSAGE_DOMAIN = b"p2pfl/wire/message/v1\x00"
RECORD_DOMAIN = b"p2pfl/wire/record/v1\x00"

_PREFIX = bytes([0x93, 0xC4, PEER_ID_BYTES])
_SIG_HEADER = bytes([0xC4, SIGNATURE_BYTES])
HEAD_BYTES = len(_PREFIX) + PEER_ID_BYTES  # 41
TAIL_BYTES = len(_SIG_HEADER) + SIGNATURE_BYTES  # 66
OVERHEAD_BYTES = HEAD_BYTES + TAIL_BYTES


def bin_header(n: int) -> bytes:
    """The msgpack ``bin`` header for ``n`` bytes (lets a payload be joined, not packed)."""
    if n < 1 << 8:
        return bytes([0xC4, n])
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ValueError("msgpack bin payloads are limited to 4 GiB")


def seal(identity: Identity, body: Iterable[Buffer], domain: bytes) -> bytes:
    """Wrap the msgpack ``body`` pieces (one object together) and sign them."""
    parts: list[Buffer] = [_PREFIX, identity.peer_id_bytes, *body]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    parts += [_SIG_HEADER, identity.sign(domain + digest.digest())]
    return b"".join(parts)


def open_sealed(data: Buffer, max_bytes: int, domain: bytes) -> tuple[bytes, memoryview]:
    """``(sender id bytes, body bytes)`` of a sealed message whose signature verifies.

    Raises ``WireError``: oversized (checked first), malformed layout, unknown_sender
    (id without an Ed25519 key), bad_signature.
    """
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise WireError(DropReason.OVERSIZED, f"{len(view)} bytes, cap {max_bytes}")
    if (
        len(view) < OVERHEAD_BYTES + 1
        or view[: len(_PREFIX)] != _PREFIX
        or view[-TAIL_BYTES:-SIGNATURE_BYTES] != _SIG_HEADER
    ):
        raise WireError(DropReason.MALFORMED, "not a signed p2pfl message")
    sender = bytes(view[len(_PREFIX) : HEAD_BYTES])
    try:
        key = public_key_from_bytes(sender)
    except ValueError:
        raise WireError(DropReason.UNKNOWN_SENDER, "sender id embeds no Ed25519 key") from None
    digest = hashlib.sha256(view[:-TAIL_BYTES]).digest()
    if not verify_with_key(key, domain + digest, bytes(view[-SIGNATURE_BYTES:])):
        raise WireError(DropReason.BAD_SIGNATURE, f"from {peer_id_from_bytes(sender)}")
    return sender, view[HEAD_BYTES:-TAIL_BYTES]


def unpack(body: Buffer, limits: WireLimits) -> Any:
    """Exactly one msgpack object from ``body`` under ``limits``; malformed otherwise."""
    try:
        return msgpack.unpackb(body, **limits.unpack_options())
    except Exception as exc:  # msgpack's ValueError family, UnicodeDecodeError, ...
        raise WireError(DropReason.MALFORMED, f"msgpack: {exc}") from None


# ---------------------------------------------------------------- relayed records


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """A plain dict signed by its origin, so that others can forward it.

    Put ``record.data`` (bytes) in a message's meta; whoever receives it, however many
    hops later, checks it with :func:`verify_record` against :attr:`origin`. A record
    carries no freshness of its own: include a round or counter in it and merge by
    maximum if replays of old records matter.
    """

    data: bytes

    @classmethod
    def from_bytes(cls, data: Buffer) -> SignedRecord:
        return cls(bytes(data))

    def to_bytes(self) -> bytes:
        return self.data

    @property
    def origin(self) -> str:
        """The peer id that signed it (only meaningful once :func:`verify_record` passed)."""
        if len(self.data) < HEAD_BYTES or not self.data.startswith(_PREFIX):
            raise WireError(DropReason.MALFORMED, "not a signed record")
        return peer_id_from_bytes(self.data[len(_PREFIX) : HEAD_BYTES])


def sign_record(identity: Identity, record: dict[str, Any]) -> SignedRecord:
    """Sign ``record`` (plain data, string keys) as coming from ``identity``."""
    try:
        check_value(record, DEFAULT_LIMITS, "record")
    except WireError as exc:
        raise ValueError(f"record is not plain bounded data: {exc.detail}") from None
    if type(record) is not dict:
        raise ValueError("a record is a dict")
    body = msgpack.packb(record, use_bin_type=True)
    return SignedRecord(seal(identity, [body], RECORD_DOMAIN))


def verify_record(
    signed: SignedRecord | Buffer, *, limits: WireLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """The record's content if its origin's signature verifies; ``WireError`` otherwise."""
    data = signed.data if isinstance(signed, SignedRecord) else signed
    _, body = open_sealed(data, limits.max_message_bytes, RECORD_DOMAIN)
    record = unpack(body, limits)
    if type(record) is not dict:
        raise WireError(DropReason.BAD_TYPE, "a record is a map")
    check_value(record, limits, "record")
    return record
