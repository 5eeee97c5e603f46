"""The wire: signed message envelopes, relayed records, limits and stream framing.

Everything a node receives goes through here before a protocol sees it::

    reader = FrameReader(limits.max_message_bytes)        # per stream
    for payload in reader.feed(chunk):
        envelope = decode(payload, limits=limits, layout_check=n_params)

``decode`` is stateless; replay, round-window, rate and ban checks need per-peer state
and live in :class:`p2pfl.security.PeerGuard`. Anything refused raises ``WireError``
whose ``reason`` (a :class:`DropReason`) names the drop counter.
"""

from .envelope import Envelope, Layout, LayoutCheck, decode, encode
from .errors import DropReason, WireError
from .framing import FRAME_HEADER_BYTES, FrameReader, frame, frame_header
from .limits import DEFAULT_LIMITS, DTYPES, WireLimits
from .signed import SignedRecord, sign_record, verify_record

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
    "sign_record",
    "verify_record",
]
