"""Why a message was dropped: one error type for everything the wire refuses."""

from __future__ import annotations

from enum import StrEnum

from p2pfl.errors import P2PFLError

__all__ = ["DropReason", "WireError"]


class DropReason(StrEnum):
    """The reasons a node drops incoming data; also the keys of its drop counters.

    The first group is raised by the stateless codec (:func:`p2pfl.wire.decode`), the
    second is the receiving protocol's contract (:class:`p2pfl.protocols.contract.Refusal`
    has the same values; ``bad_tensor`` and ``future_round`` are shared), the third the
    per-peer accounting (:class:`p2pfl.security.PeerGuard`).
    """

    OVERSIZED = "oversized"  # bigger than the configured cap (checked before allocating)
    TRUNCATED = "truncated"  # a transport frame cut short, reset or stalled mid-way
    MALFORMED = "malformed"  # not our framing / msgpack layout, unknown keys, bad version
    BAD_TYPE = "bad_type"  # a known field with a value of the wrong type or range
    BAD_TENSOR = "bad_tensor"  # dtype, shape, layout, codec payload or byte count wrong
    NON_FINITE = "non_finite"  # tensor holds NaN or Inf
    BAD_SIGNATURE = "bad_signature"  # signature does not verify against the sender id
    UNKNOWN_SENDER = "unknown_sender"  # sender id carries no Ed25519 key / is not the peer

    # refused by the receiving protocol's message contract (p2pfl.protocols.contract)
    UNKNOWN_KIND = "unknown_kind"  # a message kind the protocol does not declare
    NOT_ALLOWED = "not_allowed"  # the sender has no role that may send this kind
    BAD_FIELD = "bad_field"  # a meta field missing, unknown, of the wrong type or range
    TOO_LARGE = "too_large"  # a tensor entry beyond the protocol's magnitude bound

    REPLAY = "replay"  # sequence number already seen (or too old to tell)
    STALE_ROUND = "stale_round"  # round older than current - max_lag
    FUTURE_ROUND = "future_round"  # round newer than current + max_lead
    RATE_LIMITED = "rate_limited"  # peer over its message or byte budget
    BANNED = "banned"  # peer is serving a ban for earlier misbehaviour


class WireError(P2PFLError):
    """Raised for any input the wire refuses; ``reason`` says which counter to bump."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
