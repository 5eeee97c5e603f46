"""The message types every layer shares: what a protocol sends, before any encoding.

A leaf module (it imports only torch) so that both ``p2pfl.protocols`` (which produce and
consume messages) and ``p2pfl.wire`` (which encodes them) can use it without the wire
layer importing the protocols: the dependency direction of DESIGN.md. The names are
re-exported from :mod:`p2pfl.protocols.base`, where protocol code has always found them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ENVELOPE_OVERHEAD", "Message", "PeerId"]

PeerId = str

# Bytes of an envelope around a message's tensor: ids, round, kind, signature, framing.
# Used by the simulator to count traffic; the wire codec's real size is within a few
# bytes of ``Message.nbytes()`` for every protocol message.
ENVELOPE_OVERHEAD = 160


@dataclass(slots=True, weakref_slot=True)  # weakly held by the node's SignedOnce
class Message:
    """What a protocol sends to another peer, before any wire encoding.

    ``params`` is a flat parameter vector (or ``None`` for control messages such as
    pings); ``meta`` holds small msgpack-able values (ages, views, counters).
    Inside the simulator a message carries the sender's tensor by reference: a protocol
    must never modify a received ``params`` in place.
    """

    kind: str
    round: int
    params: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: ``nbytes()`` once computed: a simulator sizes each message at every send and
    #: every arrival (a message is not changed once sent)
    _size: int = field(default=-1, init=False, repr=False, compare=False)
    #: the contract's verdict on ``params`` once checked: ``((dim, max_abs), refusal)``
    #: (a simulator delivers one message object to many peers; it is checked once)
    _verdict: tuple[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)
    #: the contract's verdict on the whole content when it depends on the message alone:
    #: ``(spec, the receiver's content_key, refusal)``
    _content: tuple[Any, Any, Any] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def nbytes(self) -> int:
        """Approximate encoded size in bytes: tensor payload + meta + envelope."""
        if self._size >= 0:
            return self._size
        size = ENVELOPE_OVERHEAD
        if self.params is not None:
            size += self.params.numel() * self.params.element_size()
        if self.meta:
            size += _meta_size(self.meta)
        self._size = size
        return size


def _meta_size(value: Any) -> int:
    # exact types first, loops not generators: every message with meta is sized once
    kind = type(value)
    if kind is int or kind is float or kind is bool:
        return 9
    if kind is str or kind is bytes:
        return len(value) + 1
    if kind is dict:
        total = 1
        for key, item in value.items():
            total += _meta_size(key) + _meta_size(item)
        return total
    if isinstance(value, list | tuple):
        total = 1
        for item in value:
            total += _meta_size(item)
        return total
    if isinstance(value, str | bytes):
        return len(value) + 1
    if isinstance(value, dict):
        return sum(_meta_size(k) + _meta_size(v) for k, v in value.items()) + 1
    return 9
