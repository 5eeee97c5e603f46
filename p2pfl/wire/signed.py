"""The signed container shared by messages and relayed records.

Layout: a msgpack array of four ``bin``s, so that every offset follows from bin headers::

    0x94 | bin8(38) sender peer id | bin(body) | bin(payload) | bin8(64) signature

``body`` is a msgpack map (the message's fields, or a record); ``payload`` is the raw
tensor bytes (empty when there are none). The signature is Ed25519 by the sender over
``domain || SHA-256(everything before the signature)``.

Why this shape:

- it signs the exact bytes sent, not a re-encoding of decoded values: there is no
  canonical form to get wrong;
- a receiver finds the pieces from three bin headers and verifies the signature *before*
  parsing anything: bytes nobody signed never reach the msgpack parser;
- the payload is located without parsing the body, so the tensor is read straight out of
  the received buffer (one copy into the new tensor), and the strict msgpack decoder only
  ever sees the small body;
- signing a SHA-256 digest keeps Ed25519's cost independent of the model size apart from
  one hashing pass (Ed25519 itself would hash a whole 40 MB message twice with SHA-512:
  see ``benchmarks/codec.py``);
- the domain tag keeps a message signature from being accepted as a record's, and back.
"""

from __future__ import annotations

import hashlib
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

_PREFIX = bytes([0x94, 0xC4, PEER_ID_BYTES])
_SIG_HEADER = bytes([0xC4, SIGNATURE_BYTES])
HEAD_BYTES = len(_PREFIX) + PEER_ID_BYTES  # 41: array header + sender
TAIL_BYTES = len(_SIG_HEADER) + SIGNATURE_BYTES  # 66: the signature
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def bin_header(n: int) -> bytes:
    """The msgpack ``bin`` header for ``n`` bytes (lets a payload be joined, not packed)."""
    if n < 1 << 8:
        return bytes([0xC4, n])
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ValueError("msgpack bin payloads are limited to 4 GiB")


def seal(identity: Identity, body: Buffer, payload: Buffer, domain: bytes) -> bytes:
    """The signed container of ``body`` (msgpack bytes) and ``payload`` (raw bytes)."""
    body_len, payload_len = len(memoryview(body).cast("B")), len(memoryview(payload).cast("B"))
    parts: list[Buffer] = [
        _PREFIX,
        identity.peer_id_bytes,
        bin_header(body_len),
        body,
        bin_header(payload_len),
        payload,
    ]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    parts += [_SIG_HEADER, identity.sign(domain + digest.digest())]
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Opened:
    """The verified pieces of a container; the views point into the received buffer."""

    sender: bytes
    body: memoryview
    payload: memoryview


def open_sealed(data: Buffer, max_bytes: int, domain: bytes) -> Opened:
    """The pieces of a sealed container whose signature verifies.

    Raises ``WireError``: oversized (checked first), malformed layout, unknown_sender
    (id without an Ed25519 key), bad_signature.
    """
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise WireError(DropReason.OVERSIZED, f"{len(view)} bytes, cap {max_bytes}")
    if view[: len(_PREFIX)] != _PREFIX:
        raise WireError(DropReason.MALFORMED, "not a signed p2pfl container")
    body_at, body_end = _bin_at(view, HEAD_BYTES)
    payload_at, payload_end = _bin_at(view, body_end)
    if len(view) != payload_end + TAIL_BYTES or view[payload_end:-SIGNATURE_BYTES] != _SIG_HEADER:
        raise WireError(DropReason.MALFORMED, "no signature where it belongs")
    sender = bytes(view[len(_PREFIX) : HEAD_BYTES])
    try:
        key = public_key_from_bytes(sender)
    except ValueError:
        raise WireError(DropReason.UNKNOWN_SENDER, "sender id embeds no Ed25519 key") from None
    digest = hashlib.sha256(view[:payload_end]).digest()
    if not verify_with_key(key, domain + digest, bytes(view[-SIGNATURE_BYTES:])):
        raise WireError(DropReason.BAD_SIGNATURE, f"from {peer_id_from_bytes(sender)}")
    return Opened(sender, view[body_at:body_end], view[payload_at:payload_end])


def _bin_at(view: memoryview, pos: int) -> tuple[int, int]:
    """``(start, end)`` of the bin whose header is at ``pos``; malformed if there is none."""
    width = _BIN_LENGTH_BYTES.get(view[pos]) if pos < len(view) else None
    if width is None or pos + 1 + width > len(view):
        raise WireError(DropReason.MALFORMED, f"expected a bin at offset {pos}")
    start = pos + 1 + width
    end = start + int.from_bytes(view[pos + 1 : start], "big")
    if end > len(view):
        raise WireError(DropReason.MALFORMED, "bin runs past the end")
    return start, end


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
    return SignedRecord(seal(identity, body, b"", RECORD_DOMAIN))


def verify_record(
    signed: SignedRecord | Buffer, *, limits: WireLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """The record's content if its origin's signature verifies; ``WireError`` otherwise."""
    data = signed.data if isinstance(signed, SignedRecord) else signed
    opened = open_sealed(data, limits.max_message_bytes, RECORD_DOMAIN)
    if opened.payload:
        raise WireError(DropReason.MALFORMED, "a record has no payload")
    record = unpack(opened.body, limits)
    if type(record) is not dict:
        raise WireError(DropReason.BAD_TYPE, "a record is a map")
    check_value(record, limits, "record")
    return record
