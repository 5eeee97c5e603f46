"""Limits on what a peer may send, and the checks of plain (meta) values against them.

Every bound here exists so that a hostile message costs the receiver at most memory and
time proportional to its (already capped) size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pfl.codecs import CODECS

from .errors import DropReason, WireError
from .framing import DEFAULT_MAX_FRAME_BYTES

__all__ = ["DTYPES", "DEFAULT_LIMITS", "WireLimits", "check_value"]

#: dtype codes on the wire -> torch dtypes (tensors travel as little-endian raw bytes)
DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack can carry


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Caps applied while decoding untrusted data.

    ``max_message_bytes`` bounds the whole message and is checked before anything else;
    the others bound single msgpack objects (so a 5-byte header cannot make the decoder
    allocate a huge list) and the decoded tensor.
    """

    max_message_bytes: int = DEFAULT_MAX_FRAME_BYTES  # one message is one frame
    max_name_len: int = 64  # protocol and kind names
    max_str_len: int = 64 << 10  # any string in meta
    max_container_len: int = 1 << 16  # any one array or map
    max_meta_depth: int = 8  # nesting of meta containers
    max_meta_items: int = 1 << 18  # meta values in all, nested ones included
    max_ndim: int = 8
    max_numel: int = 32 << 20  # decoded tensor elements (top-k decodes to more than it sends)
    allowed_dtypes: frozenset[str] = field(default_factory=lambda: frozenset(DTYPES))
    allowed_codecs: frozenset[str] = field(default_factory=lambda: frozenset(CODECS))
    #: bytes a message may carry besides its tensor: envelope, signature and meta (a peer
    #: exchange of 1,024 peers x 4 addresses, a MoDeST view of thousands of peers)
    max_meta_bytes: int = 4 << 20

    def message_bound(self, numel: int) -> int:
        """The largest message that can carry a tensor of ``numel`` elements: its bytes in
        the widest codec (top-k sends a value and an index, 8 bytes, per element kept),
        plus ``max_meta_bytes``; never above ``max_message_bytes``.

        A receiver that knows its model's size refuses anything larger before decoding
        it, and charges the sender: a message that big can only be junk.
        """
        return min(self.max_message_bytes, 8 * max(0, numel) + self.max_meta_bytes)

    def unpack_options(self) -> dict[str, Any]:
        """Keyword arguments for ``msgpack.unpackb``: strict, bounded, no ext types."""
        return {
            "raw": False,
            "use_list": True,
            "strict_map_key": True,
            "max_str_len": self.max_str_len,
            "max_bin_len": self.max_message_bytes,
            "max_array_len": self.max_container_len,
            "max_map_len": self.max_container_len,
            "max_ext_len": 0,
            "ext_hook": _refuse_ext,
        }


def _refuse_ext(code: int, data: bytes) -> Any:
    # max_ext_len=0 still lets an empty ext8 through; refuse ext types altogether
    raise ValueError(f"msgpack ext type {code} is not allowed")


DEFAULT_LIMITS = WireLimits()


def check_value(value: Any, limits: WireLimits, what: str = "meta") -> None:
    """Raise ``WireError`` (``bad_type``; ``non_finite`` for NaN/Inf) unless ``value`` is
    plain msgpack-able data in bounds.

    Plain data: None, bool, int (64-bit), finite float, str, bytes, and lists/dicts of those
    with string keys, nested at most ``limits.max_meta_depth`` deep and
    ``limits.max_meta_items`` values in all.
    """
    budget = [limits.max_meta_items]
    _check(value, limits, limits.max_meta_depth, budget, what)


def _check(value: Any, limits: WireLimits, depth: int, budget: list[int], path: str) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise WireError(DropReason.BAD_TYPE, f"more than {limits.max_meta_items} values")
    kind: Callable[..., Any] = type(value)
    if value is None or kind is bool:
        return
    if kind is float:
        # a protocol does arithmetic with meta numbers (gossip's model age): one Inf
        # there turns a model into NaN as surely as a NaN tensor would
        if not math.isfinite(value):
            raise WireError(DropReason.NON_FINITE, f"{path}: {value}")
        return
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise WireError(DropReason.BAD_TYPE, f"{path}: integer out of 64-bit range")
        return
    if kind is str or kind is bytes:
        limit = limits.max_str_len if kind is str else limits.max_message_bytes
        if len(value) > limit:
            raise WireError(DropReason.BAD_TYPE, f"{path}: {len(value)} long, limit {limit}")
        return
    if kind is list or kind is tuple or kind is dict:
        if depth <= 0:
            raise WireError(DropReason.BAD_TYPE, f"{path}: nested deeper than allowed")
        if len(value) > limits.max_container_len:
            raise WireError(DropReason.BAD_TYPE, f"{path}: {len(value)} entries")
        if kind is dict:
            for key, item in value.items():
                if type(key) is not str:
                    raise WireError(DropReason.BAD_TYPE, f"{path}: non-string key")
                _check(key, limits, depth - 1, budget, path)
                _check(item, limits, depth - 1, budget, f"{path}.{key[:32]}")
        else:
            for i, item in enumerate(value):
                _check(item, limits, depth - 1, budget, f"{path}[{i}]")
        return
    raise WireError(DropReason.BAD_TYPE, f"{path}: {kind.__name__} is not plain data")
