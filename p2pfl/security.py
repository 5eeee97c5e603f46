"""Per-peer accounting between the wire and a protocol: replay, rounds, rates, bans.

:func:`p2pfl.wire.decode` is stateless; what needs memory of each peer lives here.
A :class:`PeerGuard` is sans-I/O like the protocols: the driver passes ``now`` (seconds)
in and the guard never reads a clock. It keys everything by the *transport* peer (the
one Noise authenticated for the stream), not by what a message claims, so a forger can
neither spend someone else's rate budget nor get someone else banned.

Sequence numbers and restarts: a sender numbers its messages with
:class:`SequenceNumbers`, ``seq = start_ms << 20 | counter`` where ``start_ms`` is the
wall-clock millisecond the sender (re)started. A restarted sender therefore begins
above everything it sent before and receivers accept it without any state of their
own being reset, provided its clock did not step back across the restart. Receivers
remember, per sender, the highest ``seq`` and which of the ``replay_window`` numbers
below it were seen (messages travel on separate streams, so they may arrive out of
order); anything older than the window is refused as a replay.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from p2pfl.protocols.base import PeerId
from p2pfl.wire import (
    DEFAULT_LIMITS,
    DropReason,
    Envelope,
    LayoutCheck,
    WireError,
    WireLimits,
    decode,
)

__all__ = ["Ban", "GuardConfig", "PeerGuard", "SequenceNumbers"]


class SequenceNumbers:
    """Sender-side sequence numbers that keep increasing across restarts.

    ``now`` is wall-clock seconds (``time.time()``) at start. The low 20 bits count
    messages; when they run out (a million messages) the epoch moves on by one
    millisecond, so numbers stay unique and increasing however fast the sender is.
    44 bits of milliseconds last until the year 2527.
    """

    COUNTER_BITS = 20

    def __init__(self, now: float) -> None:
        if now < 0:
            raise ValueError("now is seconds since the Unix epoch")
        self._epoch = int(now * 1000)
        self._counter = 0

    def next(self) -> int:
        if self._counter >> self.COUNTER_BITS:
            self._epoch += 1
            self._counter = 0
        seq = self._epoch << self.COUNTER_BITS | self._counter
        self._counter += 1
        return seq


_DEFAULT_PENALTIES: Mapping[DropReason, float] = MappingProxyType(
    {
        DropReason.OVERSIZED: 4.0,
        DropReason.TRUNCATED: 1.0,  # an honest sender's timed-out send ends like this too
        DropReason.MALFORMED: 4.0,
        DropReason.BAD_TYPE: 4.0,
        DropReason.BAD_TENSOR: 4.0,
        DropReason.NON_FINITE: 4.0,
        DropReason.BAD_SIGNATURE: 5.0,
        DropReason.UNKNOWN_SENDER: 5.0,
        DropReason.UNKNOWN_KIND: 2.0,
        # a peer whose view of roles differs (a neighbour set, a MoDeST sample) is not
        # hostile; one that keeps sending where it has no role is, eventually
        DropReason.NOT_ALLOWED: 0.5,
        DropReason.BAD_FIELD: 4.0,
        DropReason.TOO_LARGE: 4.0,
        DropReason.REPLAY: 1.0,  # an honest retry can repeat a message
        DropReason.FUTURE_ROUND: 0.5,
        DropReason.RATE_LIMITED: 0.5,
        DropReason.STALE_ROUND: 0.0,  # slow peers are not hostile
        DropReason.BANNED: 0.0,
    }
)


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Tuning of :class:`PeerGuard`. Rates are per peer; times are seconds.

    ``byte_burst`` must be at least the largest legitimate message, or that message can
    never pass. ``max_lag`` / ``max_lead`` of ``None`` disable that side of the round
    window; messages of the protocols named in ``unrounded`` (e.g. a node's own peer
    exchange, which belongs to no round) skip it. A peer whose misbehaviour score (sum of ``penalties``, halving every
    ``score_half_life``) reaches ``ban_threshold`` is banned for ``ban_seconds``,
    doubling with each further ban up to ``max_ban_seconds``.
    """

    max_lag: int | None = 4
    max_lead: int | None = 4
    replay_window: int = 1024
    # Honest round-based peers send about one message per neighbour per round, and a small
    # model trains at over 20 rounds/s: 20/s (the former default) rate-limited two honest
    # digits peers within 300 rounds and cost them a round timeout each time.
    msg_rate: float = 100.0
    msg_burst: float = 200.0
    byte_rate: float = 64e6
    byte_burst: float = float(2 * DEFAULT_LIMITS.max_message_bytes)
    ban_threshold: float = 10.0
    score_half_life: float = 60.0
    ban_seconds: float = 60.0
    max_ban_seconds: float = 3600.0
    penalties: Mapping[DropReason, float] = field(default_factory=lambda: _DEFAULT_PENALTIES)
    max_peers: int = 10_000  # peers tracked; the least recently seen are forgotten
    unrounded: frozenset[str] = frozenset()
    status_peers: int = 100  # peers listed in ``status()``: banned and worst-scored first

    def summary(self) -> dict[str, Any]:
        """The limits in force, JSON-ready (part of the node's status)."""
        return {
            "max_lag": self.max_lag,
            "max_lead": self.max_lead,
            "replay_window": self.replay_window,
            "msg_rate": self.msg_rate,
            "msg_burst": self.msg_burst,
            "byte_rate": self.byte_rate,
            "byte_burst": self.byte_burst,
            "ban_threshold": self.ban_threshold,
            "score_half_life": self.score_half_life,
            "ban_seconds": self.ban_seconds,
            "max_ban_seconds": self.max_ban_seconds,
            "penalties": {r.value: p for r, p in self.penalties.items() if p},
        }


@dataclass(frozen=True, slots=True)
class Ban:
    """A peer was just banned: what :class:`PeerGuard` hands its ``on_ban`` callback."""

    peer: PeerId
    until: float  # on the guard's clock (the ``now`` values it is given)
    seconds: float
    count: int  # this peer's bans so far, this one included
    reason: DropReason  # the drop that tipped the score over the threshold
    drops: Mapping[str, int]  # the peer's drops by reason so far

    def describe(self) -> str:
        """One line for a log: who, for how long, and why."""
        tally = ", ".join(f"{n} {r}" for r, n in sorted(self.drops.items(), key=lambda x: -x[1]))
        nth = "" if self.count == 1 else f" (ban #{self.count})"
        return (
            f"banned peer {self.peer} for {self.seconds:.0f} s{nth} after {self.reason.value}; "
            f"dropped so far: {tally}"
        )


@dataclass(slots=True)
class _Peer:
    peer: PeerId
    msg_tokens: float
    byte_tokens: float
    last_refill: float
    score: float = 0.0
    score_at: float = 0.0
    banned_until: float = -math.inf
    bans: int = 0
    top_seq: int = -1  # highest sequence number accepted
    seen: int = 0  # bit i set: top_seq - i was accepted
    accepted: int = 0
    drops: Counter[DropReason] = field(default_factory=Counter)
    last_drop: str = ""


class PeerGuard:
    """Decides, per peer, whether an incoming message may reach the protocol.

    Use :meth:`screen` for the whole pipeline, or the steps it is made of:
    :meth:`check_bytes` (ban, rate) before decoding, :meth:`record_drop` for a decode
    failure, :meth:`check_envelope` (sender, replay, round window) after. Every refusal
    raises ``WireError`` and has already been counted when it does.
    """

    def __init__(
        self, config: GuardConfig | None = None, *, on_ban: Callable[[Ban], None] | None = None
    ) -> None:
        self.config = config or GuardConfig()
        #: called (synchronously, inside the refusing call) each time a peer gets banned
        self.on_ban = on_ban
        self._peers: OrderedDict[PeerId, _Peer] = OrderedDict()
        self._drops: Counter[DropReason] = Counter()
        self._accepted = 0
        self._bans = 0
        self._now = 0.0

    # -- the pipeline -----------------------------------------------------------------
    def screen(
        self,
        peer: PeerId,
        data: bytes | bytearray | memoryview,
        *,
        now: float,
        current_round: int,
        limits: WireLimits = DEFAULT_LIMITS,
        layout_check: LayoutCheck | None = None,
        max_bytes: int | None = None,
        known_kind: Callable[[str, str], bool] | None = None,
    ) -> Envelope:
        """Check, decode and admit ``data`` received from ``peer``; ``WireError`` if dropped.

        ``max_bytes``: the largest message the receiver can have a use for (its model's
        size in the widest codec, plus meta); a larger one is refused as ``too_large``
        before it is decoded, and charged as such: message size alone must cost a
        sender its standing, not only its rate budget.  ``known_kind(protocol, kind)``:
        whether the receiver takes such messages at all; others are refused (and
        charged) as ``unknown_kind`` whatever the receiver's state.
        """
        self.check_bytes(peer, len(data), now=now)
        if max_bytes is not None and len(data) > max_bytes:
            self._drop(self._touch(peer, now), DropReason.OVERSIZED, now,
                       f"{len(data)} bytes, at most {max_bytes} expected")  # fmt: skip
        try:
            envelope = decode(data, limits=limits, layout_check=layout_check)
        except WireError as exc:
            self.record_drop(peer, exc.reason, now=now, detail=exc.detail)
            raise
        self.check_envelope(peer, envelope, now=now, current_round=current_round)
        if known_kind is not None and not known_kind(envelope.protocol, envelope.message.kind):
            detail = f"{envelope.protocol}.{envelope.message.kind}"
            self._drop(self._touch(peer, now), DropReason.UNKNOWN_KIND, now, detail[:80])
        return envelope

    def check_bytes(self, peer: PeerId, nbytes: int, *, now: float) -> None:
        """Refuse a banned peer, or one over its message or byte rate; else spend tokens."""
        state = self._touch(peer, now)
        if now < state.banned_until:
            self._drop(state, DropReason.BANNED, now, f"until {state.banned_until:.1f}")
        cfg = self.config
        elapsed = max(0.0, now - state.last_refill)
        state.last_refill = max(state.last_refill, now)
        state.msg_tokens = min(cfg.msg_burst, state.msg_tokens + elapsed * cfg.msg_rate)
        state.byte_tokens = min(cfg.byte_burst, state.byte_tokens + elapsed * cfg.byte_rate)
        if state.msg_tokens < 1.0 or state.byte_tokens < nbytes:
            self._drop(state, DropReason.RATE_LIMITED, now, f"{nbytes} bytes")
        state.msg_tokens -= 1.0
        state.byte_tokens -= nbytes

    def check_envelope(
        self, peer: PeerId, envelope: Envelope, *, now: float, current_round: int
    ) -> None:
        """Admit a decoded message: sent by ``peer`` itself, new, and in the round window."""
        state = self._touch(peer, now)
        if envelope.sender != peer:
            self._drop(state, DropReason.UNKNOWN_SENDER, now, f"signed by {envelope.sender}")
        seq, window = envelope.seq, self.config.replay_window
        behind = state.top_seq - seq
        if behind >= window or (behind >= 0 and (state.seen >> behind) & 1):
            self._drop(state, DropReason.REPLAY, now, f"seq {seq}")
        cfg = self.config
        windowed = envelope.protocol not in cfg.unrounded
        if windowed and cfg.max_lag is not None and envelope.round < current_round - cfg.max_lag:
            self._drop(state, DropReason.STALE_ROUND, now, f"round {envelope.round}")
        if windowed and cfg.max_lead is not None and envelope.round > current_round + cfg.max_lead:
            self._drop(state, DropReason.FUTURE_ROUND, now, f"round {envelope.round}")
        if behind < 0:  # a new highest number: slide the window (never shift by 2**64)
            shift = -behind
            mask = (1 << window) - 1
            state.seen = ((state.seen << shift) | 1) & mask if shift < window else 1
            state.top_seq = seq
        else:
            state.seen |= 1 << behind
        state.accepted += 1
        self._accepted += 1

    def record_drop(
        self, peer: PeerId, reason: DropReason, *, now: float, detail: str = ""
    ) -> None:
        """Count a drop decided elsewhere (e.g. a decode failure) against ``peer``."""
        self._count(self._touch(peer, now), reason, now, detail)

    # -- queries ----------------------------------------------------------------------
    def is_banned(self, peer: PeerId, now: float) -> bool:
        state = self._peers.get(peer)
        return state is not None and now < state.banned_until

    def score(self, peer: PeerId, now: float) -> float:
        """The peer's current misbehaviour score (decayed to ``now``)."""
        state = self._peers.get(peer)
        return 0.0 if state is None else self._decayed(state, now)

    def drops(self, peer: PeerId | None = None) -> dict[str, int]:
        """Drop counts by reason, of one peer or of all."""
        counts = self._drops if peer is None else self._peers[peer].drops
        return {reason.value: counts[reason] for reason in DropReason}

    def status(self) -> dict[str, Any]:
        """JSON-ready summary for the node's status (bans judged at the latest ``now``).

        ``dropped`` counts every drop by reason (``rate_limited`` and ``banned`` included),
        ``bans`` the bans ever imposed, ``banned`` the peers serving one now, ``limits``
        the rates and thresholds in force. ``peers`` details at most
        ``config.status_peers`` of the ``peers_tracked`` peers: banned ones first, then
        the worst scores, then the most recently seen.
        """
        now = self._now
        listed = list(self._peers.items())
        if len(listed) > self.config.status_peers:
            ranked = heapq.nlargest(
                self.config.status_peers,
                enumerate(listed),
                key=lambda item: (
                    now < item[1][1].banned_until,
                    self._decayed(item[1][1], now),
                    item[0],
                ),
            )
            listed = [entry for _, entry in ranked]
        return {
            "accepted": self._accepted,
            "dropped": self.drops(),
            "bans": self._bans,
            "banned": sorted(p for p, s in self._peers.items() if now < s.banned_until),
            "limits": self.config.summary(),
            "peers_tracked": len(self._peers),
            "peers": {
                peer: {
                    "accepted": s.accepted,
                    "dropped": {r.value: n for r, n in s.drops.items() if n},
                    "score": round(self._decayed(s, now), 3),
                    "banned_until": s.banned_until if now < s.banned_until else None,
                    "bans": s.bans,
                    "last_drop": s.last_drop,
                }
                for peer, s in listed
            },
        }

    # -- internals --------------------------------------------------------------------
    def _touch(self, peer: PeerId, now: float) -> _Peer:
        self._now = max(self._now, now)
        state = self._peers.get(peer)
        if state is None:
            cfg = self.config
            state = _Peer(peer, cfg.msg_burst, cfg.byte_burst, now, score_at=now)
            self._peers[peer] = state
            if len(self._peers) > cfg.max_peers:
                self._forget_one()
        else:
            self._peers.move_to_end(peer)
        return state

    def _forget_one(self) -> None:
        # the least recently seen peer not serving a ban (a Sybil flood must not unban)
        for peer, state in self._peers.items():
            if self._now >= state.banned_until:
                del self._peers[peer]
                return
        self._peers.popitem(last=False)

    def _decayed(self, state: _Peer, now: float) -> float:
        elapsed = max(0.0, now - state.score_at)
        return state.score * 0.5 ** (elapsed / self.config.score_half_life)

    def _drop(self, state: _Peer, reason: DropReason, now: float, detail: str) -> None:
        self._count(state, reason, now, detail)
        raise WireError(reason, detail)

    def _count(self, state: _Peer, reason: DropReason, now: float, detail: str) -> None:
        self._drops[reason] += 1
        state.drops[reason] += 1
        state.last_drop = f"{reason.value}: {detail}" if detail else reason.value
        cfg = self.config
        penalty = cfg.penalties.get(reason, 0.0)
        # a ban already running is not extended by what the peer had in flight when it
        # began (frames its transport cut afterwards): one ban per burst of misbehaviour
        if penalty and now >= state.banned_until:
            state.score = self._decayed(state, now) + penalty
            state.score_at = max(state.score_at, now)
            if state.score >= cfg.ban_threshold:
                duration = min(cfg.max_ban_seconds, cfg.ban_seconds * 2.0 ** min(state.bans, 32))
                state.banned_until = now + duration
                state.bans += 1
                state.score = 0.0
                self._bans += 1
                if self.on_ban is not None:
                    drops = {r.value: n for r, n in state.drops.items() if n}
                    ban = Ban(state.peer, state.banned_until, duration, state.bans,
                              reason, MappingProxyType(drops))  # fmt: skip
                    self.on_ban(ban)
