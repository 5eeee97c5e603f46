"""A Byzantine peer as a wrapper around an honest protocol object.

The wrapper is itself a sans-I/O protocol: a driver (the simulator, or a node started
with an attack) feeds it events and carries out its effects, exactly as for an honest
peer. It forwards every event to the wrapped protocol, which keeps running its rounds,
timers and training as usual, and rewrites what comes out:

- ``Send`` effects carrying a model (kinds in ``model_kinds``) get the attack's crafted
  vector instead (model attacks), or the colluding group's shared vector (Sybil
  identities). Data attacks need no rewriting: the driver poisons the peer's training
  batches and the protocol sends what it trained on them.
- With ``delay > 0`` the crafted messages leave ``delay`` seconds after the protocol asked
  to send them: a *rushing* adversary, that first sees the honest models of the round.
- With ``isolate``, every model the peer receives is replaced by its own last outgoing
  vector before the protocol sees it: the protocol still closes its rounds on time, but
  the attacker's model is never pulled toward the honest ones (a label flipper then
  keeps a purely poisoned model).
- The attack's ``schedule`` (:mod:`p2pfl.attacks.schedule`) says in which rounds all of
  the above happens. In the other rounds the peer is honest: its models go out as the
  protocol made them, at once, it hears what it is sent, and (the wrapper tells the
  attack's gate the round each training is for) its batches are not poisoned.

What the attacker knows of the honest models (ALIE, IPM) follows the attack's
``knowledge`` parameter (:attr:`p2pfl.attacks.Attack.knowledge`):

- ``"received"`` (the default): the models the peer itself received, in messages that
  carry a model, from peers other than its ``allies`` (the colluding Byzantine peers, whose
  models are not honest ones): those of the round it crafts for when it has received any,
  else those of the round before. That is all a real node can know, so both drivers run
  it through this same code (the wrapper records what it hears).
- ``"omniscient"`` (the papers' set-up): every honest model of the round, from
  ``knowledge``, a callable ``round -> (m, d) stack | None`` that a driver seeing all
  messages supplies (the simulator); a wrapper asked for it without one refuses to start.

Knowing none yet, IPM reverses its own update and ALIE sends its own model.

Models of the message space: ``ctx.own`` is what the protocol wanted to send, and
``ctx.reference`` the model its last ``Train`` effect started from, mapped into the
message space by the protocol's ``message_params`` (Bristle exchanges only the output
layer).

The wrapper is a :class:`~p2pfl.protocols.base.Protocol` and delegates the whole contract
explicitly (identity, model, round, neighbours, message contract, lifecycle), so a driver
handles it as any protocol, without knowing it is one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from p2pfl.attacks.registry import Attack, ModelAttackContext
from p2pfl.protocols.base import (
    Effect,
    Event,
    Message,
    MessageReceived,
    PeerId,
    Protocol,
    Send,
    SetTimer,
    TimerFired,
    Train,
)
from p2pfl.protocols.wrapper import ProtocolWrapper

#: message kinds that carry a model in the built-in protocols (modest: train, aggregate;
#: fedavg: a client's update -- a Byzantine server's global model is not rewritten)
MODEL_KINDS = frozenset({"model", "train", "aggregate", "update"})
#: the wrapper's own timer (never shown to the wrapped protocol)
DELAY_TIMER = "byzantine.delay"

Knowledge = Callable[[int], Tensor | None]


@dataclass
class Collusion:
    """Vectors shared by colluding identities: the first one crafted each round wins.

    Every identity of a Sybil adversary asks :meth:`shared` for the round's vector; the
    first to ask registers its own, the others get the same tensor back, so they all send
    identical updates (plus each identity's ``jitter`` noise, when the group asks for it).
    Only the latest ``keep`` rounds are remembered.
    """

    keep: int = 2
    _vectors: dict[int, Tensor] = field(default_factory=dict)

    def shared(self, round_: int, vector: Tensor) -> Tensor:
        if round_ not in self._vectors:
            self._vectors[round_] = vector
            for old in sorted(self._vectors)[: -self.keep]:
                del self._vectors[old]
        return self._vectors[round_]


def needs_wrapper(attack: Attack, *, isolate: bool = False, colluding: bool = False) -> bool:
    """Whether a peer carrying out ``attack`` runs inside a :class:`ByzantineProtocol`.

    It does when it rewrites what it sends (model attacks, colluding Sybil identities) or
    what it hears (``isolate``). A data attack alone needs no wrapper: the driver poisons
    the peer's batches (``attack.batch_transform``) and the protocol runs honestly --
    unless it is scheduled: then the wrapper tells the attack's gate each training's round.
    """
    scheduled = attack.kind != "none" and not attack.schedule.always
    return attack.kind == "model" or isolate or colluding or scheduled


def as_attacker(
    protocol: Protocol, attack: Attack, *, isolate: bool = False, **options: Any
) -> Protocol:
    """``protocol`` as a peer carrying out ``attack``: wrapped when :func:`needs_wrapper`
    says so (``options`` go to :class:`ByzantineProtocol`), else ``protocol`` itself."""
    colluding = options.get("collusion") is not None
    if not needs_wrapper(attack, isolate=isolate, colluding=colluding):
        return protocol
    return ByzantineProtocol(protocol, attack, isolate=isolate, **options)


class ByzantineProtocol(ProtocolWrapper):
    """An honest ``inner`` protocol whose outgoing models an ``attack`` rewrites.

    ``n_total`` and ``n_byzantine`` are what ALIE's ``z_max`` is computed from;
    ``collusion`` (with ``jitter``) makes Sybil identities send one shared vector;
    ``seed`` seeds the noise of noise attacks and jitter; ``allies`` are the peer ids of
    the colluding Byzantine peers (left out of what this one received). See the module
    docstring for ``knowledge``, ``delay`` and ``isolate``.

    A driver reads the class declarations (``progress``, ``max_round_lag``, ...) from the
    configured protocol's class (``p2pfl.protocols.registry.protocol_class``), which the
    wrapper does not change; everything per peer it delegates to ``inner``.
    """

    def __init__(
        self,
        inner: Protocol,
        attack: Attack,
        *,
        knowledge: Knowledge | None = None,
        n_total: int | None = None,
        n_byzantine: int | None = None,
        delay: float = 0.0,
        isolate: bool = False,
        collusion: Collusion | None = None,
        jitter: float = 0.0,
        model_kinds: Iterable[str] = MODEL_KINDS,
        seed: int = 0,
        allies: Iterable[PeerId] = (),
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        if attack.omniscient and knowledge is None:
            raise ValueError(
                f"attack {attack.name!r}: knowledge = 'omniscient' needs a driver that sees "
                "every honest model (the simulator); a node knows only what it received "
                "(knowledge = 'received')"
            )
        super().__init__(inner)
        self.attack = attack
        #: what the attacker knows of the round's honest models (see the module docstring)
        self.knowledge: Knowledge = (
            knowledge if attack.omniscient and knowledge is not None else self.received
        )
        self.allies = frozenset(allies)
        self.n_total = n_total
        self.n_byzantine = n_byzantine
        self.delay = float(delay)
        self.isolate = isolate
        self.collusion = collusion
        self.jitter = float(jitter)
        self.model_kinds = frozenset(model_kinds)
        self.generator = torch.Generator().manual_seed(seed)
        self.crafted = 0  # messages whose model was replaced
        self.passed = 0  # messages sent as the protocol made them (rounds off schedule)
        self._reference: Tensor | None = None
        self._last_sent: Tensor | None = None
        self._held: list[Send] = []
        self._heard: dict[int, dict[PeerId, Tensor]] = {}

    # -- what the driver sees is the inner protocol (ProtocolWrapper), plus: ------------------
    def report(self) -> dict[str, Any]:
        """The inner protocol's counters, how many messages the attack crafted (and, on a
        schedule, how many model messages it sent honestly)."""
        report = {**self.inner.report(), "crafted_messages": self.crafted}
        if not self.attack.schedule.always:  # and what it sent honestly, off schedule
            report["honest_messages"] = self.passed
        return report

    # -- events ------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, TimerFired) and event.name == DELAY_TIMER:
            held, self._held = self._held, []
            return self._crafted(held)
        if isinstance(event, MessageReceived) and self._carries_model(event.message):
            event = self._on_model(event, self.attack.active(self.inner.round))
        effects = self.inner.handle(event)
        return self._rewrite(effects, event.now)

    def _carries_model(self, message: Message) -> bool:
        return message.params is not None and message.kind in self.model_kinds

    def _on_model(self, event: MessageReceived, active: bool) -> MessageReceived:
        if event.sender not in self.allies:  # a colluder's model is no honest one
            heard = self._heard.setdefault(event.message.round, {})
            heard[event.sender] = event.message.params  # type: ignore[assignment]
            for old in sorted(self._heard)[:-2]:
                del self._heard[old]
        if not (self.isolate and active):
            return event
        own = self._last_sent if self._last_sent is not None else self._reference
        if own is None or own.shape != event.message.params.shape:  # type: ignore[union-attr]
            return event
        return replace(event, message=replace(event.message, params=own))

    def received(self, round_: int) -> Tensor | None:
        """The models this peer received from non-allies for ``round_`` (else for the round
        before), one row per sender in the order of their ids; ``None`` when it has none."""
        models = self._heard.get(round_) or self._heard.get(round_ - 1)
        if not models:
            return None
        return torch.stack([models[sender] for sender in sorted(models)])

    # -- effects ------------------------------------------------------------------------------
    def _rewrite(self, effects: list[Effect], now: float) -> list[Effect]:
        out: list[Effect] = []
        sends: list[Send] = []
        passed: set[int] = set()  # honest messages (one per message object, as ``crafted``)
        for effect in effects:
            if isinstance(effect, Train):
                self._reference = self.inner.message_params(effect.params)
                self.attack.gate.round = self.inner.round  # a scheduled data attack's round
            if isinstance(effect, Send) and self._carries_model(effect.message):
                if self.attack.active(effect.message.round):
                    sends.append(effect)
                else:  # an honest round: as the protocol made it, at once
                    passed.add(id(effect.message))
                    out.append(effect)
            else:
                out.append(effect)
        self.passed += len(passed)
        if not sends:
            return out
        if self.delay > 0 and self.attack.kind == "model":
            if not self._held:
                out.append(SetTimer(DELAY_TIMER, now + self.delay))
            self._held.extend(sends)
            return out
        return self._crafted(sends) + out

    def _crafted(self, sends: list[Send]) -> list[Effect]:
        """``sends`` with their models replaced; one vector per distinct message."""
        vectors: dict[int, Tensor] = {}
        out: list[Effect] = []
        for send in sends:
            message = send.message
            key = id(message)
            if key not in vectors:
                vectors[key] = self._craft(message)
            out.append(Send(send.to, replace(message, params=vectors[key])))
        return out

    def _craft(self, message: Message) -> Tensor:
        own = message.params
        assert own is not None
        vector = own
        if self.attack.kind == "model":
            reference = self._reference if self._reference is not None else own
            honest = self.knowledge(message.round) if self.attack.needs_honest else None
            if honest is None and self.attack.name == "alie":
                honest = own[None]  # nothing heard yet (a real node's first round): itself
            ctx = ModelAttackContext(
                own=own,
                reference=reference,
                honest=honest,
                n_total=self.n_total,
                n_byzantine=self.n_byzantine,
                generator=self.generator,
            )
            vector = self.attack.craft(ctx)
        if vector is own:
            vector = own.clone()  # a private copy: isolation replays it later
        if self.collusion is not None:
            vector = self.collusion.shared(message.round, vector)
        if self.jitter > 0:
            noise = torch.randn(vector.shape, generator=self.generator, dtype=vector.dtype)
            vector = vector + self.jitter * noise
        self.crafted += 1
        self._last_sent = vector
        return vector
