"""Compressed models: a protocol wrapper that encodes every tensor a peer sends.

The codec is applied here, at the protocol's edge, and nowhere else, so that both
drivers see the same lossy models: the assembly of a peer (:mod:`p2pfl.peer`) wraps the
protocol of every peer, simulated or real, in :class:`CompressedProtocol` when the
configuration names a codec (``protocol.codec``). Each model a peer sends is encoded once
into an :class:`~p2pfl.codecs.EncodedMessage`: its ``params`` are the *decoded* tensor,
its ``encoding`` the payload. A node's wire sends that payload as it is and its receiver
decodes it back into the very same tensor; the simulator hands the receiver ``params``
and counts the payload's size. So a simulated peer and a node receive identical models,
and the simulator's byte counts are those of the encoded messages.

fp16 and int8 encode the model itself; they need no state. Top-k of a model would zero
99% of it, so top-k sends the *change* of a model instead (as CHOCO-SGD does): sender and
receiver keep, per pair of peers and message kind, a copy of what the receiver holds of
the sender's model (both start from the shared start model); a message carries the
``k`` largest entries of ``model - copy``, and both add that to their copy; the receiver's
protocol is handed the copy, a whole model. With ``error_feedback`` the sender's copy is
exactly the receiver's, so what top-k left out (the residual ``model - copy``) is sent in
later messages, as in EF-SGD; without it the sender takes its own model as the receiver's
copy, and what was left out is lost (the copies drift: the baseline EF corrects).

Copies agree only if every message sent arrives. A failed send (``SendFailed``) makes
the next message to that peer whole (float32, no codec), which resets the receiver's copy;
``refresh = r`` sends every ``r``-th message to a peer whole, which bounds how long a
silent loss (the simulator's ``network.loss``, a node's guard dropping a stale message)
keeps the copies apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from p2pfl.codecs import Codec, EncodedMessage, Encoding, Fp16Codec, Int8Codec, TopKCodec
from p2pfl.protocols.base import (
    Effect,
    Event,
    Message,
    MessageReceived,
    PeerId,
    Protocol,
    Record,
    Send,
    SendFailed,
)
from p2pfl.protocols.contract import Refusal
from p2pfl.protocols.wrapper import ProtocolWrapper

if TYPE_CHECKING:  # the configuration is read, never imported at run time
    from p2pfl.config import CodecConfig

__all__ = ["CompressedProtocol", "codec_from_config", "compress"]

#: a pair's copy: (the other peer, message kind)
_Key = tuple[PeerId, str]
_STATE_KEY = "codec_copies"


def codec_from_config(config: CodecConfig) -> Codec | None:
    """The codec ``config`` names; ``None`` for fp32 (models travel raw, unwrapped)."""
    if config.name == "fp16":
        return Fp16Codec()
    if config.name == "int8":
        return Int8Codec(chunk=config.chunk)
    if config.name == "topk":
        if config.k is not None:
            return TopKCodec(k=config.k)
        return TopKCodec(ratio=config.fraction if config.fraction is not None else 0.01)
    return None


def compress(protocol: Protocol, config: CodecConfig) -> Protocol:
    """``protocol`` wrapped to send its models through the configured codec (unchanged
    for fp32)."""
    codec = codec_from_config(config)
    if codec is None:
        return protocol
    return CompressedProtocol(
        protocol,
        codec,
        delta=config.name == "topk",
        error_feedback=config.error_feedback,
        refresh=config.refresh,
    )


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain float32 copy (the simulator's pooled rows and pending means included)."""
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.detach().reshape(-1).to(torch.float32, copy=True)


class CompressedProtocol(ProtocolWrapper):
    """``inner``, its outgoing tensors encoded by ``codec``; with ``delta``, per-pair copies
    (see the module docstring) turn sent changes and received changes into whole models."""

    def __init__(
        self,
        inner: Protocol,
        codec: Codec,
        *,
        delta: bool = False,
        error_feedback: bool = False,
        refresh: int = 0,
    ) -> None:
        super().__init__(inner)
        self.codec = codec
        self.delta = delta
        self.error_feedback = error_feedback
        self.refresh = refresh
        start = _plain(inner.params)
        dim = inner.message_dim
        # every peer starts from the same model: the copies' common starting point
        self._base = _plain(inner.message_params(start)) if start.numel() else start
        if self._base.numel() != dim:
            self._base = torch.zeros(dim)
        #: sender side: what each receiver holds of our tensors; ``None``: send it whole
        self._sent: dict[_Key, torch.Tensor | None] = {}
        #: the copy of a pair not in ``_sent``: the start model (``None`` after a restart
        #: from a checkpoint without copies: whole messages first)
        self._first: torch.Tensor | None = self._base
        self._sent_count: dict[_Key, int] = {}
        #: receiver side: what we hold of each sender's tensors
        self._received: dict[_Key, torch.Tensor] = {}
        #: a message screened and accepted, with the whole model it stands for
        self._pending: tuple[Message, Message] | None = None
        self.fallbacks = 0

    # -- receiving -------------------------------------------------------------------------
    def screen(self, sender: PeerId, message: Message) -> Refusal | None:
        spec = self.inner.message_spec(message.kind) if self.delta else None
        if (
            spec is None  # not top-k, or a kind the contract refuses anyway
            or not spec.tensor
            or message.params is None
            # a copy is kept only for a declared kind from a peer that may send it
            or not self.inner.has_role(spec.sender, sender, message)
        ):
            return self.inner.screen(sender, message)
        whole = self._rebuild(sender, message)
        if whole is None:
            return Refusal.BAD_TENSOR
        # the copy follows what was sent, used or not, as the sender's does
        self._received[(sender, message.kind)] = whole.params  # type: ignore[assignment]
        verdict = self.inner.screen(sender, whole)
        self._pending = (message, whole) if verdict is None else None
        return verdict

    def _rebuild(self, sender: PeerId, message: Message) -> Message | None:
        """The whole model ``message`` stands for: a change added to our copy (top-k), or
        the message itself when it travelled whole; ``None`` when it cannot be added."""
        encoding = message.encoding if isinstance(message, EncodedMessage) else None
        if encoding is None or encoding.codec != self.codec.name:
            return message
        change = message.params
        copy = self._received.get((sender, message.kind), self._base)
        if (
            not isinstance(change, torch.Tensor)
            or change.dtype is not torch.float32
            or change.shape != copy.shape
        ):
            return None
        return Message(message.kind, message.round, copy + change, message.meta)

    # -- the event loop --------------------------------------------------------------------
    def handle(self, event: Event) -> list[Effect]:
        if self.delta:
            if type(event) is MessageReceived and event.message.params is not None:
                whole = self._whole(event)
                if whole is None:
                    return [Record("codec.unreadable", 1.0)]
                event = MessageReceived(event.now, event.sender, whole)
            elif isinstance(event, SendFailed):
                # it may or may not have arrived: the next message to it travels whole
                for key in [key for key in self._sent if key[0] == event.to]:
                    self._sent[key] = None
        return self._encode(self.inner.handle(event))

    def _whole(self, event: MessageReceived) -> Message | None:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is event.message:
            return pending[1]
        whole = self._rebuild(event.sender, event.message)  # handed to us unscreened
        if whole is not None:
            self._received[(event.sender, event.message.kind)] = whole.params  # type: ignore[assignment]
        return whole

    def leave(self, now: float) -> list[Effect]:
        return self._encode(self.inner.leave(now))

    # -- sending ---------------------------------------------------------------------------
    def _encode(self, effects: list[Effect]) -> list[Effect]:
        if not any(type(e) is Send and e.message.params is not None for e in effects):
            return effects
        out: list[Effect] = []
        # a broadcast sends one message object to many peers: encoded once (stateless codecs)
        encoded: dict[int, tuple[Message, Message]] = {}
        for effect in effects:
            if type(effect) is not Send or effect.message.params is None:
                out.append(effect)
                continue
            message = effect.message
            if self.delta:
                sent = self._change(effect.to, message)
            else:
                known = encoded.get(id(message))
                if known is None:
                    known = (message, self._encoded(message, effect.message.params))
                    encoded[id(message)] = known
                sent = known[1]
            if sent is message:
                out.append(Record("codec.uncompressed", 1.0))
            out.append(Send(effect.to, sent))
        return out

    def _encoded(self, message: Message, vector: torch.Tensor) -> Message:
        """``message`` carrying ``decode(encode(vector))``; the message itself (raw float32)
        when the codec refuses ``vector`` (NaN, beyond float16): receivers judge it."""
        try:
            payload, meta = self.codec.encode(vector)
        except ValueError:
            self.fallbacks += 1
            return message
        decoded = self.codec.decode(payload, meta, vector.numel())
        return EncodedMessage.of(message, decoded, Encoding(self.codec.name, payload, meta))

    def _change(self, to: PeerId, message: Message) -> Message:
        """The change of ``message``'s tensor since ``to``'s copy, top-k encoded."""
        key = (to, message.kind)
        model = _plain(message.params)  # type: ignore[arg-type]
        count = self._sent_count.get(key, 0) + 1
        self._sent_count[key] = count
        copy = self._sent.get(key, self._first)
        if copy is None or (self.refresh and count % self.refresh == 0):
            self._sent[key] = model  # it travels whole: the receiver's copy becomes it
            return message
        if copy.shape != model.shape:
            self._sent[key] = model
            return message
        sent = self._encoded(message, model - copy)
        if sent is message:  # not encodable (NaN): whole, and the copy with it
            self._sent[key] = model
            return message
        assert sent.params is not None
        self._sent[key] = copy + sent.params if self.error_feedback else model
        return sent

    # -- status and checkpoints --------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        report = dict(self.inner.report())
        report["codec"] = self.codec.name
        if self.fallbacks:
            report["codec_refused"] = self.fallbacks
        return report

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.inner.state_dict())
        if self.delta:
            state[_STATE_KEY] = {
                "sent": [[p, k, t] for (p, k), t in self._sent.items() if t is not None],
                "whole": [[p, k] for (p, k), t in self._sent.items() if t is None],
                "received": [[p, k, t] for (p, k), t in self._received.items()],
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        copies = state.pop(_STATE_KEY, None)
        self.inner.load_state_dict(state)
        self._sent.clear()
        self._received.clear()
        if copies is None:
            self._first = None
            return
        self._first = self._base
        for peer, kind, tensor in _entries(copies.get("sent", ())):
            self._sent[(peer, kind)] = tensor
        for peer, kind in copies.get("whole", ()):
            self._sent[(str(peer), str(kind))] = None
        for peer, kind, tensor in _entries(copies.get("received", ())):
            self._received[(peer, kind)] = tensor


def _entries(items: Iterable[Any]) -> Iterable[tuple[PeerId, str, torch.Tensor]]:
    for item in items:
        peer, kind, tensor = item
        yield str(peer), str(kind), tensor.to(torch.float32)
