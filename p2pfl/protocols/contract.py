"""The message contract: what a protocol accepts from the network, declared per kind.

A protocol acts on the fields of the messages it receives. A peer that is not honest
chooses those fields, so each protocol *declares*, per message kind, what it accepts:

- who may send it (a :class:`Role`: anyone, a neighbour, a member of the view, the
  aggregator of the message's round, ...), answered by the protocol's ``has_role``;
- the meta fields, each with a type and a range (:class:`Field` and its kinds), which of
  them are required, and no others;
- whether a tensor comes with it; if so it must be float32, of exactly the shape
  ``(protocol.message_dim,)``, and every entry within ``protocol.max_abs`` (which also
  refuses NaN and Inf: a float64 ``1e300`` is finite but turns into Inf in float32);
- how far ahead of the receiver's round the message's round, and every field declared a
  :class:`RoundNumber`, may be (``protocol.max_round_lead``).

:func:`check_message` applies the declaration. Both drivers call it (through
``Protocol.screen``) before the protocol sees a message, drop what it refuses and count
the refusal by its :class:`Refusal` reason, so the protocols' own code can trust types,
shapes and ranges. What a declaration cannot express (a view entry's signature, whether a
round tag is corroborated) stays the protocol's own check.

The tensor part of a verdict is cached on the :class:`~p2pfl.protocols.base.Message`: a
simulator delivers one message object to every neighbour, and it is checked once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from p2pfl.protocols.base import Message, PeerId, Protocol

__all__ = [
    "ANYONE",
    "DEFAULT_MAX_ABS",
    "DEFAULT_ROUND_LEAD",
    "MEMBER",
    "NEIGHBOUR",
    "Bool",
    "Bytes",
    "Field",
    "Float",
    "Int",
    "ListOf",
    "MapOf",
    "MessageSpec",
    "PeerName",
    "Refusal",
    "Role",
    "RoundNumber",
    "Tuple",
    "check_message",
]

#: how far ahead of the receiver's round a round number may be, by default: a restarted
#: or rarely sampled peer legitimately learns of rounds well ahead of its own
DEFAULT_ROUND_LEAD = 1000
#: the default bound on the magnitude of a received parameter: far above what training
#: produces, far below what overflows a float32 sum of thousands of models
DEFAULT_MAX_ABS = 1e6


class Refusal(StrEnum):
    """Why a message was refused by the contract; also the keys of the refusal counters.

    The values are also :class:`p2pfl.wire.DropReason` values, so a node counts them with
    the wire's drops and charges them to the sender.
    """

    UNKNOWN_KIND = "unknown_kind"  # the protocol declares no such message kind
    NOT_ALLOWED = "not_allowed"  # the sender has no role that may send this kind
    BAD_FIELD = "bad_field"  # a meta field missing, unknown, of the wrong type or range
    BAD_TENSOR = "bad_tensor"  # tensor missing or unexpected, not float32, wrong shape
    TOO_LARGE = "too_large"  # a tensor entry beyond the magnitude bound, NaN or Inf
    FUTURE_ROUND = "future_round"  # a round number (tag or field) too far ahead


class Role(StrEnum):
    """Who may send a message kind. A protocol answers for the roles it declares."""

    ANYONE = "anyone"  # any authenticated peer (a node's transport proved who it is)
    NEIGHBOUR = "neighbour"  # one of the protocol's current neighbours
    MEMBER = "member"  # a member of the protocol's population view (not left)
    AGGREGATOR = "aggregator"  # a peer that may aggregate the message's round
    SAMPLED = "sampled"  # a peer that may be in the sample of the message's round


ANYONE, NEIGHBOUR, MEMBER = Role.ANYONE, Role.NEIGHBOUR, Role.MEMBER


_NEIGHBOUR = Role.NEIGHBOUR
_F32 = torch.float32
_PLAIN = torch._C.DisableTorchFunctionSubclass
#: a precomputed bound this far inside ``max_abs`` needs no scan, whatever its rounding
_SURE = 1.0 - 2.0**-10

# ---------------------------------------------------------------- field kinds


class Field:
    """A meta field's type and range; ``accepts`` never raises, whatever the value.

    ``relative``: whether the verdict depends on the receiving protocol (a round bounded
    by its round, a map bounded by one of its attributes), not on the value alone.
    """

    relative: bool = False

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Int(Field):
    """An int (not a bool) in ``[lo, hi]``."""

    lo: int = 0
    hi: int = (1 << 63) - 1

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        if type(value) is int and self.lo <= value <= self.hi:
            return None
        return Refusal.BAD_FIELD


@dataclass(frozen=True, slots=True)
class RoundNumber(Field):
    """A round number: an int ``>= 0``, at most ``max_round_lead`` ahead of the receiver."""

    relative = True

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        if type(value) is not int or value < 0:
            return Refusal.BAD_FIELD
        if value > protocol.round + protocol.max_round_lead:
            return Refusal.FUTURE_ROUND
        return None


@dataclass(frozen=True, slots=True)
class Float(Field):
    """A finite number (int or float, not bool) in ``[lo, hi]``."""

    lo: float = -math.inf
    hi: float = math.inf

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        kind = type(value)
        if (kind is float or kind is int) and math.isfinite(value) and self.lo <= value <= self.hi:
            return None
        return Refusal.BAD_FIELD


@dataclass(frozen=True, slots=True)
class Bool(Field):
    """``True`` or ``False``; with ``as_int``, also ``0`` or ``1``."""

    as_int: bool = False

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        if type(value) is bool or (self.as_int and type(value) is int and value in (0, 1)):
            return None
        return Refusal.BAD_FIELD


@dataclass(frozen=True, slots=True)
class Bytes(Field):
    """A byte string of at most ``max_len`` bytes."""

    max_len: int

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        if type(value) is bytes and len(value) <= self.max_len:
            return None
        return Refusal.BAD_FIELD


@dataclass(frozen=True, slots=True)
class PeerName(Field):
    """A peer id: a non-empty string of at most ``max_len`` characters."""

    max_len: int = 128

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        if type(value) is str and 0 < len(value) <= self.max_len:
            return None
        return Refusal.BAD_FIELD


@dataclass(frozen=True, slots=True)
class Tuple(Field):
    """A list whose first items match ``items`` in order; the last ``optional`` may be absent."""

    items: tuple[Field, ...]
    optional: int = 0

    @property
    def relative(self) -> bool:  # type: ignore[override]
        return any(item.relative for item in self.items)

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        if type(value) is not list and type(value) is not tuple:
            return Refusal.BAD_FIELD
        if not len(self.items) - self.optional <= len(value) <= len(self.items):
            return Refusal.BAD_FIELD
        for item, spec in zip(value, self.items, strict=False):
            refusal = spec.accepts(item, protocol)
            if refusal is not None:
                return refusal
        return None


@dataclass(frozen=True, slots=True)
class ListOf(Field):
    """A list of at most ``max_len`` items, each matching ``item``."""

    item: Field
    max_len: int

    @property
    def relative(self) -> bool:  # type: ignore[override]
        return self.item.relative

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        if (type(value) is not list and type(value) is not tuple) or len(value) > self.max_len:
            return Refusal.BAD_FIELD
        for item in value:
            refusal = self.item.accepts(item, protocol)
            if refusal is not None:
                return refusal
        return None


@dataclass(frozen=True, slots=True)
class MapOf(Field):
    """A map of at most ``max_len`` entries (``max_len`` may name a protocol attribute)."""

    key: Field
    value: Field
    max_len: int | str

    @property
    def relative(self) -> bool:  # type: ignore[override]
        return isinstance(self.max_len, str) or self.key.relative or self.value.relative

    def accepts(self, value: Any, protocol: Protocol) -> Refusal | None:
        limit = self.max_len if isinstance(self.max_len, int) else getattr(protocol, self.max_len)
        if type(value) is not dict or len(value) > limit:
            return Refusal.BAD_FIELD
        key_spec, value_spec = self.key, self.value
        for key, item in value.items():
            refusal = key_spec.accepts(key, protocol) or value_spec.accepts(item, protocol)
            if refusal is not None:
                return refusal
        return None


# ---------------------------------------------------------------- message kinds


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """What one message kind may carry, and who may send it.

    ``tensor``: ``True`` a tensor is required, ``False`` none may come. ``fields`` are
    the meta keys accepted (no others); ``required`` those that must be there.
    ``accumulates``: the tensor is a sum over the sender's rounds (a history), bounded by
    ``max_abs * (round + 1)`` instead of ``max_abs``.
    """

    sender: Role = Role.ANYONE
    tensor: bool = False
    accumulates: bool = False
    fields: Mapping[str, Field] = field(default_factory=dict)
    required: frozenset[str] = frozenset()

    #: whether a message's fields and tensor are judged by themselves alone (no field
    #: bounded by the receiver): then one verdict on a message object holds for every
    #: receiver of the same model size and bound (set from the fields)
    absolute: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        missing = self.required - self.fields.keys()
        if missing:
            raise ValueError(f"required fields {sorted(missing)} are not declared")
        relative = self.accumulates or any(f.relative for f in self.fields.values())
        object.__setattr__(self, "absolute", not relative)


def check_message(protocol: Protocol, sender: PeerId, message: Message) -> Refusal | None:
    """Apply ``protocol``'s declaration to a received ``message``; ``None`` if accepted.

    Cheap checks first (kind, round, sender), the tensor last (and once per message
    object). Never raises for any message content. A simulator runs this for every
    message every peer receives, hence the inlined neighbour check and the cached verdict.
    """
    spec = protocol.messages.get(message.kind)
    if spec is None:
        return Refusal.UNKNOWN_KIND
    round_ = message.round
    if type(round_) is not int or round_ < 0:
        return Refusal.BAD_FIELD
    if round_ > protocol.round + protocol.max_round_lead:
        return Refusal.FUTURE_ROUND
    role = spec.sender
    if role is _NEIGHBOUR:  # the base's own role, never redefined: no call
        if sender not in protocol._neighbour_lookup:
            return Refusal.NOT_ALLOWED
    elif not protocol.has_role(role, sender, message):
        return Refusal.NOT_ALLOWED
    if spec.absolute:  # the content's verdict is the message's own: judged once
        key = protocol._content_key or protocol.content_key  # set once, then read
        cached = message._content  # (spec, key, verdict); compared without allocating
        if cached is not None and cached[0] is spec and cached[1] == key:
            return cached[2]
        verdict = _content_verdict(protocol, spec, message, round_)
        message._content = (spec, key, verdict)
        return verdict
    return _content_verdict(protocol, spec, message, round_)


def _content_verdict(
    protocol: Protocol, spec: MessageSpec, message: Message, round_: int
) -> Refusal | None:
    """The meta fields and the tensor of ``message`` against ``spec``."""
    meta = message.meta
    if type(meta) is not dict:
        return Refusal.BAD_FIELD
    if meta or spec.required:
        fields = spec.fields
        for key, value in meta.items():
            kind = fields.get(key)
            if kind is None:
                return Refusal.BAD_FIELD
            refusal = kind.accepts(value, protocol)
            if refusal is not None:
                return refusal
        if not spec.required <= meta.keys():
            return Refusal.BAD_FIELD
    params = message.params
    if not spec.tensor:
        return None if params is None else Refusal.BAD_TENSOR
    if params is None:
        return Refusal.BAD_TENSOR
    bound = protocol.max_abs * (round_ + 1) if spec.accumulates else protocol.max_abs
    return _check_tensor(message, params, protocol.message_dim, bound)


def _check_tensor(message: Message, params: Any, dim: int, max_abs: float) -> Refusal | None:
    key = (dim, max_abs)
    cached = message._verdict
    if cached is not None and cached[0] == key:
        return cached[1]
    verdict = _tensor_verdict(params, dim, max_abs)
    message._verdict = (key, verdict)
    return verdict


def _tensor_verdict(params: Any, dim: int, max_abs: float) -> Refusal | None:
    if not isinstance(params, torch.Tensor):
        return Refusal.BAD_TENSOR
    # A driver that produced the tensor in a batch may have bounded its values there (the
    # simulator's training rows carry their L2 norm, which no entry's magnitude exceeds):
    # well inside the bound, no scan is needed; anywhere near it, the values are scanned.
    bound = getattr(params, "abs_bound", None)
    # Read as a plain tensor: a subclass's dispatch (the simulator's arena rows, which
    # hold real values) costs more than these checks, and more than the scan itself.
    with _PLAIN():
        if params.dtype is not _F32 or params.dim() != 1 or params.shape[0] != dim:
            return Refusal.BAD_TENSOR
        if dim == 0 or (bound is not None and bound <= max_abs * _SURE):
            return None  # (NaN and Inf make the bound NaN or Inf: scanned)
        low, high = torch.aminmax(params)
    # NaN fails both comparisons; Inf the bound
    if not (-max_abs <= float(low) and float(high) <= max_abs):
        return Refusal.TOO_LARGE
    return None
