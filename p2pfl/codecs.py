"""Model compression codecs for flat parameter vectors.

A codec turns a float vector into ``(payload bytes, small int meta)`` and back. The wire
(:mod:`p2pfl.wire`) puts the codec's name and meta in the envelope and the payload in the
tensor field, so a receiver needs nothing but the message to decode it.

Errors (``x`` the input, ``y = decode(encode(x))``):

========  ==============  ===============================================================
name      bytes/param     error
========  ==============  ===============================================================
fp32      4               exact (float32 inputs); other floats are rounded to float32
fp16      2               ``|x-y| <= 2**-11 |x|`` for ``|x|`` in float16's normal range
                          ``[2**-14, 65504]``; ``|x-y| <= 2**-25`` below it
int8      1 + 4/chunk     ``|x-y| <= max|x[chunk]| / 254`` per element (symmetric scale per
                          chunk of ``chunk`` values, default 256)
topk      8 k / n         keeps the ``k`` largest magnitudes exactly, zeroes the rest:
                          ``||x-y||_2 <= sqrt(1 - k/n) ||x||_2``
========  ==============  ===============================================================

Decoding is hostile-input safe: every length, index and scale is checked and any
inconsistency raises :class:`CodecError` (a ``ValueError``); the output size is the
``numel`` the caller passes in (the wire bounds it before calling), never a number read
from the payload. Encoding refuses non-finite input with ``ValueError``.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from p2pfl.errors import P2PFLError
from p2pfl.messages import ENVELOPE_OVERHEAD, Message, _meta_size

__all__ = [
    "CODECS",
    "Codec",
    "CodecError",
    "EncodedMessage",
    "Encoding",
    "Fp16Codec",
    "Fp32Codec",
    "Int8Codec",
    "TopKCodec",
    "all_finite",
    "get_codec",
    "tensor_from_le_bytes",
    "tensor_to_le_bytes",
]

Buffer = bytes | bytearray | memoryview


class CodecError(P2PFLError, ValueError):
    """An encoded payload that cannot be decoded: corrupt, truncated or hostile."""


# ---------------------------------------------------------------- helpers


#: numpy's little-endian form of each tensor dtype numpy has (all of the wire's but bfloat16)
_LE_NUMPY: dict[torch.dtype, np.dtype[Any]] = {
    torch.float64: np.dtype("<f8"),
    torch.float32: np.dtype("<f4"),
    torch.float16: np.dtype("<f2"),
    torch.int64: np.dtype("<i8"),
    torch.int32: np.dtype("<i4"),
    torch.int16: np.dtype("<i2"),
    torch.int8: np.dtype("i1"),
    torch.uint8: np.dtype("u1"),
    torch.bool: np.dtype("?"),
}
_NUMPY_FLOATS = frozenset({torch.float64, torch.float32, torch.float16})


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN or Inf.

    A CPU tensor of a dtype numpy has is checked by numpy (``isfinite`` and ``all``:
    fewer dispatches than torch's for the small tensors a message carries, and faster
    for large ones too); any other by one torch reduction without a temporary (min and
    max propagate NaN and show an Inf; ~10x faster than ``torch.isfinite(t).all()``).
    """
    if tensor.numel() == 0:
        return True
    if tensor.dtype in _NUMPY_FLOATS and tensor.is_cpu:
        array = (tensor.detach() if tensor.requires_grad else tensor).numpy()
        return bool(np.isfinite(array).all())
    low, high = torch.aminmax(tensor.detach().reshape(-1))
    return math.isfinite(float(low)) and math.isfinite(float(high))


# ---------------------------------------------------------------- little-endian raw bytes


def tensor_to_le_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian bytes, without a copy where possible."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.reshape(-1, flat.element_size()).flip(1).reshape(-1).contiguous()
    return memoryview(raw.numpy().data).cast("B")


def tensor_from_le_bytes(data: Buffer, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A new, writable tensor of ``shape`` read from little-endian ``data``.

    ``len(data)`` must be exactly ``numel * itemsize`` (callers check; a mismatch is a
    ``CodecError`` here too).
    """
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    if len(data) != numel * itemsize:
        raise CodecError(f"{len(data)} bytes for {numel} x {itemsize}-byte elements")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # The one copy, made by numpy: it asks for transparent huge pages on large arrays,
    # which makes copying into fresh memory several times faster than bytearray().
    little = _LE_NUMPY.get(dtype)
    if little is not None:  # into native order as it copies (nothing to swap on most hosts)
        native = torch.from_numpy(np.frombuffer(data, dtype=little).astype(little.newbyteorder("=")))
        return native if len(shape) == 1 else native.reshape(shape)
    raw = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    if sys.byteorder == "big" and itemsize > 1:
        raw = raw.reshape(-1, itemsize).flip(1).reshape(-1).contiguous()
    return raw.view(dtype).reshape(shape)


# ---------------------------------------------------------------- codecs


class Codec(ABC):
    """Encodes a flat float vector; decodes to a new float32 vector of a given length."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False

    @abstractmethod
    def encode(self, vec: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        """``(payload, meta)`` for ``vec`` (any float dtype, any shape: it is flattened)."""

    @abstractmethod
    def decode(self, data: Buffer, meta: Mapping[str, Any], numel: int) -> torch.Tensor:
        """The float32 vector of ``numel`` values that ``data``/``meta`` encode."""

    @staticmethod
    def _flat_finite(vec: torch.Tensor) -> torch.Tensor:
        if not vec.is_floating_point():
            raise ValueError(f"codecs encode float tensors, got {vec.dtype}")
        flat = vec.detach().cpu().reshape(-1)
        if not all_finite(flat):
            raise ValueError("cannot encode a vector holding NaN or Inf")
        return flat

    @staticmethod
    def _no_meta(meta: Mapping[str, Any], allowed: frozenset[str] = frozenset()) -> None:
        extra = set(meta) - allowed
        if extra:
            raise CodecError(f"unexpected codec meta keys {sorted(extra)}")


class Fp32Codec(Codec):
    """Identity on float32: 4 bytes per parameter, exact."""

    name = "fp32"
    lossless = True

    def encode(self, vec: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        flat = self._flat_finite(vec).to(torch.float32)
        return bytes(tensor_to_le_bytes(flat)), {}

    def decode(self, data: Buffer, meta: Mapping[str, Any], numel: int) -> torch.Tensor:
        self._no_meta(meta)
        return tensor_from_le_bytes(data, torch.float32, (numel,))


class Fp16Codec(Codec):
    """Half precision: 2 bytes per parameter, relative error at most 2**-11."""

    name = "fp16"
    FP16_MAX = 65504.0

    def encode(self, vec: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        flat = self._flat_finite(vec)
        if flat.numel() and float(flat.abs().max()) > self.FP16_MAX:
            raise ValueError(f"values beyond float16's range (|x| > {self.FP16_MAX})")
        return bytes(tensor_to_le_bytes(flat.to(torch.float16))), {}

    def decode(self, data: Buffer, meta: Mapping[str, Any], numel: int) -> torch.Tensor:
        self._no_meta(meta)
        return tensor_from_le_bytes(data, torch.float16, (numel,)).to(torch.float32)


class Int8Codec(Codec):
    """8-bit symmetric quantisation with one float32 scale per chunk of values.

    Payload: ``ceil(n/chunk)`` little-endian float32 scales, then ``n`` int8 values.
    A chunk's scale is ``max|x|/127``, so each value is off by at most half a step,
    ``max|x[chunk]|/254``; smaller chunks are more accurate and cost ``4/chunk`` bytes
    per parameter more.
    """

    name = "int8"
    MAX_CHUNK = 1 << 24

    def __init__(self, chunk: int = 256) -> None:
        if not 1 <= chunk <= self.MAX_CHUNK:
            raise ValueError(f"chunk must be in [1, {self.MAX_CHUNK}], got {chunk}")
        self.chunk = chunk

    def encode(self, vec: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        flat = self._flat_finite(vec).to(torch.float32)
        n, chunk = flat.numel(), self.chunk
        nchunks = -(-n // chunk)
        padded = torch.zeros(nchunks * chunk, dtype=torch.float32)
        padded[:n] = flat
        blocks = padded.view(nchunks, chunk)
        absmax = blocks.abs().amax(dim=1)
        # a subnormal maximum would make a zero scale: the smallest float32 step is exact there
        scales = torch.where(absmax > 0, (absmax / 127.0).clamp_min(2.0**-149), 0.0)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        payload = bytes(tensor_to_le_bytes(scales)) + bytes(tensor_to_le_bytes(q.reshape(-1)[:n]))
        return payload, {"chunk": chunk}

    def decode(self, data: Buffer, meta: Mapping[str, Any], numel: int) -> torch.Tensor:
        self._no_meta(meta, frozenset({"chunk"}))
        chunk = meta.get("chunk")
        if type(chunk) is not int or not 1 <= chunk <= self.MAX_CHUNK:
            raise CodecError(f"int8 chunk must be an int in [1, {self.MAX_CHUNK}]")
        nchunks = -(-numel // chunk)
        if len(data) != 4 * nchunks + numel:
            raise CodecError(f"int8 payload of {len(data)} bytes for {numel} values")
        view = memoryview(data).cast("B")
        scales = tensor_from_le_bytes(view[: 4 * nchunks], torch.float32, (nchunks,))
        if not all_finite(scales) or bool((scales < 0).any()):
            raise CodecError("int8 scales must be finite and non-negative")
        q = tensor_from_le_bytes(view[4 * nchunks :], torch.int8, (numel,))
        out = torch.zeros(nchunks * chunk, dtype=torch.float32)
        out[:numel] = q
        return (out.view(nchunks, chunk) * scales[:, None]).reshape(-1)[:numel].clone()


class TopKCodec(Codec):
    """Top-k sparsification: the ``k`` largest-magnitude values and their indices.

    Payload: ``k`` strictly increasing little-endian uint32 indices, then ``k`` float32
    values; everything else decodes to zero. ``k = max(1, ceil(ratio * n))`` unless
    ``k`` is given. The kept values are exact; the error is the energy of the rest,
    ``||x-y|| <= sqrt(1 - k/n) ||x||``. Vectors of 2**32 values or more are refused.
    """

    name = "topk"

    def __init__(self, ratio: float = 0.01, k: int | None = None) -> None:
        if k is None and not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if k is not None and k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.ratio, self.k = ratio, k

    def encode(self, vec: torch.Tensor) -> tuple[bytes, dict[str, int]]:
        flat = self._flat_finite(vec).to(torch.float32)
        n = flat.numel()
        if n >= 1 << 32:
            raise ValueError("top-k indices are uint32: vectors must have < 2**32 values")
        k = self.k if self.k is not None else max(1, math.ceil(self.ratio * n))
        k = min(k, n)
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        indices = idx.numpy().astype("<u4").tobytes()
        return indices + bytes(tensor_to_le_bytes(flat[idx])), {}

    def decode(self, data: Buffer, meta: Mapping[str, Any], numel: int) -> torch.Tensor:
        self._no_meta(meta)
        if len(data) % 8:
            raise CodecError(f"top-k payload of {len(data)} bytes is not k*(4+4)")
        k = len(data) // 8
        if k > numel:
            raise CodecError(f"top-k with {k} values for a vector of {numel}")
        out = torch.zeros(numel, dtype=torch.float32)
        if k == 0:
            return out
        view = memoryview(data).cast("B")
        idx = np.frombuffer(view[: 4 * k], dtype="<u4").astype(np.int64)
        if idx[-1] >= numel or (k > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
            raise CodecError("top-k indices must be strictly increasing and < numel")
        out[torch.from_numpy(idx)] = tensor_from_le_bytes(view[4 * k :], torch.float32, (k,))
        return out


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp32Codec, Fp16Codec, Int8Codec, TopKCodec)}


def get_codec(name: str, **options: Any) -> Codec:
    """The codec called ``name``, built with encode-side ``options`` (e.g. ``ratio``).

    Decoding never needs options: whatever it needs travels in the codec meta.
    """
    try:
        cls = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(CODECS)}") from None
    return cls(**options)


# ---------------------------------------------------------------- messages that travel encoded


@dataclass(frozen=True, slots=True)
class Encoding:
    """A tensor as a codec encoded it: what the wire carries in place of raw float32."""

    codec: str
    payload: bytes
    meta: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """The payload, plus the codec's name and meta as the envelope carries them."""
        return len(self.payload) + _meta_size({"c": self.codec, "x": self.meta})


@dataclass(slots=True)
class EncodedMessage(Message):
    """A message whose tensor travels encoded: ``params`` is what the receiver decodes.

    The sender encodes once (:mod:`p2pfl.protocols.compression`), then both drivers use
    that one encoding: the node's wire sends ``encoding.payload`` as it is, the simulator
    counts its size (``nbytes``) and hands the receiver ``params``, which is exactly what
    the node's receiver decodes from the payload. ``encoding`` is not an ``__init__``
    field on purpose: ``dataclasses.replace(message, params=...)`` (an attacker rewriting
    a model) makes a message without it, which travels as raw float32 -- never a stale
    payload that no longer matches ``params``.
    """

    encoding: Encoding | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(
        cls, message: Message, params: torch.Tensor, encoding: Encoding | None
    ) -> EncodedMessage:
        """``message`` (kind, round, meta) carrying ``params``, encoded as ``encoding``."""
        out = cls(message.kind, message.round, params, message.meta)
        out.encoding = encoding
        return out

    def nbytes(self) -> int:
        """The encoded size: envelope, meta and the codec's payload (not ``params``)."""
        encoding = self.encoding
        if encoding is None:
            return Message.nbytes(self)
        if self._size < 0:
            size = ENVELOPE_OVERHEAD + encoding.nbytes
            if self.meta:
                size += _meta_size(self.meta)
            self._size = size
        return self._size
