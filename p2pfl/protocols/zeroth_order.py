"""Zeroth-order fine-tuning with shared randomness: one byte per peer per step.

After "Just One Byte (per gradient)" (Zelikman et al., 2023), the decentralized form of
MeZO's SPSA. Every peer starts from the same model. At step (round) ``r`` peer ``i``
draws a direction ``z_i(r) ~ N(0, I)`` from a generator seeded by ``(run seed, i, r)``,
asks its driver for the losses of ``x + eps z`` and ``x - eps z`` on one mini-batch of
its own data (``EvaluateLosses``: forward passes only), and estimates the directional
derivative ``g = (L+ - L-) / (2 eps)``. It sends only ``g``, quantized to one signed
byte, to its neighbours. Because anyone can regenerate ``z_j(r)`` from ``(seed, j, r)``,
that byte is the whole gradient: each peer applies, for every scalar it holds for the
step (its own included), ``x -= lr * w * g_j * z_j(r)`` in peer-id order, ``w = 1 /
(degree + 1)``. Peers that applied the same scalars hold the same model (on a complete
graph, the paper's all-to-all setting, that is every peer); nothing else is exchanged.

The byte: ``q = clamp(round(g / grad_scale), -127, 127)`` and ``g ~= q * grad_scale``.
A fixed, configured grid (no per-message scale, which would cost bytes and could be
abused); clipping also bounds what any one peer can move the model by per step,
``lr * w * 127 * grad_scale * |z|``. On digits a grid of 0.01 clipped few probes and
converged as fast as float32 scalars (docs/zeroth_order.md).

Missing and late scalars. A round ends when every live neighbour's scalar for it is
here, or at ``round_timeout``; the peer applies what it holds and moves on. A scalar that
comes later (up to ``LATE_ROUNDS`` steps late) is applied on arrival: the update is a
sum of terms that do not depend on the model, so the peer ends where it would have
(up to float rounding of the order; in between, its own probes were taken at a slightly
different point). Older ones are dropped and counted (``zo.dropped_stale``): that peer's
model then differs from the others' for good by that term (there is no model averaging
to heal it). A second scalar from the same peer for the same step is ignored
(``zo.duplicate``): the first one counts.

On a sparse graph a peer applies its neighbours' scalars only, so peers' models drift
apart (no averaging, no relaying): run it on a complete graph, as the paper does.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from p2pfl.protocols.base import (
    CancelTimer,
    Effect,
    EvaluateLosses,
    Event,
    LossesEvaluated,
    Message,
    MessageReceived,
    PeerDown,
    PeerId,
    PeerUp,
    Protocol,
    Record,
    RoundCompleted,
    Send,
    SendFailed,
    SetTimer,
    Start,
    TimerFired,
)
from p2pfl.protocols.contract import Int, MessageSpec, Role

__all__ = [
    "BYTE",
    "LATE_ROUNDS",
    "SCALAR",
    "ZerothOrder",
    "dequantize",
    "direction",
    "quantize",
]

#: the message kind: one step's projected gradient
SCALAR = "zo"
#: its meta field: the quantized projected gradient, a signed byte
G = "g"
#: the range of the byte
BYTE = 127
#: how many steps late a scalar may be and still be applied (also the guard's window)
LATE_ROUNDS = 4
#: how far ahead a neighbour's step may be and be kept for later (beyond: refused)
LEAD_ROUNDS = 16
ROUND_TIMER = "zo.round"

#: directions kept across all protocol objects of this process, in float32 elements: a
#: simulator's peers all regenerate the same ``n`` directions each step, so each is
#: drawn once per step instead of ``n`` times
_CACHE_BUDGET = 1 << 23
_cache: OrderedDict[tuple[int, str, int, int], torch.Tensor] = OrderedDict()
_cached_elements = 0


def _direction_seed(seed: int, peer: PeerId, step: int) -> int:
    """The generator seed of ``peer``'s direction at ``step``: a hash, the same on every
    machine (Python's ``hash`` of a string is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{peer}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def direction(seed: int, peer: PeerId, step: int, dim: int) -> torch.Tensor:
    """``z_peer(step)``: a standard normal vector of ``dim`` float32 values that every peer
    regenerates alike from ``(seed, peer, step)``. Shared: never modify it in place."""
    global _cached_elements
    key = (seed, peer, step, dim)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    generator = torch.Generator().manual_seed(_direction_seed(seed, peer, step))
    z = torch.randn(dim, generator=generator, dtype=torch.float32)
    if dim <= _CACHE_BUDGET:
        _cache[key] = z
        _cached_elements += dim
        while _cached_elements > _CACHE_BUDGET:
            _, old = _cache.popitem(last=False)
            _cached_elements -= old.numel()
    return z


def quantize(g: float, grad_scale: float) -> tuple[int, bool]:
    """``g`` as a signed byte on the grid ``grad_scale``, and whether it was clipped."""
    level = round(g / grad_scale)
    clipped = abs(level) > BYTE
    return max(-BYTE, min(BYTE, level)), clipped


def dequantize(q: int, grad_scale: float) -> float:
    return q * grad_scale


class ZerothOrder(Protocol):
    """Decentralized SPSA: probe, send one byte, replay the neighbours' perturbations."""

    name = "zeroth_order"
    #: one step's projected gradient from a neighbour: a byte, no tensor
    messages: ClassVar[Mapping[str, MessageSpec]] = {
        SCALAR: MessageSpec(
            sender=Role.NEIGHBOUR,
            tensor=False,
            fields={G: Int(lo=-BYTE, hi=BYTE)},
            required=frozenset({G}),
        ),
    }
    max_round_lead: int = LEAD_ROUNDS
    max_round_lag: ClassVar[int | None] = LATE_ROUNDS
    #: a peer applies its graph neighbours' scalars only
    needs_connected_graph: ClassVar[bool] = True

    def __init__(
        self,
        peer_id: PeerId,
        params: torch.Tensor,
        neighbours: list[PeerId],
        *,
        lr: float,
        eps: float = 1e-3,
        grad_scale: float = 0.02,
        round_timeout: float = 5.0,
        seed: int = 0,
    ) -> None:
        super().__init__(peer_id, params.detach().clone(), neighbours, seed=seed)
        for key, value in (("lr", lr), ("eps", eps), ("grad_scale", grad_scale)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {value}")
        if round_timeout <= 0:
            raise ValueError(f"round_timeout must be > 0, got {round_timeout}")
        self.lr = float(lr)
        self.eps = float(eps)
        self.grad_scale = float(grad_scale)
        self.round_timeout = float(round_timeout)
        #: each scalar's share of a step: the mean over this peer and its neighbours
        self.weight = 1.0 / (len(self.neighbours) + 1)
        self.alive: set[PeerId] = set(self.neighbours)
        self.phase = "idle"  # idle -> probing -> collecting -> (apply) -> probing ...
        #: scalars of this step and of steps ahead: step -> peer -> byte
        self.inbox: dict[int, dict[PeerId, int]] = {}
        #: who has been applied, for the last ``LATE_ROUNDS`` steps (late ones, duplicates)
        self.applied: dict[int, set[PeerId]] = {}

    # -- events ----------------------------------------------------------------------
    def handle(self, event: Event) -> list[Effect]:
        if type(event) is MessageReceived:
            return self._on_scalar(event)
        if isinstance(event, Start):
            return self._probe()
        if isinstance(event, LossesEvaluated):
            return self._on_losses(event)
        if isinstance(event, TimerFired):
            if event.name == ROUND_TIMER and self.phase == "collecting":
                return self._finish(timed_out=True)
            return []
        if isinstance(event, PeerDown | SendFailed):
            self.alive.discard(event.peer if isinstance(event, PeerDown) else event.to)
            return self._maybe_finish()
        if isinstance(event, PeerUp):
            if event.peer in self._neighbour_lookup:
                self.alive.add(event.peer)
            return []
        return []

    def _probe(self) -> list[Effect]:
        """Ask for the two perturbed losses of this step, on one batch."""
        self.phase = "probing"
        z = direction(self._seed, self.peer_id, self.round, self._model_size)
        self._next_ticket += 1
        plus = self.params + self.eps * z
        minus = self.params - self.eps * z
        return [EvaluateLosses(self._next_ticket, [plus, minus])]

    def _on_losses(self, event: LossesEvaluated) -> list[Effect]:
        if self.phase != "probing" or event.ticket != self._next_ticket:
            return []  # an answer we no longer wait for
        effects: list[Effect] = []
        if len(event.losses) == 2 and all(math.isfinite(v) for v in event.losses):
            g = (event.losses[0] - event.losses[1]) / (2 * self.eps)
            q, clipped = quantize(g, self.grad_scale)
            if clipped:
                effects.append(Record("zo.clipped", 1.0))
            effects.append(Record("train_loss", 0.5 * (event.losses[0] + event.losses[1])))
        else:  # no data (a relay) or a diverged model: contribute nothing, wait for no one
            q = 0
            effects.append(Record("zo.no_gradient", 1.0))
        self.inbox.setdefault(self.round, {})[self.peer_id] = q
        self.phase = "collecting"
        message = Message(SCALAR, self.round, None, {G: q})
        effects.extend(Send(peer, message) for peer in self.neighbours if peer in self.alive)
        effects.append(SetTimer(ROUND_TIMER, event.now + self.round_timeout))
        effects.extend(self._maybe_finish())
        return effects

    def _on_scalar(self, event: MessageReceived) -> list[Effect]:
        """A neighbour's byte (kind, sender, range and round lead checked by the contract)."""
        message, sender = event.message, event.sender
        if message.kind != SCALAR:
            return []
        step = message.round
        q = message.meta[G]
        if step < self.round:
            done = self.applied.get(step)
            if done is None:  # beyond the late window (or before this peer started)
                return [Record("zo.dropped_stale", 1.0)]
            if sender in done:
                return [Record("zo.duplicate", 1.0)]
            done.add(sender)
            self._apply(step, {sender: q})
            return [Record("zo.late_applied", 1.0)]
        held = self.inbox.setdefault(step, {})
        if sender in held:
            return [Record("zo.duplicate", 1.0)]
        held[sender] = q
        return self._maybe_finish()

    def _maybe_finish(self) -> list[Effect]:
        if self.phase != "collecting":
            return []
        if self.alive.issubset(self.inbox.get(self.round, {})):
            return self._finish(timed_out=False)
        return []

    # -- the update ----------------------------------------------------------------------
    def _apply(self, step: int, scalars: Mapping[PeerId, int]) -> None:
        """``x -= lr * w * sum_j g_j z_j(step)``, summed in peer-id order."""
        update = torch.zeros_like(self.params)
        for peer in sorted(scalars):
            q = scalars[peer]
            if q:
                z = direction(self._seed, peer, step, self._model_size)
                update.add_(z, alpha=dequantize(q, self.grad_scale))
        self.params = self.params - (self.lr * self.weight) * update

    def _finish(self, *, timed_out: bool) -> list[Effect]:
        scalars = self.inbox.pop(self.round, {})
        self._apply(self.round, scalars)
        self.applied[self.round] = set(scalars)
        finished = self.round
        self.round += 1
        for old in [s for s in self.applied if s < self.round - LATE_ROUNDS]:
            del self.applied[old]
        for old in [s for s in self.inbox if s < self.round]:
            del self.inbox[old]
        effects: list[Effect] = [
            CancelTimer(ROUND_TIMER),
            Record("received_scalars", float(len(scalars) - (self.peer_id in scalars))),
            RoundCompleted(finished),
        ]
        if timed_out:
            effects.append(Record("round_timeouts", 1.0))
        effects.extend(self._probe())
        return effects

    # -- lifecycle ------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return {"step": self.round, "phase": self.phase}

    def state_dict(self) -> dict[str, Any]:
        # taken between steps: the step restarts from its probe on resume
        state = super().state_dict()
        state["applied"] = [[step, sorted(peers)] for step, peers in sorted(self.applied.items())]
        state["alive"] = sorted(self.alive)
        state["inbox"] = [
            [step, sorted(held.items())] for step, held in sorted(self.inbox.items())
        ]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.applied = {int(step): set(peers) for step, peers in state.get("applied", [])}
        self.alive = set(state.get("alive", self.neighbours)) & self._neighbour_lookup
        self.inbox = {
            int(step): {str(peer): int(q) for peer, q in held}
            for step, held in state.get("inbox", [])
        }
        self.phase = "idle"
