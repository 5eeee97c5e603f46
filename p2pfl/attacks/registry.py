"""Attacks by name, tagged with where a driver applies them.

``get_attack(name, **params)`` returns an :class:`Attack` whose ``kind`` tells the driver
(simulator or node) what to do with it:

- ``"none"``: nothing, the peer is honest;
- ``"data"``: ``attack(x, y) -> (x, y)`` transforms each training batch of the peer;
- ``"model"``: ``attack(ctx) -> vector`` replaces the model the peer sends, given a
  :class:`ModelAttackContext` describing what the attacker knows.

``attack.trains`` is False for the free rider (skip its local training), and
``attack.sybil`` is a :class:`SybilGroup` when one adversary speaks through several
identities (the driver gives each identity a peer id and sends the replicated vectors).

ALIE and IPM compute from honest models, and their ``knowledge`` parameter says which:
``"received"`` (the default) -- only the models the attacker itself received from its
neighbours, in the round it crafts for (or the one before), which is all a real peer can
know; ``"omniscient"`` -- every honest model of the round, the set-up of the papers that
introduced them, which only a simulator can supply (docs/attacks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from p2pfl.attacks.data_poisoning import (
    Backdoor,
    LabelFlip,
    TargetedLabelFlip,
    Trigger,
)
from p2pfl.attacks.model_poisoning import alie, free_rider, gaussian, ipm, scaling, sign_flip
from p2pfl.attacks.schedule import ALWAYS, AttackSchedule, RoundGate
from p2pfl.attacks.sybil import SybilGroup

AttackKind = Literal["none", "data", "model"]
#: what an attacker that uses honest models knows of them (see ``Attack.knowledge``)
KnowledgeMode = Literal["received", "omniscient"]
KNOWLEDGE: tuple[str, ...] = ("received", "omniscient")
#: the attacks that use the honest models they know (and accept ``knowledge``)
KNOWING = frozenset({"alie", "ipm"})


@dataclass(frozen=True)
class ModelAttackContext:
    """What a model-poisoning peer knows when it crafts the vector it sends.

    - ``own`` (d,): the model it would send if honest (after local training);
    - ``reference`` (d,): the model this round started from (before training), the origin
      of update-space attacks and what a free rider sends back;
    - ``honest`` (m, d): the honest models the attacker knows -- by default those it
      received from its neighbours (``knowledge = "received"``), or every honest model of
      the round (``"omniscient"``, which only a simulator can supply); ALIE needs it, IPM
      falls back to ``own`` without it;
    - ``n_total``, ``n_byzantine``: the number of models the victim aggregates and how
      many of them are Byzantine (ALIE's ``z_max``);
    - ``generator``: the random source of noise attacks, for reproducible runs.
    """

    own: Tensor
    reference: Tensor
    honest: Tensor | None = None
    n_total: int | None = None
    n_byzantine: int | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class Attack:
    """A configured attack. Call it as its ``kind`` says (see the module docstring).

    ``schedule`` says in which rounds it is carried out (:mod:`p2pfl.attacks.schedule`);
    ``gate`` is the round the attacker's protocol is training for, set by the Byzantine
    wrapper, which a scheduled data attack's batch transform goes by. Build one attack
    per attacker when the schedule is not ``always`` (the gate is per attacker).
    """

    name: str
    kind: AttackKind
    params: Mapping[str, Any]
    apply: Callable[..., Any] = field(repr=False)
    trains: bool = True
    sybil: SybilGroup | None = None
    schedule: AttackSchedule = ALWAYS
    gate: RoundGate = field(default_factory=RoundGate, repr=False, compare=False)

    def __call__(self, *args: Any) -> Any:
        return self.apply(*args)

    def scheduled(self, schedule: AttackSchedule) -> Attack:
        """This attack carried out in ``schedule``'s rounds only, with a gate of its own.

        A free rider that is honest in some rounds trains (in those it sends what it
        trained; in the others the wrapper sends back the model it started from).
        """
        return replace(
            self,
            schedule=schedule,
            gate=RoundGate(),
            trains=self.trains or not schedule.always,
        )

    def active(self, round_: int) -> bool:
        """Whether the attack is carried out in round ``round_``."""
        return self.schedule.active(round_)

    @property
    def batch_transform(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """What a driver passes to the trainer for this peer's batches (data attacks only)."""
        if self.kind != "data":
            return None
        return self.transform if self.schedule.always else self._gated_transform

    def _gated_transform(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch poisoned only in the schedule's rounds (the gate's round)."""
        if self.schedule.active(self.gate.round):
            return self.apply(x, y)
        return x, y

    @property
    def needs_honest(self) -> bool:
        """Whether crafting uses the honest models the attacker knows (ALIE; IPM when it can)."""
        return self.name in KNOWING

    @property
    def knowledge(self) -> KnowledgeMode | None:
        """What the attacker knows of the honest models: ``"received"`` (what its neighbours
        sent it: the default, all a real node can know) or ``"omniscient"`` (every honest
        model of the round: the papers' set-up, which only a simulator can supply);
        ``None`` for attacks that use no honest models."""
        return self.params.get("knowledge") if self.needs_honest else None

    @property
    def omniscient(self) -> bool:
        """Whether this attacker knows every honest model (``knowledge = "omniscient"``)."""
        return self.knowledge == "omniscient"

    def transform(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Poison one training batch (``kind == "data"``); honest peers' batches pass unchanged."""
        if self.kind == "none":
            return x, y
        if self.kind != "data":
            raise TypeError(f"attack {self.name!r} is a {self.kind} attack, not a batch transform")
        return self.apply(x, y)

    def craft(self, ctx: ModelAttackContext) -> Tensor:
        """The vector to send instead of ``ctx.own`` (``kind == "model"``); ``ctx.own`` otherwise."""
        if self.kind != "model":
            return ctx.own
        return self.apply(ctx)


# ---------------------------------------------------------------- parameter checks

Check = Callable[[str, Any], Any]
_REQUIRED = object()


def _number(low: float, *, strict: bool = False, high: float | None = None) -> Check:
    def check(name: str, value: Any) -> float:
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        ok = ok and (value > low if strict else value >= low)
        ok = ok and (high is None or value <= high)
        if not ok:
            bound = (f"> {low}" if strict else f">= {low}") + (
                f" and <= {high}" if high is not None else ""
            )
            raise ValueError(f"{name} must be a number {bound}, got {value!r}")
        return float(value)

    return check


def _int(low: int) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        return value

    return check


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _choice(*options: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in options:
            raise ValueError(
                f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}"
            )
        return str(value)

    return check


def _optional(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def _passthrough(name: str, value: Any) -> Any:
    return value  # validated by the object it configures (Trigger)


# ---------------------------------------------------------------- the attacks


def _alie(ctx: ModelAttackContext, z: float | None) -> Tensor:
    if ctx.honest is None:
        raise ValueError(
            "alie needs the honest models the attacker knows (honest=): those it received, "
            "or every honest model with knowledge = 'omniscient'"
        )
    if z is None and (ctx.n_total is None or ctx.n_byzantine is None):
        raise ValueError("alie needs n_total and n_byzantine in the context, or a fixed z")
    return alie(ctx.honest, ctx.n_total or 0, ctx.n_byzantine or 0, z)


def _backdoor(p: Mapping[str, Any]) -> Backdoor:
    trigger = Trigger(p["size"], p["value"], p["corner"], p["image_shape"])
    return Backdoor(p["target_label"], p["fraction"], trigger)


def _sybil_flip(p: Mapping[str, Any]) -> LabelFlip | TargetedLabelFlip:
    """Every label flipped, or only ``source`` -> ``target`` when both are given."""
    if (p["source"] is None) != (p["target"] is None):
        raise ValueError("sybil_label_flip: give both source and target, or neither")
    if p["source"] is None:
        return LabelFlip(p["num_classes"])
    for key in ("source", "target"):
        if p[key] >= p["num_classes"]:
            raise ValueError(f"sybil_label_flip: {key} must be < num_classes, got {p[key]}")
    return TargetedLabelFlip(p["source"], p["target"])


@dataclass(frozen=True)
class _Spec:
    kind: AttackKind
    build: Callable[[Mapping[str, Any]], Callable[..., Any]]
    params: Mapping[str, tuple[Any, Check]] = field(default_factory=dict)


_SPECS: dict[str, _Spec] = {
    "none": _Spec("none", lambda p: lambda *args: None),
    "label_flip": _Spec(
        "data", lambda p: LabelFlip(p["num_classes"]), {"num_classes": (_REQUIRED, _int(2))}
    ),
    "targeted_flip": _Spec(
        "data",
        lambda p: TargetedLabelFlip(p["source"], p["target"]),
        {"source": (_REQUIRED, _int(0)), "target": (_REQUIRED, _int(0))},
    ),
    "backdoor": _Spec(
        "data",
        _backdoor,
        {
            "target_label": (_REQUIRED, _int(0)),
            "fraction": (0.5, _number(0.0, high=1.0)),
            "size": (3, _int(1)),
            "value": (1.0, _real),
            "corner": ("bottom_right", _passthrough),
            "image_shape": (None, _passthrough),
        },
    ),
    "sybil_label_flip": _Spec(
        "data",
        _sybil_flip,
        {
            "num_classes": (_REQUIRED, _int(2)),
            "identities": (10, _int(1)),
            "jitter": (0.0, _number(0.0)),
            "source": (None, _optional(_int(0))),
            "target": (None, _optional(_int(0))),
        },
    ),
    "sign_flip": _Spec(
        "model",
        lambda p: lambda ctx: sign_flip(ctx.own, ctx.reference, p["scale"]),
        {"scale": (1.0, _number(0.0, strict=True))},
    ),
    "gaussian": _Spec(
        "model",
        lambda p: lambda ctx: gaussian(ctx.own, p["sigma"], ctx.generator),
        {"sigma": (1.0, _number(0.0))},
    ),
    "scaling": _Spec(
        "model",
        lambda p: lambda ctx: scaling(ctx.own, ctx.reference, p["factor"]),
        {"factor": (10.0, _real)},
    ),
    "alie": _Spec(
        "model",
        lambda p: lambda ctx: _alie(ctx, p["z"]),
        {"z": (None, _optional(_real)), "knowledge": ("received", _choice(*KNOWLEDGE))},
    ),
    "ipm": _Spec(
        "model",
        lambda p: (
            lambda ctx: ipm(ctx.own if ctx.honest is None else ctx.honest, p["eps"], ctx.reference)
        ),
        {
            "eps": (0.5, _number(0.0, strict=True)),
            "knowledge": ("received", _choice(*KNOWLEDGE)),
        },
    ),
    "free_rider": _Spec("model", lambda p: lambda ctx: free_rider(ctx.reference)),
}

#: Every attack name, with the parameters it accepts (see ``get_attack`` for defaults).
ATTACKS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: tuple(spec.params) for name, spec in _SPECS.items()}
)

#: Where each attack is applied: "none", "data" (training batches) or "model" (sent vector).
ATTACK_KINDS: Mapping[str, AttackKind] = MappingProxyType(
    {name: spec.kind for name, spec in _SPECS.items()}
)


def get_attack(name: str, **params: Any) -> Attack:
    """Build the attack called ``name`` (see :data:`ATTACKS`) with ``params``.

    Raises ValueError naming the accepted names, or that attack's accepted parameters,
    when either is unknown; and when a required parameter is missing or a value is invalid.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown attack {name!r}; accepted: {', '.join(sorted(_SPECS))}")
    spec = _SPECS[name]
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(
            f"attack {name!r} does not accept {', '.join(unknown)}; "
            f"accepted parameters: {', '.join(spec.params) or '(none)'}"
        )
    missing = [
        k for k, (default, _) in spec.params.items() if default is _REQUIRED and k not in params
    ]
    if missing:
        raise ValueError(f"attack {name!r} needs {', '.join(missing)}")
    values = {
        key: check(f"{name}: {key}", params.get(key, default))
        for key, (default, check) in spec.params.items()
    }
    sybil = (
        SybilGroup(values["identities"], values["jitter"]) if name == "sybil_label_flip" else None
    )
    return Attack(
        name=name,
        kind=spec.kind,
        params=MappingProxyType(values),
        apply=spec.build(values),
        trains=name != "free_rider",
        sybil=sybil,
    )
