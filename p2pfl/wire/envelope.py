"""Signed message envelopes: ``encode`` a protocol ``Message``, ``decode`` untrusted bytes.

The body of the signed container (see :mod:`p2pfl.wire.signed`) is a msgpack map::

    {"v": 1,                 format version
     "p": str,               protocol name ("dpsgd", ...)
     "k": str,               message kind
     "r": int,               round (>= 0)
     "q": int,               sequence number (uint64, see p2pfl.security.SequenceNumbers)
     "m": {...},             meta, plain data (omitted when empty)
     "t": {                  tensor description (omitted when the message has none)
        "d": str,            dtype code of the decoded tensor ("f32", ...)
        "s": [int, ...],     shape
        "c": str, "x": {..}  codec name and codec meta (omitted for raw bytes)}}

and the container's payload holds the tensor: raw little-endian bytes of dtype ``d``,
or what codec ``c`` produced.

A message the sender's protocol already encoded (:class:`p2pfl.codecs.EncodedMessage`)
travels with that encoding; ``decode`` hands back such a message for a tensor that came
with a codec, so the receiving protocol knows how it travelled.

``decode`` checks, in order: total size, container layout, sender key, signature, msgpack
limits, known keys and types, tensor dtype/shape/layout/byte count, codec payload,
finiteness. Whatever the input, it returns an ``Envelope`` or raises ``WireError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from p2pfl.codecs import (
    Codec,
    CodecError,
    EncodedMessage,
    Encoding,
    all_finite,
    get_codec,
    tensor_from_le_bytes,
    tensor_to_le_bytes,
)
from p2pfl.identity import Identity, peer_id_from_bytes
from p2pfl.messages import Message, PeerId

from .errors import DropReason, WireError
from .limits import DEFAULT_LIMITS, DTYPE_CODES, DTYPES, WireLimits, check_value
from .signed import MESSAGE_DOMAIN, open_sealed, seal, unpack

__all__ = ["Envelope", "Layout", "LayoutCheck", "decode", "encode"]

VERSION = 1
_MAX_ROUND = (1 << 63) - 1
_MAX_SEQ = (1 << 64) - 1
_BODY_KEYS = frozenset("vpkrqmt")
_BODY_REQUIRED = frozenset("vpkrq")
_TENSOR_KEYS = frozenset("dscx")
_TENSOR_REQUIRED = frozenset("ds")
#: the most payload bytes per decoded value any codec produces
MAX_CODEC_BYTES_PER_VALUE = 8

#: an expected tensor layout: a number of elements, or an exact shape
Layout = int | tuple[int, ...]
#: what ``decode`` checks tensors against: a fixed layout, or one per (protocol, kind)
#: (``None`` from the callable: no constraint for that kind)
LayoutCheck = Layout | Callable[[str, str], Layout | None]


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded, signature-checked message and who sent it."""

    sender: PeerId
    protocol: str
    round: int
    seq: int
    message: Message


# ---------------------------------------------------------------- encode


def encode(
    message: Message,
    *,
    identity: Identity,
    protocol: str,
    seq: int,
    codec: Codec | str | None = None,
) -> bytes:
    """Sign and serialise ``message``; ``codec`` compresses its (float) tensor.

    Without a codec the tensor travels as raw little-endian bytes of its own dtype
    (lossless). Raises ``ValueError`` for a message no peer would accept under default
    limits (bad meta, out-of-range round or seq, unsupported dtype).
    """
    if not isinstance(message.round, int) or not 0 <= message.round <= _MAX_ROUND:
        raise ValueError(f"round must be an int in [0, 2**63), got {message.round!r}")
    if not isinstance(seq, int) or not 0 <= seq <= _MAX_SEQ:
        raise ValueError(f"seq must be a uint64, got {seq!r}")
    for name, value in (("protocol", protocol), ("kind", message.kind)):
        if not isinstance(value, str) or not 0 < len(value) <= DEFAULT_LIMITS.max_name_len:
            raise ValueError(f"{name} must be a non-empty str of <= 64 characters")
    try:
        check_value(message.meta, DEFAULT_LIMITS)
    except WireError as exc:
        raise ValueError(f"meta is not plain bounded data: {exc.detail}") from None

    body: dict[str, Any] = {
        "v": VERSION,
        "p": protocol,
        "k": message.kind,
        "r": message.round,
        "q": seq,
    }
    if message.meta:
        body["m"] = message.meta
    payload: bytes | memoryview = b""
    if message.params is not None:
        encoding = message.encoding if isinstance(message, EncodedMessage) else None
        if encoding is not None and codec is None:
            # encoded once by the sender's protocol (p2pfl.protocols.compression): its
            # payload travels as it is, and ``params`` is what the receiver decodes from it
            body["t"] = {
                "d": "f32",
                "s": list(message.params.shape),
                "c": encoding.codec,
                "x": encoding.meta,
            }
            payload = encoding.payload
        else:
            body["t"], payload = _tensor_field(message.params, codec)
    return seal(identity, msgpack.packb(body, use_bin_type=True), payload, MESSAGE_DOMAIN)


def _tensor_field(
    tensor: torch.Tensor, codec: Codec | str | None
) -> tuple[dict[str, Any], bytes | memoryview]:
    if codec is None:
        code = DTYPE_CODES.get(tensor.dtype)
        if code is None:
            raise ValueError(f"dtype {tensor.dtype} cannot travel on the wire")
        return {"d": code, "s": list(tensor.shape)}, tensor_to_le_bytes(tensor)
    if isinstance(codec, str):
        codec = get_codec(codec)
    payload, codec_meta = codec.encode(tensor)
    return {"d": "f32", "s": list(tensor.shape), "c": codec.name, "x": codec_meta}, payload


# ---------------------------------------------------------------- decode


def decode(
    data: bytes | bytearray | memoryview,
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    layout_check: LayoutCheck | None = None,
) -> Envelope:
    """The envelope in ``data``, fully validated; ``WireError`` for anything else.

    ``layout_check`` constrains the tensor (number of elements or exact shape, possibly
    per protocol and kind); it is applied before the tensor is allocated. The result's
    tensor is a new, writable tensor owned by the caller.
    """
    try:
        return _decode(data, limits, layout_check)
    except WireError:
        raise
    except Exception as exc:  # a bug here must not take a node down: drop, and say so
        raise WireError(DropReason.MALFORMED, f"internal error: {exc!r}") from exc


def _decode(data: Any, limits: WireLimits, layout_check: LayoutCheck | None) -> Envelope:
    opened = open_sealed(data, limits.max_message_bytes, MESSAGE_DOMAIN)
    body = unpack(opened.body, limits)
    if type(body) is not dict:
        raise WireError(DropReason.MALFORMED, "body is not a map")
    _check_keys(body, _BODY_KEYS, _BODY_REQUIRED, "body")
    if body["v"] != VERSION or type(body["v"]) is not int:
        raise WireError(DropReason.MALFORMED, f"unsupported version {body['v']!r}")
    protocol = _name(body["p"], limits, "protocol")
    kind = _name(body["k"], limits, "kind")
    round_ = _int(body["r"], _MAX_ROUND, "round")
    seq = _int(body["q"], _MAX_SEQ, "seq")
    meta = body.get("m", {})
    if type(meta) is not dict:
        raise WireError(DropReason.BAD_TYPE, "meta is not a map")
    check_value(meta, limits)
    params = None
    encoding = None
    if "t" in body:
        expected = layout_check(protocol, kind) if callable(layout_check) else layout_check
        params = _tensor(body["t"], opened.payload, limits, expected)
        if "c" in body["t"]:  # _tensor checked the codec's name and meta
            encoding = Encoding(body["t"]["c"], bytes(opened.payload), body["t"].get("x", {}))
    elif opened.payload:
        raise WireError(DropReason.MALFORMED, "payload without a tensor description")
    message = Message(kind=kind, round=round_, params=params, meta=meta)
    if encoding is not None:
        # the receiver's protocol may need to know how it travelled (top-k changes)
        message = EncodedMessage.of(message, params, encoding)  # type: ignore[arg-type]
    return Envelope(
        sender=peer_id_from_bytes(opened.sender),
        protocol=protocol,
        round=round_,
        seq=seq,
        message=message,
    )


def _check_keys(
    obj: dict[str, Any], known: frozenset[str], required: frozenset[str], what: str
) -> None:
    keys = obj.keys()
    if not keys <= known:
        raise WireError(DropReason.MALFORMED, f"unknown {what} keys {sorted(keys - known)[:5]}")
    if not required <= keys:
        raise WireError(DropReason.MALFORMED, f"{what} lacks {sorted(required - keys)}")


def _name(value: Any, limits: WireLimits, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= limits.max_name_len:
        raise WireError(DropReason.BAD_TYPE, f"{what} must be a short non-empty string")
    return value


def _int(value: Any, maximum: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise WireError(DropReason.BAD_TYPE, f"{what} must be an int in [0, {maximum}]")
    return value


def _tensor(
    field: Any, payload: memoryview, limits: WireLimits, expected: Layout | None
) -> torch.Tensor:
    if type(field) is not dict:
        raise WireError(DropReason.BAD_TYPE, "tensor is not a map")
    _check_keys(field, _TENSOR_KEYS, _TENSOR_REQUIRED, "tensor")
    code, shape_list = field["d"], field["s"]
    if type(code) is not str or code not in DTYPES or code not in limits.allowed_dtypes:
        raise WireError(DropReason.BAD_TENSOR, f"dtype {code!r} not allowed")
    shape = _shape(shape_list, limits)
    numel = math.prod(shape)
    if expected is not None:
        ok = numel == expected if isinstance(expected, int) else shape == tuple(expected)
        if not ok:
            raise WireError(DropReason.BAD_TENSOR, f"shape {shape} where {expected} expected")
    dtype = DTYPES[code]
    try:
        if "c" in field:
            tensor = _decode_codec(field, code, payload, numel, limits).reshape(shape)
        else:
            if "x" in field:
                raise WireError(DropReason.MALFORMED, "codec meta without a codec")
            itemsize = dtype.itemsize
            if len(payload) != numel * itemsize:
                raise WireError(DropReason.BAD_TENSOR, f"{len(payload)} bytes for {numel} x {code}")
            tensor = tensor_from_le_bytes(payload, dtype, shape)
    except CodecError as exc:
        raise WireError(DropReason.BAD_TENSOR, str(exc)) from None
    if tensor.is_floating_point() and not all_finite(tensor):
        raise WireError(DropReason.NON_FINITE, "tensor holds NaN or Inf")
    return tensor


def _shape(value: Any, limits: WireLimits) -> tuple[int, ...]:
    if type(value) is not list or len(value) > limits.max_ndim:
        raise WireError(DropReason.BAD_TENSOR, f"shape must be a list of <= {limits.max_ndim} ints")
    numel = 1
    for dim in value:
        if type(dim) is not int or not 0 <= dim <= limits.max_numel:
            raise WireError(DropReason.BAD_TENSOR, "shape entries must be ints in [0, max_numel]")
        numel *= dim
        if numel > limits.max_numel:
            raise WireError(DropReason.BAD_TENSOR, f"more than {limits.max_numel} elements")
    return tuple(value)


def _decode_codec(
    field: dict[str, Any], code: str, payload: memoryview, numel: int, limits: WireLimits
) -> torch.Tensor:
    name, meta = field["c"], field.get("x", {})
    if type(name) is not str or name not in limits.allowed_codecs:
        raise WireError(DropReason.BAD_TENSOR, f"codec {name!r} not allowed")
    if code != "f32":
        raise WireError(DropReason.BAD_TENSOR, "codecs decode to f32")
    if type(meta) is not dict or not all(
        type(k) is str and type(v) is int for k, v in meta.items()
    ):
        raise WireError(DropReason.BAD_TYPE, "codec meta must map names to ints")
    try:
        codec = get_codec(name)
    except ValueError:
        raise WireError(DropReason.BAD_TENSOR, f"codec {name!r} unknown") from None
    # no codec spends more than 8 bytes a value (top-k: index and value; int8 with one
    # value per chunk: 5): a larger payload is refused before any decoding work
    if len(payload) > MAX_CODEC_BYTES_PER_VALUE * numel:
        raise WireError(DropReason.BAD_TENSOR, f"{len(payload)} codec bytes for {numel} values")
    return codec.decode(payload, meta, numel)
