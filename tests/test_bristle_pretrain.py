"""Bristle's shared start as the paper sets it up: a feature extractor pre-trained on public
data no peer holds, a freshly initialised output layer, and the same start for any other
protocol (``protocol.shared_start``), so a comparison with Bristle starts level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pfl.config import BristleConfig, DataConfig, DPSGDConfig, ModelConfig, SharedStartConfig
from p2pfl.learning import Dataset, DatasetUnavailable, load_dataset
from p2pfl.peer import build_commons
from p2pfl.protocols.base import Start, Train, TrainingDone
from p2pfl.protocols.bristle import Bristle, OutputLayer

#: the public dataset of these tests: digits mirrored left-right with labels 9 - y, a task
#: of the same shape that is none of the peers' data
PUBLIC = f"{Path(__file__).resolve()}:mirrored_digits"
DATA = DataConfig(dataset="digits", partition="shards", shards_per_peer=2, batch_size=16)
MODEL_CFG = ModelConfig(name="mlp", hidden=[16], lr=0.1)
PRETRAIN = {"pretrain_dataset": PUBLIC, "pretrain_samples": 400, "pretrain_steps": 30}


def mirrored_digits(seed: int = 0) -> dict[str, Any]:
    """A public dataset for these tests (a ``data.dataset`` factory)."""
    digits = load_dataset("digits", seed=seed)
    return {
        "name": "mirrored-digits",
        "x_train": digits.x_train.flip(-1).numpy(),
        "y_train": (9 - digits.y_train).numpy(),
        "x_test": digits.x_test.flip(-1).numpy(),
        "y_test": (9 - digits.y_test).numpy(),
        "num_classes": 10,
    }


def flat_vectors(seed: int = 0) -> dict[str, Any]:
    """A dataset of 5-feature vectors: not the shape of digits' images."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 10, 40)
    return {"x_train": x, "y_train": y, "x_test": x, "y_test": y, "num_classes": 10}


def _bristle(**settings: Any) -> BristleConfig:
    return BristleConfig.model_validate({"name": "bristle", **PRETRAIN, **settings})


def _scrambled(dataset: Dataset, seed: int) -> Dataset:
    """``dataset`` with other training images and labels (same shapes, same test set)."""
    gen = torch.Generator().manual_seed(seed)
    return Dataset(
        name=dataset.name,
        x_train=torch.rand(dataset.x_train.shape, generator=gen),
        y_train=torch.randint(0, 10, dataset.y_train.shape, generator=gen),
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
    )


def test_the_extractor_is_learned_from_the_public_set_only() -> None:
    digits = load_dataset("digits", seed=1)
    real = build_commons(DATA, MODEL_CFG, _bristle(), seed=1, shares=8, dataset=digits)
    other = build_commons(
        DATA, MODEL_CFG, _bristle(), seed=1, shares=8, dataset=_scrambled(digits, 5)
    )
    # the peers' training data changed entirely: the pre-trained vector did not
    assert torch.equal(real.start, other.start)
    # pre-training did move the features away from a fresh model's
    fresh = real.trainer.init_params(1)
    output = OutputLayer.from_layout(real.trainer.layout)
    assert not torch.equal(output.replace(real.start, output.rows(fresh)), fresh)
    # every training sample is still held by a peer: nothing was taken for pre-training
    held = np.concatenate(real.shares)
    assert sorted(held.tolist()) == list(range(len(digits.y_train)))


def test_the_output_layer_is_a_fresh_initialisation() -> None:
    digits = load_dataset("digits", seed=1)
    commons = build_commons(DATA, MODEL_CFG, _bristle(), seed=1, shares=8, dataset=digits)
    output = OutputLayer.from_layout(commons.trainer.layout)
    # the run's own fresh model's output layer, not the one pre-training produced
    assert torch.equal(output.rows(commons.start), output.rows(commons.trainer.init_params(1)))
    untouched = build_commons(
        DATA, MODEL_CFG, _bristle(pretrain_steps=0), seed=1, shares=8, dataset=digits
    )
    # pre-training started from another initialisation than the output layer's
    assert not torch.equal(untouched.start, commons.trainer.init_params(1))
    # and the fresh layer knows nothing yet: about chance on the task's test set
    logits = commons.trainer.logits_batched(commons.start[None], digits.x_test)[0]
    assert float((logits.argmax(dim=1) == digits.y_test).float().mean()) < 0.3


def test_dpsgd_from_the_shared_start_starts_where_bristle_does() -> None:
    digits = load_dataset("digits", seed=2)
    bristle = build_commons(DATA, MODEL_CFG, _bristle(), seed=2, shares=8, dataset=digits)
    spec = SharedStartConfig(dataset=PUBLIC, samples=400, steps=30)
    dpsgd_cfg = DPSGDConfig(name="dpsgd", shared_start=spec)
    dpsgd = build_commons(DATA, MODEL_CFG, dpsgd_cfg, seed=2, shares=8, dataset=digits)
    assert torch.equal(dpsgd.start, bristle.start)
    assert all(np.array_equal(a, b) for a, b in zip(dpsgd.shares, bristle.shares, strict=True))
    plain = build_commons(
        DATA, MODEL_CFG, DPSGDConfig(name="dpsgd"), seed=2, shares=8, dataset=digits
    )
    assert torch.equal(plain.start, plain.trainer.init_params(2))  # without it: a fresh model
    setup = dpsgd.peer(0, 0)
    protocol = dpsgd.build_protocol(setup, peer_id="p0", neighbours=["p1"])
    assert torch.equal(protocol.params, bristle.start)


def test_a_split_of_the_task_data_is_held_out_of_every_share() -> None:
    digits = load_dataset("digits", seed=3)
    commons = build_commons(
        DATA, MODEL_CFG, _bristle(pretrain_dataset="task"), seed=3, shares=8, dataset=digits
    )
    held = np.concatenate(commons.shares)
    assert len(held) == len(digits.y_train) - 400
    # the same held-out split for D-PSGD started from the same extractor
    spec = SharedStartConfig(dataset="task", samples=400, steps=30)
    dpsgd = build_commons(
        DATA,
        MODEL_CFG,
        DPSGDConfig(name="dpsgd", shared_start=spec),
        seed=3,
        shares=8,
        dataset=digits,
    )
    assert torch.equal(dpsgd.start, commons.start)
    assert np.array_equal(np.sort(np.concatenate(dpsgd.shares)), np.sort(held))


def test_iid_probes_come_from_a_pool_no_peer_holds() -> None:
    digits = load_dataset("digits", seed=4)
    cfg = _bristle(probe="iid", probe_pool=300, probe_samples=60)
    commons = build_commons(DATA, MODEL_CFG, cfg, seed=4, shares=8, dataset=digits)
    pool = commons.extractor.probe_pool if commons.extractor is not None else None
    assert pool is not None and len(pool) == 300
    assert not set(np.concatenate(commons.shares).tolist()) & set(pool.tolist())
    own = build_commons(
        DATA, MODEL_CFG, _bristle(probe_samples=60), seed=4, shares=8, dataset=digits
    )
    iid_labels = commons.peer(0, 0).extras["probe_labels"]
    own_labels = own.peer(0, 0).extras["probe_labels"]
    assert len(set(own_labels.tolist())) <= 2 < len(set(iid_labels.tolist()))  # two shards


def test_a_probe_pool_of_most_of_the_data_is_refused() -> None:
    digits = load_dataset("digits", seed=1)
    cfg = _bristle(probe="iid", probe_pool=1000)
    with pytest.raises(DatasetUnavailable, match="probe_pool=1000"):
        build_commons(DATA, MODEL_CFG, cfg, seed=1, shares=8, dataset=digits)


def test_a_public_set_of_another_shape_is_refused() -> None:
    digits = load_dataset("digits", seed=1)
    cfg = _bristle(pretrain_dataset=f"{Path(__file__).resolve()}:flat_vectors")
    with pytest.raises(DatasetUnavailable, match="same input shape"):
        build_commons(DATA, MODEL_CFG, cfg, seed=1, shares=8, dataset=digits)


def test_an_unknown_public_dataset_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="fashion_mnist"):
        SharedStartConfig(dataset="nope")
    with pytest.raises(ValueError, match="fashion_mnist"):
        _bristle(pretrain_dataset="nope")


def test_shared_start_is_refused_on_bristle() -> None:
    with pytest.raises(ValueError, match="pretrain_dataset"):
        BristleConfig.model_validate({"name": "bristle", "shared_start": {"dataset": "task"}})


def test_local_steps_leave_the_rows_of_unprobed_classes_alone() -> None:
    # features (3 values), then Linear(2 -> 3): W (3x2), b (3); the probe holds classes 0, 1
    output = OutputLayer(weight_offset=3, bias_offset=9, classes=3, features=2)
    start = torch.arange(12, dtype=torch.float32)
    proto = Bristle(
        "me",
        start,
        ["a"],
        output=output,
        probe_features=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        probe_labels=torch.tensor([0, 1]),
        keep_closest=1,
        n_random=0,
        seed=0,
    )
    (train,) = [e for e in proto.handle(Start(0.0)) if isinstance(e, Train)]
    trained = start + 1.0  # training moved everything
    proto.handle(TrainingDone(0.1, train.ticket, trained))
    assert proto.trained is not None
    rows = output.rows(proto.trained)
    assert torch.equal(rows[:2], output.rows(trained)[:2])  # the probed classes: trained
    assert torch.equal(rows[2], output.rows(start)[2])  # class 2: as before
    assert torch.equal(proto.trained[:3], start[:3])  # the frozen features


def test_the_driver_names_the_classes_a_peer_trains() -> None:
    digits = load_dataset("digits", seed=5)
    commons = build_commons(
        DATA, MODEL_CFG, _bristle(probe="iid", probe_pool=200), seed=5, shares=8, dataset=digits
    )
    setup = commons.peer(3, 3)
    own = sorted(set(digits.y_train[torch.from_numpy(setup.share)].tolist()))
    assert setup.extras["output"].trained_classes == tuple(own)
    assert len(own) <= 2  # two shards


def _three_class_bristle(**kwargs: Any) -> Bristle:
    # no features to speak of: Linear(2 -> 3) on a probe of two samples per class
    output = OutputLayer(weight_offset=0, bias_offset=6, classes=3, features=2)
    probe_x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0], [2.0, 2.0]])
    probe_y = torch.tensor([0, 0, 1, 1, 2, 2])
    defaults: dict[str, Any] = {"keep_closest": 2, "n_random": 0, "tolerance": 0.1, "seed": 0}
    return Bristle(
        "me",
        torch.zeros(9),
        ["a", "b"],
        output=output,
        probe_features=probe_x,
        probe_labels=probe_y,
        **(defaults | kwargs),
    )


def test_a_row_that_claims_every_sample_is_refused_a_good_one_taken() -> None:
    proto = _three_class_bristle()
    # ours knows classes 0 and 1; class 2's row is untrained (it never wins)
    own = torch.tensor([[1.0, -0.4, 0.0], [-0.4, 1.0, 0.0], [0.0, 0.0, -5.0]])
    good = own.clone()
    good[2] = torch.tensor([0.6, 0.6, 0.0])  # wins on (1, 1)-like samples only
    greedy = own.clone()
    greedy[2] = torch.tensor([0.0, 0.0, 10.0])  # class 2 for every sample: recall 1
    weights = proto.class_weights(own, torch.stack([good, greedy]))
    assert proto.recalls(greedy[None])[0, 2] == 1.0  # recall alone would trust it
    # the greedy layer is refused on every class: in its own hands rows 0 and 1 never win
    assert weights.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
