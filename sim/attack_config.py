"""The scenario's ``[attack]`` table: a configuration class only.

Apart from :mod:`sim.adversary` (which carries the attack out) so that
:mod:`sim.scenario` can hold it without importing the runtime: configuration modules are
imported by runtime modules, never the reverse. ``sim.adversary`` re-exports it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from p2pfl.config import MAX_SEED, PLACEHOLDER_CLASSES, AttackOptions

__all__ = ["AttackConfig"]


class AttackConfig(AttackOptions):
    """The scenario's ``[attack]`` table; see :mod:`sim.adversary`.

    ``name``, ``params``, ``isolate`` and ``delay`` (and their checks, and ``build``) are
    :class:`p2pfl.config.AttackOptions`, shared with a node's ``[attack]`` section.
    """

    #: Byzantine peers as a fraction of the graph's peers (Sybil: of all peers)
    fraction: float | None = Field(None, ge=0, lt=1)
    #: Byzantine peers as a count (not for Sybil attacks: use ``identities``)
    count: int | None = Field(None, ge=0)
    #: which peers are Byzantine (and which honest peers Sybil identities attach to)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    #: Sybil attacks: the number of identities (overrides params.identities and fraction)
    identities: int | None = Field(None, ge=1)
    #: Sybil attacks: honest peers each identity links to
    attach: int = Field(3, ge=1)
    #: Sybil attacks: how the adversary's one data set and one device's training are
    #: spread over its identities (sim.adversary, docs/attacks.md): "shared" (the default:
    #: one training a round, every identity sends it, each declares 1/identities of the
    #: data) or "split" (each identity trains on its own 1/identities of the data, for
    #: local_steps / identities steps, and sends its own model)
    budget: Literal["shared", "split"] | None = None
    #: (isolate: default None, on for Sybil identities only)

    @model_validator(mode="after")
    def _check(self) -> AttackConfig:
        if self.fraction is not None and self.count is not None:
            raise ValueError("give fraction or count, not both")
        attack = self.build(PLACEHOLDER_CLASSES)
        if attack.sybil is not None and self.count is not None:
            raise ValueError(
                f"{self.name} adds identities: give identities (or fraction), not count"
            )
        if attack.sybil is None and self.identities is not None:
            raise ValueError(f"identities is for Sybil attacks; {self.name} is not one")
        if attack.sybil is None and self.budget is not None:
            raise ValueError(f"budget is for Sybil attacks; {self.name} is not one")
        if attack.kind == "none":  # a forgotten name: the run would be silently honest
            given = [key for key in ("fraction", "count", "identities") if getattr(self, key) is not None]
            if given:
                raise PydanticCustomError(
                    "attack_none",
                    "{key} is set but no attack is named (name = 'none'); name one, e.g. sign_flip",
                    {"key": given[0]},
                )
        if (
            attack.kind != "none"
            and attack.sybil is None
            and self.fraction is None
            and self.count is None
        ):
            raise ValueError(
                f"attack {self.name!r} needs fraction or count (how many peers are Byzantine)"
            )
        return self
