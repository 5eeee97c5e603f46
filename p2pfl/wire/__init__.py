"""The wire: signed message envelopes, relayed records, limits and stream framing.

Everything a node receives goes through here before a protocol sees it::

    reader = FrameReader(limits.max_message_bytes)        # per stream
    for payload in reader.feed(chunk):
        envelope = decode(payload, limits=limits, layout_check=n_params)

``decode`` is stateless; replay, round-window, rate and ban checks need per-peer state
and live in :class:`p2pfl.security.PeerGuard`. Anything refused raises ``WireError``
whose ``reason`` (a :class:`DropReason`) names the drop counter.

Names load on first use (PEP 562), so a module that needs only the framing (the libp2p
transport) does not load torch and the codecs with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from topologies.lazy import lazy_exports

_EXPORTS = {
    "Envelope": "p2pfl.wire.envelope",
    "Layout": "p2pfl.wire.envelope",
    "LayoutCheck": "p2pfl.wire.envelope",
    "decode": "p2pfl.wire.envelope",
    "encode": "p2pfl.wire.envelope",
    "DropReason": "p2pfl.wire.errors",
    "WireError": "p2pfl.wire.errors",
    "FRAME_HEADER_BYTES": "p2pfl.wire.framing",
    "FrameReader": "p2pfl.wire.framing",
    "frame": "p2pfl.wire.framing",
    "frame_header": "p2pfl.wire.framing",
    "frame_length": "p2pfl.wire.framing",
    "DEFAULT_LIMITS": "p2pfl.wire.limits",
    "DTYPES": "p2pfl.wire.limits",
    "WireLimits": "p2pfl.wire.limits",
    "SignedRecord": "p2pfl.wire.signed",
    "sign_record": "p2pfl.wire.signed",
    "verify_record": "p2pfl.wire.signed",
}

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "FRAME_HEADER_BYTES",
    "DropReason",
    "Envelope",
    "FrameReader",
    "Layout",
    "LayoutCheck",
    "SignedRecord",
    "WireError",
    "WireLimits",
    "decode",
    "encode",
    "frame",
    "frame_header",
    "frame_length",
    "sign_record",
    "verify_record",
]

if TYPE_CHECKING:
    from .envelope import Envelope, Layout, LayoutCheck, decode, encode
    from .errors import DropReason, WireError
    from .framing import FRAME_HEADER_BYTES, FrameReader, frame, frame_header, frame_length
    from .limits import DEFAULT_LIMITS, DTYPES, WireLimits
    from .signed import SignedRecord, sign_record, verify_record


if not TYPE_CHECKING:  # a type checker reads the imports above (and so catches a typo)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
