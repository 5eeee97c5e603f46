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

The shared extractor is built by every driver the same way (:func:`pretrain_extractor`):
SGD from ``init_params(seed)`` on a public split of the training set drawn with the seed,
then the output layer is put back to its fresh initialisation. Every peer configured
with the same seed (simulated peers, or real nodes) thus starts from the same vector
without exchanging it (on different machines, float rounding may differ in the last
bits; only output layers travel, so that does not matter); :func:`probe_set` draws each
peer's probe from its own samples.

Freezing: the driver trains the whole vector (``Train`` effects carry the full model);
the protocol then puts the frozen feature parameters back, so only the output layer's
change survives. That equals training the output layer alone up to the small drift of
the features during one round's local steps (exact freezing would need a trainer that
masks gradients).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Unpack

import numpy as np
import torch
from torch import Tensor, nn

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
from p2pfl.protocols.synchronous import MODEL, ROUND_TIMER, RoundSettings

if TYPE_CHECKING:
    from p2pfl.learning import LocalTrainer
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
        round_timeout: float = 10.0,
        **settings: Unpack[RoundSettings],
    ) -> None:
        super().__init__(peer_id, params, neighbours, round_timeout=round_timeout, **settings)
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

    @property
    def message_dim(self) -> int:
        """Elements of the model a message carries (a driver checks incoming tensors)."""
        return self.output.numel

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


# ---------------------------------------------------------------- drivers' set-up


@dataclass(frozen=True)
class SharedExtractor:
    """Bristle's shared start: ``start`` (pre-trained features, fresh output layer), where
    the output layer lives, and the frozen feature extractor as a module."""

    start: Tensor
    output: OutputLayer
    extractor: nn.Module

    def extras(self, probe_features: Tensor, probe_labels: Tensor) -> dict[str, Any]:
        """``build_protocol``'s Bristle extras for a peer with this probe set."""
        return {
            "output": self.output,
            "probe_features": probe_features,
            "probe_labels": probe_labels,
        }

    def empty_probe(self) -> tuple[Tensor, Tensor]:
        """The probe of a peer without data."""
        return torch.zeros(0, self.output.features), torch.zeros(0, dtype=torch.int64)


def pretrain_extractor(
    trainer: LocalTrainer,
    init: Tensor,
    *,
    seed: int,
    pretrain_samples: int,
    pretrain_steps: int,
) -> SharedExtractor:
    """The shared extractor: ``pretrain_steps`` SGD steps from ``init`` on a public split of
    ``pretrain_samples`` training samples drawn with ``seed``; the output layer is then
    reset to ``init``'s, so the classifier is learned in the network.

    Deterministic in (data, model, ``init``, seed): every peer computes the same vector.
    """
    from p2pfl.learning import BatchSampler

    n_train = len(trainer.y)
    rng = np.random.default_rng([seed, 0x9B1C])
    public = np.sort(rng.choice(n_train, min(pretrain_samples, n_train), replace=False))
    start = init
    if pretrain_steps:
        sampler = BatchSampler(public, trainer.batch_size, int(rng.integers(2**62)))
        start, _ = trainer.train(init, sampler, pretrain_steps)
    output = OutputLayer.from_layout(trainer.layout)
    start = output.replace(start, output.rows(init))
    return SharedExtractor(start, output, feature_extractor(trainer.model, start))


def probe_set(
    shared: SharedExtractor,
    x_train: Tensor,
    y_train: Tensor,
    own: np.ndarray,
    probe_samples: int,
    *,
    seed: int,
    peer: int,
) -> tuple[Tensor, Tensor]:
    """Features and labels of a peer's probe: ``probe_samples`` of its own samples ``own``
    (indices into the training set), drawn with ``(seed, peer)``; all of them if fewer."""
    own = np.asarray(own)
    if len(own) > probe_samples:
        pick = np.sort(
            np.random.default_rng([seed, 0x9B0E, peer]).choice(own, probe_samples, replace=False)
        )
    else:
        pick = own
    index = torch.from_numpy(pick.astype(np.int64))
    with torch.no_grad():
        features = shared.extractor(x_train.index_select(0, index))
    return features, y_train.index_select(0, index)


def feature_extractor(model: nn.Module, params: Tensor) -> nn.Module:
    """``model`` loaded with ``params``, without its output layer (the last child)."""
    from p2pfl.model import load_flat

    net = copy.deepcopy(model)
    load_flat(net, params)
    children = list(net.children())
    if not isinstance(net, nn.Sequential) or not isinstance(children[-1], nn.Linear):
        raise ValueError("bristle needs a Sequential model whose last layer is the output Linear")
    return nn.Sequential(*children[:-1]).eval()
