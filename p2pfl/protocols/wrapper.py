"""A protocol around another one: what a driver sees is the inner protocol's.

Behaviours that act on a peer's traffic without changing its honest code (a Byzantine
attack that rewrites the models it sends, the fuzzer's hostile peer that adds messages of
its own) wrap its protocol object. The wrapper is itself a :class:`Protocol`: it hands the
driver the inner protocol's whole contract, explicitly, so a driver never needs to know it
runs a wrapper (no ``__getattr__`` forwarding, which would hide a contract the wrapper
forgot). Setters write through, so the wrapper and the inner protocol never disagree.
Subclasses override ``handle`` (and ``report``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from p2pfl.protocols.base import Effect, Event, Message, PeerId, Protocol
from p2pfl.protocols.contract import MessageSpec, Refusal, Role

__all__ = ["ProtocolWrapper"]


class ProtocolWrapper(Protocol):
    """Delegates the protocol contract to ``inner``; ``handle`` passes events through."""

    def __init__(self, inner: Protocol) -> None:
        # no ``super().__init__``: the identity, model, round and neighbours are the inner
        # protocol's (properties below), never copies that could drift from it
        self.inner = inner

    def handle(self, event: Event) -> list[Effect]:
        return self.inner.handle(event)

    # -- the inner protocol's contract ---------------------------------------------------
    @property
    def name(self) -> str:
        return self.inner.name

    @name.setter
    def name(self, value: str) -> None:
        self.inner.name = value

    @property
    def peer_id(self) -> PeerId:
        return self.inner.peer_id

    @peer_id.setter
    def peer_id(self, value: PeerId) -> None:
        self.inner.peer_id = value

    @property
    def params(self) -> Tensor:
        return self.inner.params

    @params.setter
    def params(self, value: Tensor) -> None:
        self.inner.params = value

    @property
    def round(self) -> int:
        return self.inner.round

    @round.setter
    def round(self, value: int) -> None:
        self.inner.round = value

    @property
    def neighbours(self) -> list[PeerId]:
        return self.inner.neighbours

    @neighbours.setter
    def neighbours(self, value: list[PeerId]) -> None:
        self.inner.neighbours = value

    def screen(self, sender: PeerId, message: Message) -> Refusal | None:
        return self.inner.screen(sender, message)

    def message_spec(self, kind: str) -> MessageSpec | None:
        return self.inner.message_spec(kind)

    @property
    def message_dim(self) -> int:
        return self.inner.message_dim

    def message_params(self, full: Tensor) -> Tensor:
        return self.inner.message_params(full)

    def has_role(self, role: Role, sender: PeerId, message: Message) -> bool:
        return self.inner.has_role(role, sender, message)

    @property
    def settled(self) -> bool:
        return self.inner.settled

    def leave(self, now: float) -> list[Effect]:
        return self.inner.leave(now)

    def withhold(self, peers: Iterable[PeerId]) -> None:
        self.inner.withhold(peers)

    def report(self) -> dict[str, Any]:
        return self.inner.report()

    def use_stream(self, label: str) -> None:
        self.inner.use_stream(label)

    # -- checkpoints: the inner protocol's state is the peer's state --------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
