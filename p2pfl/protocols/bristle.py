"""Bristle (Verbraeken, de Vos and Pouwelse, 2021): transfer learning + filtering, decentralized.

Every peer starts from the same pre-trained feature extractor and learns only the output
layer, a linear map from ``h`` features to ``C`` classes; only that layer travels (a few
kilobytes instead of the whole model). The round structure is D-PSGD's: train, send to
every neighbour, wait for them or the round timer. Mixing is Bristle's:

1. **Prioritiser** (:func:`~p2pfl.aggregation.bristle_select`): of the layers received,
   keep the ``keep_closest`` nearest to one's own by L2 distance, plus ``n_random`` others
   drawn at random (to keep discovering useful but distant peers).
2. **Integrator** (:func:`~p2pfl.aggregation.bristle_class_weights`,
   :func:`~p2pfl.aggregation.bristle_integrate`): each kept layer is evaluated on the
   peer's small local test set (its *probe*), giving a recall per class; for each class a
   peer's row is weighted by how its recall compares with one's own, and the rows are
   averaged class by class (own weight 1). For a class absent from the probe nothing can be
   checked: a peer then gets its mean weight over the classes that could be -- one good
   where we can check is trusted where we cannot.

The extractor is frozen, so the probe's features never change: the driver computes them
once (``probe_features`` ``(m, h)``, with ``probe_labels`` ``(m,)``) and the protocol
evaluates output layers with one matrix product, without any model code.

Freezing: the driver trains the whole vector (``Train`` effects carry the full model);
the protocol then puts the frozen feature parameters back, so only the output layer's
change survives. That equals training the output layer alone up to the small drift of
the features during one round's local steps (exact freezing would need a trainer that
masks gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from p2pfl.aggregation import bristle_class_weights, bristle_integrate, bristle_select
from p2pfl.protocols.base import (
    CancelTimer,
    Effect,
    Message,
    PeerId,
    Record,
    RoundCompleted,
    Send,
    SetTimer,
    TrainingDone,
)
from p2pfl.protocols.dpsgd import DPSGD
from p2pfl.protocols.synchronous import MODEL, ROUND_TIMER

if TYPE_CHECKING:
    from p2pfl.model import ParamLayout


@dataclass(frozen=True)
class OutputLayer:
    """Where the output layer ``nn.Linear(features, classes)`` lives in the flat vector."""

    weight_offset: int
    bias_offset: int
    classes: int
    features: int

    @classmethod
    def from_layout(cls, layout: ParamLayout) -> OutputLayer:
        """The output layer of a model's ``ParamLayout`` (its last ``nn.Linear``)."""
        weight_name, bias_name = layout.output_layer_names()
        classes, features = layout.shapes[layout.index(weight_name)]
        return cls(
            layout.slice_of(weight_name).start, layout.slice_of(bias_name).start, classes, features
        )

    @property
    def numel(self) -> int:
        """Length of the exchanged vector: the class rows ``(C, h + 1)`` flattened."""
        return self.classes * (self.features + 1)

    def rows(self, full: Tensor) -> Tensor:
        """Class rows ``(C, h + 1)`` (weights, then bias) of a full parameter vector."""
        c, h = self.classes, self.features
        weight = full[self.weight_offset : self.weight_offset + c * h].reshape(c, h)
        bias = full[self.bias_offset : self.bias_offset + c].reshape(c, 1)
        return torch.cat([weight, bias], dim=1)

    def replace(self, full: Tensor, rows: Tensor) -> Tensor:
        """A copy of ``full`` whose output layer is ``rows`` ``(C, h + 1)``."""
        c, h = self.classes, self.features
        out = full.clone()
        out[self.weight_offset : self.weight_offset + c * h] = rows[:, :h].reshape(-1)
        out[self.bias_offset : self.bias_offset + c] = rows[:, h]
        return out


class Bristle(DPSGD):
    """D-PSGD over output layers, with distance-based selection and per-class weighting."""

    name = "bristle"

    def __init__(
        self,
        peer_id: PeerId,
        params: Tensor,
        neighbours: list[PeerId],
        *,
        output: OutputLayer,
        probe_features: Tensor,
        probe_labels: Tensor,
        keep_closest: int = 4,
        n_random: int = 1,
        tolerance: float = 0.1,
        local_steps: int = 1,
        round_timeout: float = 10.0,
        catch_up: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            peer_id,
            params,
            neighbours,
            local_steps=local_steps,
            round_timeout=round_timeout,
            catch_up=catch_up,
            seed=seed,
        )
        if probe_features.dim() != 2 or probe_features.shape[1] != output.features:
            raise ValueError(
                f"probe_features must be (m, {output.features}), got {tuple(probe_features.shape)}"
            )
        if probe_labels.shape != probe_features.shape[:1]:
            raise ValueError(
                f"probe_labels must be ({probe_features.shape[0]},), got {tuple(probe_labels.shape)}"
            )
        for key, value in (("keep_closest", keep_closest), ("n_random", n_random)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        self.output = output
        self.frozen = params.detach().clone()  # the feature extractor lives here
        self.probe_features = probe_features.to(torch.float32)
        self.probe_labels = probe_labels.to(torch.int64)
        self.keep_closest = keep_closest
        self.n_random = n_random
        self.tolerance = float(tolerance)
        support = torch.bincount(self.probe_labels, minlength=output.classes)[: output.classes]
        self._support = support.to(torch.float64)

    def message_params(self, full: Tensor) -> Tensor:
        """What travels for a full parameter vector: its output layer's class rows, flat."""
        return self.output.rows(full).reshape(-1)

    # -- rounds -------------------------------------------------------------------------------
    def _on_trained(self, event: TrainingDone) -> list[Effect]:
        if self.phase != "training" or event.ticket != self._next_ticket:
            return []
        # keep the trained output layer, put the frozen features back
        self.trained = self.output.replace(self.frozen, self.output.rows(event.params))
        self.phase = "collecting"
        message = Message(MODEL, self.round, self.message_params(self.trained))
        effects: list[Effect] = [Send(peer, message) for peer in self._recipients()]
        effects.append(SetTimer(ROUND_TIMER, event.now + self.round_timeout))
        effects.append(Record("train_loss", event.loss))
        effects.extend(self._maybe_finish(event.now))
        return effects

    def _finish_round(self, now: float, *, timed_out: bool) -> list[Effect]:
        assert self.trained is not None
        received = self.inbox.pop(self.round, {})
        size = self.output.numel
        senders = [p for p in sorted(received) if received[p].numel() == size]
        effects: list[Effect] = [CancelTimer(ROUND_TIMER)]
        if len(senders) < len(received):
            effects.append(Record("bristle.malformed", float(len(received) - len(senders))))
        own_rows = self.output.rows(self.trained)
        if senders:
            shape = own_rows.shape
            others = torch.stack([received[p].reshape(shape) for p in senders]).to(own_rows.dtype)
            picked = bristle_select(own_rows, others, self.keep_closest, self.n_random, self.rng)
            kept = others[picked]
            weights = self.class_weights(own_rows, kept)
            new_rows = bristle_integrate(own_rows, kept, weights)
            self.params = self.output.replace(self.trained, new_rows)
            effects.append(Record("bristle.kept", float(len(picked))))
            effects.append(Record("bristle.class_weight", float(weights.mean())))
        else:
            self.params = self.trained
        finished = self.round
        self.round += 1
        for stale in [r for r in self.inbox if r < self.round]:
            del self.inbox[stale]
        effects += [Record("received_models", float(len(senders))), RoundCompleted(finished)]
        if timed_out:
            effects.append(Record("round_timeouts", 1.0))
        effects.extend(self._start_round())
        return effects

    # -- the integrator's inputs ------------------------------------------------------------
    def recalls(self, rows: Tensor) -> Tensor:
        """Per-class recall ``(k, C)`` on the probe of ``k`` output layers ``(k, C, h + 1)``.

        NaN for the classes absent from the probe.
        """
        h = self.output.features
        logits = (
            torch.einsum("mh,kch->kmc", self.probe_features, rows[:, :, :h]) + rows[:, None, :, h]
        )
        hits = (logits.argmax(dim=-1) == self.probe_labels).to(torch.float64)  # (k, m)
        per_class = torch.zeros(rows.shape[0], self.output.classes, dtype=torch.float64)
        per_class.index_add_(1, self.probe_labels, hits)
        return per_class / self._support  # 0 / 0 = NaN where the class is absent

    def class_weights(self, own_rows: Tensor, kept: Tensor) -> Tensor:
        """Bristle's per-class weights ``(k, C)`` of the kept layers against one's own."""
        k, classes = kept.shape[0], self.output.classes
        known = self._support > 0
        if not bool(known.any()) or k == 0:
            return torch.ones(k, classes, dtype=torch.float64)
        recalls = self.recalls(torch.cat([own_rows[None], kept]))
        weights = torch.ones(k, classes, dtype=torch.float64)
        weights[:, known] = bristle_class_weights(
            recalls[0, known], recalls[1:, known], self.tolerance
        )
        if not bool(known.all()):
            weights[:, ~known] = weights[:, known].mean(dim=1, keepdim=True)
        return weights

    # -- checkpoints --------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.frozen = self.params.detach().clone()  # features never change: they are saved
