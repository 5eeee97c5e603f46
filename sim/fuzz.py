"""A protocol-level hostile-peer fuzzer: honest peers next to one peer that sends anything.

The sans-I/O design makes this cheap: a simulation of a few honest peers of one protocol
runs in virtual time, and one of its peers is replaced by a :class:`HostilePeer`. That
peer keeps running the honest protocol underneath (so it stays a member, a neighbour, a
sampled peer: every role a real insider could have), and on its own timer it also sends
bursts of hostile messages with its own, valid identity (in signed mode it signs its
own records with its own key):

- per kind the target protocol declares, and a few it does not: wrong dtypes and shapes,
  extreme values, forged round numbers in the tag and in every round field, garbage
  meta, forged membership (views of made-up names, entries about honest peers, leave
  entries for them), replays of honest messages it heard, and floods.

Hostile messages cost the network an envelope's bytes only (``FuzzOptions.free_bandwidth``):
otherwise the adversary's floods delay its own honest messages, and the run measures a
slow peer, which the disruption tests cover, rather than the handling of message content.

Every honest peer is watched (:class:`Watch`): its contract verdicts are counted
independently of the engine, and its round after every event is noted. The same
scenario and seed run once undisturbed (:func:`run_fuzz`); the invariants (see
:class:`Margins` and :func:`check_invariants`) then compare the two runs:

- ``raises``: no honest peer raises (an exception would propagate out of ``Engine.run``);
  neither does the contract's ``screen`` on any content;
- ``stall``: the run reaches its rounds within ``stall_factor`` x the undisturbed virtual
  time, plus per round what one slow or silent peer may cost by design (:func:`patience`);
- ``jump``: an honest peer's round never exceeds the undisturbed run's highest honest
  round at the same progress by more than ``round_margin``;
- ``early``: the honest peers complete at least ``early_fraction`` of the rounds they
  completed undisturbed, and the run does not end before ``early_fraction`` of its
  undisturbed virtual time;
- ``accuracy``: final honest accuracy at most ``acc_margin`` below the undisturbed run;
- ``counted``: every refusal the contract gave is counted by the engine, by reason, and in
  its records; and no refused message reached ``handle``.

Poisoning *within* the contract (a well-formed model with bad values) is the attacks'
subject (``p2pfl.attacks``), not this fuzzer's: tensors that pass the contract here are the
adversary's own model or replays, so that the accuracy invariant measures the protocol's
handling of forged *structure*, not its Byzantine robustness.
"""

from __future__ import annotations

import copy
import math
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from p2pfl.protocols.base import (
    ENVELOPE_OVERHEAD,
    Effect,
    Event,
    Message,
    MessageReceived,
    PeerId,
    Protocol,
    RoundCompleted,
    Send,
    SendFailed,
    SetTimer,
    Start,
    TimerFired,
)
from p2pfl.protocols.contract import (
    Bool,
    Bytes,
    Field,
    Float,
    Int,
    ListOf,
    MapOf,
    MessageSpec,
    PeerName,
    Refusal,
    RoundNumber,
    Tuple,
)
from p2pfl.protocols.wrapper import ProtocolWrapper
from sim.mixing import plain
from sim.runner import Simulation, build_simulation
from sim.scenario import scenario_from_dict

__all__ = [
    "CATEGORIES",
    "FuzzOptions",
    "FuzzResult",
    "HostileMessages",
    "HostilePeer",
    "Margins",
    "Watch",
    "check_invariants",
    "fuzz_scenario",
    "patience",
    "run_fuzz",
]

#: the hostile peer's own timer (never shown to the protocol it wraps)
BURST_TIMER = "fuzz.burst"
#: what each hostile message tries; ``tried`` is counted per category
CATEGORIES = (
    "valid",  # well-formed by the declaration, the adversary's own model: the control
    "dtype",
    "shape",
    "extreme",
    "not_tensor",
    "round",
    "meta",
    "membership",
    "undeclared",
    "replay",
    "flood",
)
#: kinds no protocol declares (and a declared kind's look-alikes, added per protocol)
UNDECLARED_KINDS: tuple[Any, ...] = ("hello", "ping", "model", "status", "", "x" * 300, 7, None)
_BIG = (1 << 63) - 1


@dataclass(frozen=True)
class FuzzOptions:
    """How hard the adversary pushes: bursts per round and their size, floods, views."""

    seed: int = 0
    #: bursts per (undisturbed) round's duration
    bursts_per_round: float = 2.0
    #: hostile messages per burst (spread over the targets)
    burst_size: int = 24
    #: every ``flood_every``-th burst also floods one honest peer with ``flood_size`` messages
    flood_every: int = 4
    flood_size: int = 60
    #: made-up names in a "many names" view
    view_names: int = 2000
    #: honest messages kept for replays
    replay_memory: int = 64
    #: the categories bursts draw from (all but ``flood`` by default; floods have their own
    #: switch, ``flood_every = 0`` turns them off)
    categories: tuple[str, ...] = tuple(c for c in CATEGORIES if c != "flood")
    #: hostile messages cost the network an envelope's bytes only, so that the adversary's
    #: floods do not delay its own honest messages: the fuzzer's subject is what protocols
    #: do with message *content*; a slow or silent peer is the disruptions' subject (off:
    #: floods congest the adversary's links as real bytes would)
    free_bandwidth: bool = True


@dataclass(frozen=True)
class Margins:
    """The stated margins of the invariants (see the module docstring)."""

    stall_factor: float = 3.0
    round_margin: int = 2
    early_fraction: float = 0.5
    acc_margin: float = 0.05


# --------------------------------------------------------------------------- hostile messages


class HostileMessages:
    """Seeded generator of hostile messages for one target protocol's declaration.

    ``specs`` is the target's ``messages``; ``dim`` its tensor length; ``own``/``honest``
    the peer names; ``signer`` (signed mode) signs records with the adversary's own key.
    ``round_`` and ``model`` (the adversary's current round and message-space model) are
    passed per call, so the messages follow the run.
    """

    def __init__(
        self,
        specs: dict[str, MessageSpec],
        dim: int,
        max_abs: float,
        own: PeerId,
        honest: list[PeerId],
        *,
        signer: Any = None,
        options: FuzzOptions = FuzzOptions(),
    ) -> None:
        self.specs = dict(specs)
        self.dim = dim
        self.max_abs = max_abs
        self.own = own
        self.honest = list(honest)
        self.signer = signer
        self.options = options
        self.rng = random.Random(f"fuzz:{options.seed}:{own}")
        self.torch_rng = torch.Generator().manual_seed(options.seed * 7919 + 17)
        self.heard: list[Message] = []
        kinds = [k for k in UNDECLARED_KINDS if k not in self.specs]
        self.undeclared = kinds + [k.upper() for k in self.specs] + [k + " " for k in self.specs]
        self._made_up = 0

    # -- the public surface ------------------------------------------------------------
    def remember(self, message: Message) -> None:
        """Keep an honest message heard, for replays (the oldest go first)."""
        self.heard.append(message)
        if len(self.heard) > self.options.replay_memory:
            del self.heard[0]

    def make(self, category: str, round_: int, model: torch.Tensor) -> Message:
        """One hostile message of ``category`` (any of :data:`CATEGORIES` but ``flood``)."""
        maker: Callable[[int, torch.Tensor], Message] = getattr(self, f"_{category}")
        return maker(round_, model)

    def burst(self, round_: int, model: torch.Tensor, size: int) -> list[tuple[str, Message]]:
        """``size`` messages of categories drawn at random (not floods)."""
        categories = self.options.categories
        picks = [self.rng.choice(categories) for _ in range(size)]
        return [(c, self.make(c, round_, model)) for c in picks]

    def flood(self, round_: int, model: torch.Tensor) -> list[Message]:
        """Many messages at once: one crafted message repeated, and fresh ones mixed in."""
        size = self.options.flood_size
        same = self.make(self.rng.choice(self.options.categories), round_, model)
        out = [same] * (size // 2)
        out += [
            self.make(self.rng.choice(self.options.categories), round_, model)
            for _ in range(size - len(out))
        ]
        return out

    # -- categories ----------------------------------------------------------------------
    def _kind(self) -> str:
        return self.rng.choice(sorted(self.specs))

    def _valid(self, round_: int, model: torch.Tensor) -> Message:
        """Well-formed by the declaration; its tensor is the adversary's own model."""
        kind = self._kind()
        spec = self.specs[kind]
        meta = {
            name: self._value(f, round_)
            for name, f in spec.fields.items()
            if name in spec.required or self.rng.random() < 0.5
        }
        return Message(
            kind,
            max(round_ + self.rng.randint(-1, 1), 0),
            self._benign(model) if spec.tensor else None,
            meta,
        )

    def _dtype(self, round_: int, model: torch.Tensor) -> Message:
        dtype = self.rng.choice(
            [torch.float64, torch.float16, torch.int64, torch.bool, torch.bfloat16]
        )
        return self._with_tensor(round_, self._benign(model).to(dtype))

    def _shape(self, round_: int, model: torch.Tensor) -> Message:
        benign = self._benign(model)
        d = benign.numel()
        choice = self.rng.randrange(5)
        if choice == 0:
            tensor = benign.reshape(d, 1)
        elif choice == 1:
            tensor = torch.cat([benign, benign[:1]])
        elif choice == 2:
            tensor = benign[:0]
        elif choice == 3:
            tensor = torch.stack([benign, benign])  # 2-D
        else:
            tensor = benign[: max(d - 1, 0)]
        return self._with_tensor(round_, tensor)

    def _extreme(self, round_: int, model: torch.Tensor) -> Message:
        benign = self._benign(model)
        choice = self.rng.randrange(8)
        if choice == 0:  # finite in float64, Inf once cast to float32
            tensor = benign.double()
            tensor[self.rng.randrange(tensor.numel())] = 1e300
        elif choice in (1, 2):  # float32 at its edge: overflows any sum
            tensor = torch.full_like(benign, 3e38 if choice == 1 else -3e38)
        else:
            tensor = benign.clone()
            spot = self.rng.randrange(tensor.numel())
            value = {3: math.nan, 4: math.inf, 5: -math.inf, 6: 1e7}.get(choice)
            if value is None:  # a "huge sum": just beyond what an accumulated history may reach
                value = self.max_abs * (round_ + 2) * 1.01
            tensor[spot] = value
        return self._with_tensor(round_, tensor)

    def _not_tensor(self, round_: int, model: torch.Tensor) -> Message:
        """A tensor on a kind that takes none, or none on a kind that needs one.

        (What arrives is always a tensor or nothing: the wire decodes tensors only, and
        the simulator sizes ``params`` as a tensor.)
        """
        message = self._valid(round_, model)
        if self.specs[message.kind].tensor:
            message.params = None
        else:
            message.params = self._benign(model)
        return message

    def _round(self, round_: int, model: torch.Tensor) -> Message:
        """Forged round numbers, in the tag and in every round field (also nested)."""
        message = self._valid(round_, model)
        spec = self.specs[message.kind]
        message.round = self._forged_round(round_)
        message.meta = {n: self._value(f, round_, forge=True) for n, f in spec.fields.items()}
        if self.rng.random() < 0.5:
            message.round = max(round_, 0)  # only the fields forged
        return message

    def _meta(self, round_: int, model: torch.Tensor) -> Message:
        """Meta that breaks the declaration: missing, extra, mistyped, huge, nested junk."""
        message = self._valid(round_, model)
        spec = self.specs[message.kind]
        choice = self.rng.randrange(6)
        if choice == 0:
            junk: list[Any] = [None, [], "meta", 5, [("a", 1)]]
            message.meta = self.rng.choice(junk)
        elif choice == 1 and spec.required:
            meta = {n: self._value(f, round_) for n, f in spec.fields.items()}
            del meta[self.rng.choice(sorted(spec.required))]
            message.meta = meta
        elif choice == 2:
            message.meta = {
                **message.meta,
                self.rng.choice(["extra", "", "round", "w2"]): self._junk(3),
            }
        elif choice == 3 and spec.fields:
            name = self.rng.choice(sorted(spec.fields))
            message.meta = {**message.meta, name: self._junk(3)}
        elif choice == 4 and spec.fields:
            name = self.rng.choice(sorted(spec.fields))
            message.meta = {
                **message.meta,
                name: self.rng.choice([1 << 70, -(1 << 70), 2**64, 1e308]),
            }
        else:
            message.round = self.rng.choice([1.5, "3", None, True, b"\x01", -(1 << 70)])  # type: ignore[assignment]
        return message

    def _membership(self, round_: int, model: torch.Tensor) -> Message:
        """Forged membership: views of made-up names, entries about and leaves for honest peers."""
        message = self._valid(round_, model)
        spec = self.specs[message.kind]
        maps = [(n, f) for n, f in spec.fields.items() if isinstance(f, MapOf)]
        names = [(n, f) for n, f in spec.fields.items() if isinstance(f, PeerName)]
        if maps:
            name, field_ = self.rng.choice(maps)
            message.meta = {**message.meta, name: self._forged_view(field_, round_)}
        elif names:  # e.g. a history about an honest peer (or a made-up one)
            name, _ = self.rng.choice(names)
            message.meta = {
                **message.meta,
                name: self.rng.choice([*self.honest, self._fresh_name()]),
            }
        entries = [(n, f) for n, f in spec.fields.items() if isinstance(f, Tuple)]
        if entries and self.rng.random() < 0.5:  # one's own entry, claiming to have left
            entry_name, entry_field = self.rng.choice(entries)
            message.meta[entry_name] = self._entry(entry_field, round_, left=True)
        return message

    def _undeclared(self, round_: int, model: torch.Tensor) -> Message:
        params = self._benign(model) if self.rng.random() < 0.5 else None
        return Message(
            self.rng.choice(self.undeclared), max(round_, 0), params, {"junk": self._junk(2)}
        )

    def _replay(self, round_: int, model: torch.Tensor) -> Message:
        """An honest message heard, as is, re-tagged, or under another kind."""
        if not self.heard:
            return self._valid(round_, model)
        heard = self.rng.choice(self.heard)
        choice = self.rng.randrange(3)
        if choice == 0:  # a replay arrives as a new object, like any decoded message
            return Message(heard.kind, heard.round, heard.params, dict(heard.meta))
        if choice == 1:
            return Message(
                heard.kind,
                heard.round + self.rng.choice([1, 2, 500]),
                heard.params,
                dict(heard.meta),
            )
        return Message(self._kind(), heard.round, heard.params, dict(heard.meta))

    # -- values --------------------------------------------------------------------------
    def _benign(self, model: torch.Tensor) -> torch.Tensor:
        if model.numel() != self.dim:
            model = torch.zeros(self.dim)
        noise = torch.randn(self.dim, generator=self.torch_rng) * 1e-3
        return (model.detach().float() + noise).contiguous()

    def _with_tensor(self, round_: int, tensor: Any) -> Message:
        kinds = [k for k, s in self.specs.items() if s.tensor] or sorted(self.specs)
        kind = self.rng.choice(kinds)
        spec = self.specs[kind]
        meta = {n: self._value(f, round_) for n, f in spec.fields.items() if n in spec.required}
        return Message(kind, max(round_, 0), tensor, meta)

    def _forged_round(self, round_: int) -> int:
        return self.rng.choice([-1, -(1 << 40), round_ + 1, round_ + 500, round_ + 10**6, _BIG])

    def _value(self, spec: Field, round_: int, *, forge: bool = False) -> Any:
        """A value ``spec`` accepts (``forge``: with its round numbers forged)."""
        rng = self.rng
        if isinstance(spec, RoundNumber):
            return self._forged_round(round_) if forge else max(round_ + rng.randint(-1, 1), 0)
        if isinstance(spec, Bool):
            return rng.random() < 0.5
        if isinstance(spec, Int):
            return rng.randint(spec.lo, min(spec.hi, spec.lo + 100))
        if isinstance(spec, Float):
            lo = spec.lo if math.isfinite(spec.lo) else 0.0
            return rng.uniform(lo, min(spec.hi, lo + 10.0))
        if isinstance(spec, Bytes):
            return self._blob(round_, spec.max_len)
        if isinstance(spec, PeerName):
            return rng.choice([*self.honest, self.own])
        if isinstance(spec, Tuple):
            return [self._value(item, round_, forge=forge) for item in spec.items]
        if isinstance(spec, ListOf):
            return [self._value(spec.item, round_, forge=forge) for _ in range(rng.randint(0, 3))]
        if isinstance(spec, MapOf):
            keys = rng.sample([*self.honest, self.own], k=min(3, len(self.honest) + 1))
            return {
                self._key(spec.key, k): self._value(spec.value, round_, forge=forge) for k in keys
            }
        return None

    def _key(self, spec: Field, name: PeerId) -> Any:
        return name if isinstance(spec, PeerName) else self._value(spec, 0)

    def _blob(self, round_: int, max_len: int) -> bytes:
        """Random bytes, or (signed mode) a record the adversary signed with its own key."""
        if self.signer is not None and self.rng.random() < 0.7:
            record = self.rng.choice(
                [
                    {"k": "modest.entry", "r": round_ + 1, "l": 0, "c": 1 << 20},
                    {"k": "modest.entry", "r": round_, "l": 1, "c": 1 << 20},
                    {"k": "sybilwall.history", "r": round_, "n": self.dim, "d": b"\x00" * 32},
                ]
            )
            return self.signer.sign(record)[:max_len]
        return self.rng.randbytes(self.rng.randint(0, min(max_len, 96)))

    def _entry(self, spec: Tuple, round_: int, *, left: bool) -> list[Any]:
        entry = [self._value(item, round_) for item in spec.items]
        for i, item in enumerate(spec.items):
            if isinstance(item, Bool):
                entry[i] = 1 if left and item.as_int else left
            elif isinstance(item, Int) and not isinstance(item, RoundNumber):
                entry[i] = min(item.hi, 1 << 20)  # a counter that outranks the real one
        return entry

    def _forged_view(self, spec: MapOf, round_: int) -> dict[Any, Any]:
        """Many made-up names, or entries about honest peers (some saying they left)."""
        value = spec.value
        if self.rng.random() < 0.5 or not isinstance(value, Tuple):
            count = self.options.view_names
            return {self._fresh_name(): self._value(value, round_) for _ in range(count)}
        return {
            name: self._entry(value, round_, left=self.rng.random() < 0.5)
            for name in [*self.honest, self._fresh_name()]
        }

    def _fresh_name(self) -> str:
        self._made_up += 1
        return f"made-up-{self._made_up}"

    def _junk(self, depth: int) -> Any:
        """Nested junk of mixed types."""
        choice = self.rng.randrange(7 if depth > 0 else 5)
        if choice == 0:
            return "12"
        if choice == 1:
            return self.rng.choice([math.nan, math.inf, -1.5, 1e308])
        if choice == 2:
            return self.rng.choice([1 << 70, -1, True, None])
        if choice == 3:
            return b"\xff" * self.rng.randint(0, 8)
        if choice == 4:
            return self.rng.randint(-5, 5)
        if choice == 5:
            return [self._junk(depth - 1) for _ in range(self.rng.randint(0, 4))]
        return {str(self._junk(0)): self._junk(depth - 1) for _ in range(self.rng.randint(0, 3))}


# --------------------------------------------------------------------------- the hostile peer


class HostilePeer(ProtocolWrapper):
    """One peer's honest protocol, plus bursts of hostile messages on its own timer.

    Events go to ``inner`` as usual (except the burst timer and failures of its own
    hostile sends), so the peer keeps every role an insider has. ``targets`` are the honest
    peers it can reach; ``period`` the virtual seconds between bursts.
    """

    def __init__(
        self,
        inner: Protocol,
        targets: list[PeerId],
        period: float,
        *,
        signer: Any = None,
        options: FuzzOptions = FuzzOptions(),
    ) -> None:
        super().__init__(inner)
        self.targets = sorted(targets)
        self.period = period
        self.options = options
        self.hostile = HostileMessages(
            dict(inner.messages),
            inner.message_dim,
            inner.max_abs,
            inner.peer_id,
            self.targets,
            signer=signer,
            options=options,
        )
        self.tried: Counter[str] = Counter()
        self.bursts = 0
        self._mine: dict[int, Message] = {}  # id -> message: hostile sends, to tell failures apart

    # -- events --------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, TimerFired) and event.name == BURST_TIMER:
            return self._burst(event.now)
        if isinstance(event, SendFailed) and id(event.message) in self._mine:
            return []
        if isinstance(event, MessageReceived):
            self.hostile.remember(event.message)
        effects = self.inner.handle(event)
        if isinstance(event, Start):
            effects = [*effects, SetTimer(BURST_TIMER, event.now + self.period)]
        return effects

    def _model(self) -> torch.Tensor:
        """The adversary's model in the message space (Bristle sends output layers only)."""
        return self.inner.message_params(plain(self.inner.params))

    def _burst(self, now: float) -> list[Effect]:
        if not self.targets:
            return []
        self.bursts += 1
        round_, model = self.inner.round, self._model()
        rng = self.hostile.rng
        sends: list[Effect] = []
        for category, message in self.hostile.burst(round_, model, self.options.burst_size):
            sends.append(self._send(rng.choice(self.targets), category, message))
        if self.options.flood_every and self.bursts % self.options.flood_every == 0:
            victim = rng.choice(self.targets)
            for message in self.hostile.flood(round_, model):
                sends.append(self._send(victim, "flood", message))
        return [*sends, SetTimer(BURST_TIMER, now + self.period)]

    def crafted(self, message: Message) -> bool:
        """Whether ``message`` is one this peer crafted (not one its honest protocol sent)."""
        return id(message) in self._mine

    def _send(self, to: PeerId, category: str, message: Message) -> Send:
        self.tried[category] += 1
        self._mine[id(message)] = message
        if self.options.free_bandwidth:
            message._size = ENVELOPE_OVERHEAD  # sized once; the engine reads it at each hop
        return Send(to, message)


# --------------------------------------------------------------------------- watching honest peers


class Watch:
    """Observes the honest peers of a simulation: verdicts, rounds, errors.

    Wraps each honest protocol's ``screen`` and ``handle`` on the instance (the engine
    calls them through the instance), so the refusals are counted independently of the
    engine's own counters, and an exception names the peer and the event.
    """

    def __init__(
        self,
        simulation: Simulation,
        honest: list[int],
        hostile: PeerId | None,
        crafted: Callable[[Message], bool] = lambda message: False,
    ) -> None:
        self.engine = simulation.engine
        self.honest = honest
        self.hostile = hostile
        self.crafted = crafted  # whether a message is one of the hostile peer's crafted ones
        self.refused: Counter[str] = Counter()  # every refusal, by reason
        self.refused_hostile: Counter[str] = Counter()  # of the hostile peer's messages
        self.accepted_hostile = 0
        self.errors: list[str] = []
        self.refused_handled = 0
        #: highest honest round seen at each value of the engine's progress
        self.max_round: dict[int, int] = {}
        self.completed = 0  # RoundCompleted effects of honest peers
        for index in honest:
            self._wrap(index, self.engine.protocols[index])
        self.engine.on_handled(self._after)

    def _wrap(self, index: int, protocol: Protocol) -> None:
        screen, handle = protocol.screen, protocol.handle
        last: list[Message | None] = [None]

        def watched_screen(sender: PeerId, message: Message) -> Refusal | None:
            try:
                verdict = screen(sender, message)
            except Exception as error:  # the contract promises never to raise
                self.errors.append(
                    f"screen raised at {protocol.peer_id}: {_describe(message)}: {error!r}"
                )
                raise
            last[0] = message if verdict is not None else None
            if verdict is not None:
                self.refused[verdict.value] += 1
            if sender == self.hostile and self.crafted(message):
                if verdict is None:
                    self.accepted_hostile += 1
                else:
                    self.refused_hostile[verdict.value] += 1
            return verdict

        def watched_handle(event: Event) -> list[Effect]:
            if isinstance(event, MessageReceived) and event.message is last[0]:
                self.refused_handled += 1
            try:
                return handle(event)
            except Exception as error:
                where = (
                    _describe(event.message) if isinstance(event, MessageReceived) else repr(event)
                )
                detail = "".join(traceback.format_exception_only(error)).strip()
                self.errors.append(f"{protocol.peer_id} raised on {where}: {detail}")
                raise

        protocol.screen = watched_screen  # type: ignore[method-assign]
        protocol.handle = watched_handle  # type: ignore[method-assign]

    def _after(self, peer: int, event: Event, effects: list[Effect]) -> None:
        if (
            peer >= len(self.engine.protocols)
            or self.engine.protocols[peer].peer_id == self.hostile
        ):
            return
        top = self.engine.protocols[peer].round
        for effect in effects:
            if type(effect) is RoundCompleted:
                self.completed += 1
                top = max(top, effect.round + 1)
        progress = self.engine.progress()
        if top > self.max_round.get(progress, -1):
            self.max_round[progress] = top


def _describe(message: Message) -> str:
    params = message.params
    tensor = (
        f"{tuple(params.shape)} {params.dtype}"
        if isinstance(params, torch.Tensor)
        else type(params).__name__
    )
    meta = repr(message.meta)
    return f"{message.kind!r} round={message.round!r} tensor={tensor} meta={meta[:160]}"


# --------------------------------------------------------------------------- running and checking


@dataclass
class RunRecord:
    """What one run (undisturbed or hostile) left behind."""

    rounds_done: int
    virtual_time: float
    acc_mean: float
    completed: int
    max_round: dict[int, int]
    refusals: Counter[str]
    records: dict[str, float]
    watch: Watch
    wall_s: float
    error: str | None = None


@dataclass
class FuzzResult:
    """The verdict on one protocol: what was tried, refused, and which invariants held."""

    protocol: str
    seed: int
    tried: Counter[str]
    refused_hostile: Counter[str]
    accepted_hostile: int
    held: dict[str, bool]
    violations: list[str]
    baseline: RunRecord
    hostile: RunRecord

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def messages(self) -> int:
        return sum(self.tried.values())


def fuzz_scenario(
    protocol: str, *, seed: int = 0, rounds: int = 6, n: int = 6, signed: bool = False
) -> dict[str, Any]:
    """A small scenario of ``protocol`` (digits, a small MLP), as tests and benchmarks use."""
    timeout = {"round_timeout": 0.1}  # a round lasts ~0.02 s here: a silent peer costs 0.1 s
    configs: dict[str, dict[str, Any]] = {
        "dpsgd": {"name": "dpsgd", "local_steps": 3, **timeout},
        "epidemic": {"name": "epidemic", "fanout": 2, "local_steps": 3, **timeout},
        "gossip": {"name": "gossip", "period": 0.05, "local_steps": 3},
        "modest": {
            "name": "modest",
            "sample_size": 3,
            "local_steps": 3,
            "ping_timeout": 0.05,
            "aggregation_timeout": 0.2,
        },
        "sybilwall": {"name": "sybilwall", "local_steps": 3, **timeout},
        "bristle": {"name": "bristle", "local_steps": 3, **timeout},
    }
    # graph protocols on a 3-regular graph; those that pick peers from their population
    # (epidemic, modest) on an overlay where anyone reaches anyone
    graph = ({"kind": "regular", "n": n, "params": {"k": 3}}, {"mode": "graph"})
    overlay = ({"kind": "complete", "n": n}, {"mode": "overlay"})
    placement = {"epidemic": overlay, "modest": overlay}.get(protocol, graph)
    topology: dict[str, Any] = placement[0]
    network: dict[str, Any] = {"step_time": 0.002, **placement[1]}
    return {
        "name": f"fuzz-{protocol}",
        "seed": seed,
        "rounds": rounds,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": 0.3},
        "topology": topology,
        "protocol": configs[protocol],
        "network": network,
        "sim": {"eval_every": rounds, "threads": 1, "sign_relayed": signed},
    }


def patience(config: Any) -> float:
    """Virtual seconds per round one peer may legitimately cost the others, by design.

    A neighbour that is slow or silent (its link congested by its own floods, say) makes a
    round protocol wait up to its ``round_timeout``; a MoDeST peer that is sampled and then
    silent costs a ping timeout and, as an aggregator, an aggregation timeout. The stall
    bound allows that much per round on top of ``stall_factor`` x the undisturbed time.
    """
    waits = ("round_timeout", "ping_timeout", "aggregation_timeout")
    return float(sum(getattr(config, name, None) or 0.0 for name in waits))


def _honest_accuracy(simulation: Simulation, honest: list[int]) -> float:
    evaluator = simulation.evaluator
    evaluator.peer_sample = np.asarray(honest, dtype=np.int64)
    return float(evaluator.measure(simulation.engine, simulation.engine.progress())["acc_mean"])


def _run(
    raw: dict[str, Any],
    hostile_index: int,
    *,
    until: float,
    install: Callable[[Simulation], HostilePeer | None],
    dataset: Any,
) -> tuple[RunRecord, Simulation]:
    simulation = build_simulation(scenario_from_dict(raw), dataset=dataset)
    engine = simulation.engine
    honest = [i for i in range(engine.n) if i != hostile_index]
    adversary = install(simulation)
    if adversary is None:
        watch = Watch(simulation, honest, None)
    else:
        watch = Watch(simulation, honest, adversary.peer_id, adversary.crafted)
    started = time.perf_counter()
    error = None
    try:
        engine.run(until=until)
    except Exception as exc:  # an honest peer raised: the invariant's subject
        error = watch.errors[-1] if watch.errors else f"the engine raised {exc!r}"
    wall = time.perf_counter() - started
    accuracy = _honest_accuracy(simulation, honest) if error is None else math.nan
    record = RunRecord(
        rounds_done=min(engine.progress(), simulation.scenario.rounds),
        virtual_time=engine.now,
        acc_mean=accuracy,
        completed=watch.completed,
        max_round=dict(watch.max_round),
        refusals=Counter(engine.refusals),
        records={k: v for k, v in engine.records.items() if k.startswith("refused.")},
        watch=watch,
        wall_s=wall,
        error=error,
    )
    return record, simulation


def _install_hostile(
    hostile_index: int, period: float, options: FuzzOptions
) -> Callable[[Simulation], HostilePeer]:
    """Replace peer ``hostile_index``'s protocol by a :class:`HostilePeer` around it."""

    def install(simulation: Simulation) -> HostilePeer:
        engine = simulation.engine
        inner = engine.protocols[hostile_index]
        me = inner.peer_id
        if engine.network.mode == "overlay":
            targets = [p.peer_id for p in engine.protocols if p.peer_id != me]
        else:
            targets = [simulation.peer_ids[j] for j in simulation.graph.neighbors(hostile_index)]
        signer = None  # its own key, as the simulator gives it when relayed data is signed
        if simulation.scenario.sim.sign_relayed and simulation.keyring is not None:
            signer = simulation.keyring.signer(me)
        adversary = HostilePeer(inner, targets, period, signer=signer, options=options)
        engine.protocols[hostile_index] = adversary
        return adversary

    return install


def run_fuzz(
    raw: dict[str, Any],
    *,
    options: FuzzOptions = FuzzOptions(),
    margins: Margins = Margins(),
    hostile_index: int = 0,
    dataset: Any = None,
) -> FuzzResult:
    """Run ``raw`` undisturbed, then with peer ``hostile_index`` hostile; check the invariants."""
    raw = copy.deepcopy(raw)
    rounds = int(raw["rounds"])
    baseline, undisturbed = _run(
        raw, hostile_index, until=math.inf, install=lambda s: None, dataset=dataset
    )
    if baseline.error is not None or baseline.rounds_done < rounds:
        raise RuntimeError(f"the undisturbed run failed: {baseline.error or baseline.rounds_done}")
    period = baseline.virtual_time / rounds / options.bursts_per_round
    install = _install_hostile(hostile_index, period, options)
    slack = rounds * patience(undisturbed.scenario.protocol)
    until = margins.stall_factor * baseline.virtual_time + slack
    hostile, simulation = _run(raw, hostile_index, until=until, install=install, dataset=dataset)
    adversary = simulation.engine.protocols[hostile_index]
    assert isinstance(adversary, HostilePeer)
    held, violations = check_invariants(baseline, hostile, rounds, margins, until)
    return FuzzResult(
        protocol=str(raw["protocol"]["name"]),
        seed=int(raw["seed"]),
        tried=Counter(adversary.tried),
        refused_hostile=Counter(hostile.watch.refused_hostile),
        accepted_hostile=hostile.watch.accepted_hostile,
        held=held,
        violations=violations,
        baseline=baseline,
        hostile=hostile,
    )


def check_invariants(
    baseline: RunRecord, hostile: RunRecord, rounds: int, margins: Margins, until: float
) -> tuple[dict[str, bool], list[str]]:
    """Each invariant of the module docstring: held or not, and a message per violation."""
    violations: dict[str, str] = {}
    watch = hostile.watch
    if hostile.error is not None or watch.errors:
        violations["raises"] = hostile.error or watch.errors[0]
    if hostile.error is None and hostile.rounds_done < rounds:
        violations["stall"] = (
            f"{hostile.rounds_done}/{rounds} rounds by virtual time {hostile.virtual_time:.2f} "
            f"(undisturbed: {rounds} by {baseline.virtual_time:.2f}; bound {until:.2f})"
        )
    jump = _jump(baseline.max_round, hostile.max_round, margins.round_margin)
    if jump:
        violations["jump"] = jump
    early_time = hostile.virtual_time < margins.early_fraction * baseline.virtual_time
    early_rounds = hostile.completed < margins.early_fraction * baseline.completed
    if hostile.error is None and (early_time or early_rounds):
        violations["early"] = (
            f"ended at virtual time {hostile.virtual_time:.2f} with {hostile.completed} honest rounds "
            f"completed (undisturbed: {baseline.virtual_time:.2f}, {baseline.completed})"
        )
    if hostile.error is None and not hostile.acc_mean >= baseline.acc_mean - margins.acc_margin:
        violations["accuracy"] = (
            f"honest accuracy {hostile.acc_mean:.3f} vs {baseline.acc_mean:.3f} undisturbed "
            f"(margin {margins.acc_margin})"
        )
    counted = _counted(hostile)
    if counted:
        violations["counted"] = counted
    names = ("raises", "stall", "jump", "early", "accuracy", "counted")
    held = {name: name not in violations for name in names}
    return held, [f"{name}: {message}" for name, message in violations.items()]


def _jump(baseline: dict[int, int], hostile: dict[int, int], margin: int) -> str | None:
    """The first progress at which an honest round ran ahead of the undisturbed run's."""
    ceiling = max(baseline.values(), default=0)
    for progress in sorted(hostile):
        allowed = baseline.get(progress, ceiling) + margin
        if hostile[progress] > allowed:
            return f"an honest peer reached round {hostile[progress]} at progress {progress} (undisturbed at most {allowed - margin}, margin {margin})"
    return None


def _counted(run: RunRecord) -> str | None:
    """Engine's counters, its records and the watch's own count agree; nothing refused got through."""
    watch = run.watch
    records = Counter({k.removeprefix("refused."): v for k, v in run.records.items()})
    if Counter(run.refusals) != watch.refused:
        return f"engine counted {dict(run.refusals)}, the contract refused {dict(watch.refused)}"
    if any(records[k] != v for k, v in watch.refused.items()) or sum(records.values()) != sum(
        watch.refused.values()
    ):
        return f"records say {dict(records)}, the contract refused {dict(watch.refused)}"
    if watch.refused_handled:
        return f"{watch.refused_handled} refused messages reached the protocol"
    return None


#: for reports: refusal reasons in a stable order
REASONS = tuple(r.value for r in Refusal)
