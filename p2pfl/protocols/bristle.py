"""Bristle (Verbraeken, de Vos and Pouwelse, 2021): transfer learning + filtering, decentralized.

Every peer starts from the same pre-trained feature extractor and learns only the output
layer, a linear map from ``h`` features to ``C`` classes; only that layer travels (a few
kilobytes instead of the whole model). The round structure is D-PSGD's: train, send to
every neighbour, wait for them or the round timer. Mixing is Bristle's:

1. **Prioritiser** (:func:`~p2pfl.aggregation.bristle_select`): of the layers received,
   keep the ``keep_closest`` nearest to one's own by L2 distance, plus ``n_random`` others
   drawn at random (exploration: useful peers are far while their classes differ).
2. **Integrator** (:meth:`Bristle.class_weights`, :func:`~p2pfl.aggregation.bristle_integrate`):
   each kept layer is scored class by class on the peer's small test set (its *probe*)
   and its rows are averaged class by class with one's own (own weight 1). Row ``c`` of a
   layer must pass two checks against one's own layer: the layer's recall on class ``c``,
   and the accuracy of one's own layer with that row swapped in (a row that claims every
   sample has recall 1 but takes the other classes' samples). A class absent from the
   probe has only the second check.

The probe is either the paper's "small set of i.i.d. test samples" (``probe = "iid"``:
drawn from a pool of the task's training set that no peer holds) or a sample of the
peer's own data (``"own"``: only its own classes can be checked for recall).

Local training moves only the rows of the classes the peer holds data of
(``OutputLayer.trained_classes``): the others are put back after each local training,
as the frozen features are. Softmax training on two classes pushes the eight other rows
down every step, which erased what the neighbours had taught about them.

The extractor is frozen, so the probe's features never change: the driver computes them
once (``probe_features`` ``(m, h)``, with ``probe_labels`` ``(m,)``) and the protocol
evaluates output layers with one matrix product, without any model code.

The shared start is built by every driver the same way (:func:`shared_start`): SGD on a
public dataset (e.g. Fashion-MNIST for an MNIST task; or a split of the task's training
set held out of every share), from an initialisation of its own, then the output layer
of the run's fresh model ``init_params(seed)``. Every peer configured with the same seed
(simulated peers, or real nodes) thus starts from the same vector without exchanging it
(on different machines, float rounding may differ in the last bits; only output layers
travel, so that does not matter). Any protocol can start from the same vector
(``protocol.shared_start``); :func:`probe_set` draws each peer's probe.

Freezing: the driver trains the whole vector (``Train`` effects carry the full model);
the protocol then puts the frozen feature parameters back, so only the output layer's
change survives. That equals training the output layer alone up to the small drift of
the features during one round's local steps (exact freezing would need a trainer that
masks gradients).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
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
    from p2pfl.config import SharedStartConfig
    from p2pfl.learning import LocalTrainer
    from p2pfl.model import ParamLayout


@dataclass(frozen=True)
class OutputLayer:
    """Where the output layer ``nn.Linear(features, classes)`` lives in the flat vector."""

    weight_offset: int
    bias_offset: int
    classes: int
    features: int
    #: the classes of this peer's own data, the only rows its local training may move
    #: (``None``: all; see :meth:`Bristle._on_trained`)
    trained_classes: tuple[int, ...] | None = None

    def for_classes(self, classes: Iterable[int]) -> OutputLayer:
        """This layer, as a peer holding data of ``classes`` trains it."""
        return dataclasses.replace(self, trained_classes=tuple(sorted({int(c) for c in classes})))

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
        rows = self.output.rows(event.params)
        familiar = self._trained_mask()
        if bool(familiar.any()):
            # and the rows of the classes this peer holds no data of: local steps only push
            # them down (softmax), erasing what the neighbours taught about those classes
            rows[~familiar] = self.output.rows(self.params)[~familiar]
        self.trained = self.output.replace(self.frozen, rows)
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

    def _trained_mask(self) -> Tensor:
        """The rows local training may move: the own data's classes (when the driver says
        which), else the classes of the probe (drawn from the own data)."""
        if self.output.trained_classes is None:
            return self._support > 0
        mask = torch.zeros(self.output.classes, dtype=torch.bool)
        mask[list(self.output.trained_classes)] = True
        return mask

    # -- the integrator's inputs ------------------------------------------------------------
    def recalls(self, rows: Tensor) -> Tensor:
        """Per-class recall ``(k, C)`` on the probe of ``k`` output layers ``(k, C, h + 1)``.

        NaN for the classes absent from the probe.
        """
        hits = (self._logits(rows).argmax(dim=-1) == self.probe_labels).to(torch.float64)
        per_class = torch.zeros(rows.shape[0], self.output.classes, dtype=torch.float64)
        per_class.index_add_(1, self.probe_labels, hits)
        return per_class / self._support  # 0 / 0 = NaN where the class is absent

    def _logits(self, rows: Tensor) -> Tensor:
        """Logits ``(k, m, C)`` on the probe of ``k`` output layers ``(k, C, h + 1)``."""
        h = self.output.features
        rows = rows.to(self.probe_features.dtype)
        return (
            torch.einsum("mh,kch->kmc", self.probe_features, rows[:, :, :h]) + rows[:, None, :, h]
        )

    def class_weights(self, own_rows: Tensor, kept: Tensor) -> Tensor:
        """Bristle's per-class weights ``(k, C)`` of the kept layers against one's own.

        Row ``c`` of a kept layer passes two checks on the probe, each weighted by
        :func:`~p2pfl.aggregation.bristle_class_weights` against one's own layer, and gets
        the smaller weight:

        - its class: the layer's recall on class ``c`` (0 if the row never recognises
          its class; skipped, weight 1, for a class absent from the probe: nothing to
          check it on);
        - the rest of one's model: the accuracy of one's own layer with row ``c`` swapped
          in (:meth:`swap_accuracy`). Recall alone trusts a row that claims every sample
          (recall 1); such a row takes the other classes' samples here and is refused,
          while a good row of a class one holds no data of is taken.
        """
        k, classes = kept.shape[0], self.output.classes
        known = self._support > 0
        if not bool(known.any()) or k == 0:
            return torch.ones(k, classes, dtype=torch.float64)
        recalls = self.recalls(torch.cat([own_rows[None], kept]))
        by_class = torch.ones(k, classes, dtype=torch.float64)
        by_class[:, known] = bristle_class_weights(
            recalls[0, known], recalls[1:, known], self.tolerance
        )
        # a row that never recognises its class is no help, however harmless it looks
        # (a row of huge negative weights passes "no worse than ours" on a class we do
        # not know, and would silence that class in the average)
        by_class[:, known] *= (recalls[1:, known] > 0).to(torch.float64)
        own_accuracy, swapped = self.swap_accuracy(own_rows, kept)
        by_model = bristle_class_weights(
            own_accuracy.expand(classes), swapped.reshape(k, classes), self.tolerance
        )
        return torch.minimum(by_class, by_model)

    def swap_accuracy(self, own_rows: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Probe accuracy of one's own layer ``(C, h + 1)`` (a scalar tensor), and ``(k, C)``
        that of one's own layer with row ``c`` replaced by kept layer ``p``'s row ``c``."""
        logits = self._logits(torch.cat([own_rows[None], kept]))  # (1 + k, m, C)
        own, peers = logits[0], logits[1:]
        labels = self.probe_labels
        own_accuracy = (own.argmax(dim=-1) == labels).to(torch.float64).mean()
        k, classes = kept.shape[0], self.output.classes
        swapped = torch.empty(k, classes, dtype=torch.float64)
        for c in range(classes):
            mixed = own.expand(k, -1, -1).clone()
            mixed[:, :, c] = peers[:, :, c]
            swapped[:, c] = (mixed.argmax(dim=-1) == labels).to(torch.float64).mean(dim=1)
        return own_accuracy, swapped

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
    #: indices (into the task's training set) i.i.d. probes are drawn from, held out of
    #: every share; ``None``: each peer probes with its own samples
    probe_pool: np.ndarray | None = None

    def with_probe_pool(self, size: int, n: int, seed: int) -> SharedExtractor:
        """This start with a pool of ``size`` of the ``n`` training samples, drawn with
        ``seed``, for i.i.d. probes (the caller holds it out of every share)."""
        if 2 * size > n:
            from p2pfl.learning import DatasetUnavailable

            raise DatasetUnavailable(
                f"protocol.probe_pool={size} would hold out over half of the {n} training"
                " samples: give a smaller pool"
            )
        rng = np.random.default_rng([seed, 0x9B0F])
        pool = np.sort(rng.choice(n, min(size, n), replace=False))
        return dataclasses.replace(self, probe_pool=pool)

    def probe_source(self, own: np.ndarray) -> np.ndarray:
        """The samples a peer holding ``own`` draws its probe from."""
        return own if self.probe_pool is None else self.probe_pool

    def extras(
        self, probe_features: Tensor, probe_labels: Tensor, own_labels: Tensor | None = None
    ) -> dict[str, Any]:
        """``build_protocol``'s Bristle extras for a peer with this probe set, holding
        samples of labels ``own_labels`` (``None``: the probe's classes are its own)."""
        output = self.output if own_labels is None else self.output.for_classes(own_labels.tolist())
        return {
            "output": output,
            "probe_features": probe_features,
            "probe_labels": probe_labels,
        }

    def empty_probe(self) -> tuple[Tensor, Tensor]:
        """The probe of a peer without data."""
        return torch.zeros(0, self.output.features), torch.zeros(0, dtype=torch.int64)


def pretrain_extractor(
    trainer: LocalTrainer,
    *,
    seed: int,
    pretrain_samples: int,
    pretrain_steps: int,
    public: tuple[Tensor, Tensor] | None = None,
) -> SharedExtractor:
    """The shared start: a feature extractor pre-trained on public data, then a fresh
    output layer.

    ``pretrain_steps`` SGD steps on ``pretrain_samples`` samples drawn with ``seed`` from
    ``public`` (``(x, y)`` of a public dataset with the task's input shape and classes;
    ``None``: the task's own training set, split off by :func:`public_split`, which the
    caller must hold out of every peer's share). Pre-training starts from its own
    initialisation, ``init_params`` of a seed derived from ``seed``; the output layer is
    then that of ``trainer.init_params(seed)``, the run's fresh model: a classifier that
    has never seen the extractor's features, learned in the network.

    Deterministic in (data, model, seed): every peer computes the same vector.
    """
    from p2pfl.learning import BatchSampler, LocalTrainer

    x, y = (trainer.x, trainer.y) if public is None else public
    if tuple(x.shape[1:]) != trainer.input_shape:
        raise ValueError(
            f"the public dataset's samples are {tuple(x.shape[1:])}, the task's"
            f" {trainer.input_shape}: pre-training needs the same input shape"
        )
    if len(y) and int(y.max()) >= trainer.num_outputs:
        raise ValueError(
            f"the public dataset has labels up to {int(y.max())}, the model predicts"
            f" {trainer.num_outputs} classes"
        )
    rng = np.random.default_rng([seed, 0x9B1C])
    chosen = public_split(len(y), pretrain_samples, seed)
    fresh = trainer.init_params(seed)
    start = trainer.init_params(int(rng.integers(2**62)))
    if pretrain_steps:
        sampler = BatchSampler(chosen, trainer.batch_size, int(rng.integers(2**62)))
        pretrainer = LocalTrainer(
            trainer.model,
            x,
            y,
            lr=trainer.lr,
            batch_size=trainer.batch_size,
            weight_decay=trainer.weight_decay,
        )
        start, _ = pretrainer.train(start, sampler, pretrain_steps)
    output = OutputLayer.from_layout(trainer.layout)
    start = output.replace(start, output.rows(fresh))
    return SharedExtractor(start, output, feature_extractor(trainer.model, start))


def shared_start(
    spec: SharedStartConfig,
    trainer: LocalTrainer,
    *,
    seed: int,
    data_dir: str | None = None,
) -> tuple[SharedExtractor, np.ndarray]:
    """The shared start ``spec`` names, and the indices of the task's training set that
    no peer may hold (the public split when ``spec.dataset`` is "task", else none)."""
    from p2pfl.learning import DatasetUnavailable, load_dataset

    if spec.dataset == "task":
        held_out = public_split(len(trainer.y), spec.samples, seed)
        public = None
    else:
        data = load_dataset(spec.dataset, data_dir=data_dir, seed=seed)
        held_out = np.zeros(0, dtype=np.int64)
        public = (data.x_train, data.y_train)
    try:
        extractor = pretrain_extractor(
            trainer,
            seed=seed,
            pretrain_samples=spec.samples,
            pretrain_steps=spec.steps,
            public=public,
        )
    except ValueError as error:  # a public set that does not fit the task
        raise DatasetUnavailable(f"pre-training dataset {spec.dataset!r}: {error}") from None
    return extractor, held_out


def public_split(n: int, samples: int, seed: int) -> np.ndarray:
    """The sorted indices (of ``n``) pre-training draws from: ``samples`` of them, drawn
    with ``seed``. On the task's own training set these are held out of the peers' shares."""
    rng = np.random.default_rng([seed, 0x9B1D])
    return np.sort(rng.choice(n, min(samples, n), replace=False))


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
