"""Samplers, models, the two training paths and evaluation."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from p2pfl.learning import (
    MODELS,
    BatchSampler,
    LocalTrainer,
    build_model,
    evaluate,
    load_dataset,
    partition,
    per_class_recall,
    predict,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _trainer(ds, model: str = "mlp", **kw) -> LocalTrainer:
    torch.manual_seed(0)
    net = build_model(model, ds.input_shape, ds.num_classes, hidden=kw.pop("hidden", None))
    kw.setdefault("lr", 0.1)
    kw.setdefault("batch_size", 16)
    return LocalTrainer(net, ds.x_train, ds.y_train, **kw)


def _samplers(parts: list[np.ndarray], batch_size: int) -> list[BatchSampler]:
    return [BatchSampler(p, batch_size, seed=100 + i) for i, p in enumerate(parts)]


# --------------------------------------------------------------------------- sampler


def test_sampler_epochs_are_permutations() -> None:
    idx = np.arange(50, 80)
    s = BatchSampler(idx, 10, seed=1)
    stream = np.concatenate([s.next_batch() for _ in range(9)])  # three epochs
    for epoch in stream.reshape(3, 30):
        assert np.array_equal(np.sort(epoch), idx)
    assert not np.array_equal(stream[:30], stream[30:60])  # reshuffled every epoch
    assert s.epoch == 3


def test_sampler_is_deterministic_and_seeded() -> None:
    a, b, c = (BatchSampler(np.arange(40), 8, seed=s) for s in (7, 7, 8))
    for _ in range(12):
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        assert np.array_equal(x, y)
    assert not np.array_equal(x, z)


def test_sampler_small_partition_fills_full_batches() -> None:
    s = BatchSampler(np.array([3, 5, 9]), 8, seed=0)
    batches = [s.next_batch() for _ in range(3)]
    assert all(len(b) == 8 for b in batches)
    counts = np.bincount(np.concatenate(batches), minlength=10)[[3, 5, 9]]
    assert counts.tolist() == [8, 8, 8]  # 24 draws = 8 whole epochs


def test_sampler_state_round_trip() -> None:
    s = BatchSampler(np.arange(13), 5, seed=3)
    for _ in range(4):
        s.next_batch()
    state = msgpack.unpackb(msgpack.packb(s.state_dict()))
    expected = [s.next_batch().copy() for _ in range(6)]
    resumed = BatchSampler(np.arange(13), 5, seed=3)
    resumed.load_state_dict(state)
    assert all(np.array_equal(resumed.next_batch(), e) for e in expected)
    with pytest.raises(ValueError):
        BatchSampler(np.arange(13), 5, seed=4).load_state_dict(state)


def test_sampler_rejects_empty() -> None:
    with pytest.raises(ValueError):
        BatchSampler(np.array([], dtype=np.int64), 4, seed=0)


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_models_are_pure_and_fit_inputs(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10)
    assert list(model.buffers()) == []
    assert model(torch.zeros(3, *shape)).shape == (3, 10)


def test_model_arguments() -> None:
    assert (
        sum(p.numel() for p in build_model("mlp", (1, 28, 28), 10).parameters())
        == 784 * 32 + 32 + 330
    )
    assert build_model("mlp", (1, 8, 8), 10, hidden=(20, 12))(torch.zeros(1, 1, 8, 8)).shape == (
        1,
        10,
    )
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="cnn"):
        build_model("cnn", (64,), 10)


# --------------------------------------------------------------------------- trainer


def test_init_params_is_deterministic_and_private(digits) -> None:
    tr = _trainer(digits)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = tr.init_params(5), tr.init_params(5)
    assert torch.rand(1) == before  # the global generator was not consumed
    assert torch.equal(a, b) and a.shape == (tr.dim,)
    assert not torch.equal(a, tr.init_params(6))


def test_centralised_mlp_learns_digits(digits) -> None:
    tr = _trainer(digits, lr=0.2, batch_size=32)
    sampler = BatchSampler(np.arange(len(digits.y_train)), 32, seed=0)
    start = tr.init_params(0)
    params, loss = tr.train(start, sampler, 400)
    result = evaluate(tr, params, digits.x_test, digits.y_test)
    assert float(result.accuracy) >= 0.90
    assert loss < 1.0
    assert float(evaluate(tr, start, digits.x_test, digits.y_test).accuracy) < 0.3


def test_train_leaves_inputs_alone(digits) -> None:
    tr = _trainer(digits)
    p = tr.init_params(0)
    copy = p.clone()
    out, loss = tr.train(p, BatchSampler(np.arange(100), 16, seed=0), 3)
    assert torch.equal(p, copy) and not torch.equal(out, p) and np.isfinite(loss)
    stack = torch.stack([p, p])
    stack_copy = stack.clone()
    out, losses = tr.train_batched(stack, _samplers([np.arange(50), np.arange(50, 99)], 16), 2)
    assert torch.equal(stack, stack_copy) and out.shape == (2, tr.dim) and losses.shape == (2,)
    same, nan = tr.train(p, BatchSampler(np.arange(100), 16, seed=0), 0)
    assert torch.equal(same, p) and np.isnan(nan)


def _label_flip(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, 9 - y


@pytest.mark.parametrize(
    ("model", "weight_decay", "attack"),
    [("mlp", 0.0, False), ("mlp", 1e-3, True), ("cnn", 0.0, True)],
)
def test_batched_matches_per_peer(digits, model: str, weight_decay: float, attack: bool) -> None:
    """8 peers, 5 steps: vmap path and one-model-at-a-time path agree."""
    tr = _trainer(
        digits, model, weight_decay=weight_decay, hidden=(4, 8) if model == "cnn" else None
    )
    parts = partition(digits.train_labels, 8, "dirichlet", seed=0, alpha=0.3)
    parts[0] = parts[0][:5]  # one partition smaller than a batch
    transforms = [_label_flip if attack and i % 3 == 0 else None for i in range(8)]
    start = torch.stack([tr.init_params(i) for i in range(8)])

    ref_samplers = _samplers(parts, 16)
    ref = [tr.train(start[i], ref_samplers[i], 5, transform=transforms[i]) for i in range(8)]
    batched_samplers = _samplers(parts, 16)
    out, losses = tr.train_batched(start, batched_samplers, 5, transforms=transforms, chunk=3)

    assert torch.allclose(out, torch.stack([r[0] for r in ref]), atol=1e-5)
    assert torch.allclose(losses, torch.tensor([r[1] for r in ref]), atol=1e-5)
    assert [s.consumed for s in batched_samplers] == [s.consumed for s in ref_samplers] == [80] * 8


@pytest.mark.parametrize(("model", "hidden"), [("mlp", None), ("mlp", (16, 8)), ("logreg", None)])
def test_stacked_path_matches_vmap(digits, model: str, hidden: tuple[int, ...] | None) -> None:
    """The hand-written bmm backward and vmap(grad) give the same training, attacks included."""
    stacked = _trainer(digits, model, hidden=hidden, weight_decay=1e-3)
    vmapped = _trainer(digits, model, hidden=hidden, weight_decay=1e-3, stacked=False)
    assert stacked._stacked is not None and vmapped._stacked is None
    parts = partition(digits.train_labels, 6, "iid", seed=1)
    transforms = [_label_flip if i % 2 else None for i in range(6)]
    start = torch.stack([stacked.init_params(i) for i in range(6)])
    a, la = stacked.train_batched(start, _samplers(parts, 16), 3, transforms=transforms)
    b, lb = vmapped.train_batched(start, _samplers(parts, 16), 3, transforms=transforms)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(la, lb, atol=1e-6)


@pytest.mark.parametrize(("model", "attack"), [("mlp", False), ("mlp", True), ("cnn", True)])
def test_train_one_is_the_simulators_arithmetic(digits, model: str, attack: bool) -> None:
    """A node's training (``train_one``): for an MLP, bit for bit the simulator's batched
    kernel with a batch of one; within float rounding of the module path; the same
    sampler advance; a model without the kernel (the CNN) takes the module path itself."""
    tr = _trainer(digits, model, weight_decay=1e-3, hidden=(4, 8) if model == "cnn" else None)
    transform = _label_flip if attack else None
    start = tr.init_params(3)
    parts = [np.arange(150)]
    one_sampler, batched_sampler, module_sampler = (_samplers(parts, 16)[0] for _ in range(3))
    one, one_loss = tr.train_one(start, one_sampler, 7, transform=transform)
    module, module_loss = tr.train(start, module_sampler, 7, transform=transform)
    batched, batched_loss = tr.train_batched(
        start.unsqueeze(0), [batched_sampler], 7, transforms=[transform]
    )
    assert one.shape == start.shape and isinstance(one_loss, float)
    assert one_sampler.consumed == module_sampler.consumed == batched_sampler.consumed == 7 * 16
    assert not torch.equal(one, start)
    if model == "cnn":  # no kernel: the module path, exactly
        assert torch.equal(one, module) and one_loss == module_loss
        assert torch.allclose(one, batched[0], atol=1e-5)
    else:
        assert torch.equal(one, batched[0]) and one_loss == float(batched_loss[0])
        assert torch.allclose(one, module, atol=1e-6) and abs(one_loss - module_loss) < 1e-6
    assert torch.equal(start, tr.init_params(3))  # its input left alone


@pytest.mark.parametrize("hidden", [None, (16, 8)])
def test_stacked_logits_match_the_module(digits, hidden: tuple[int, ...] | None) -> None:
    """Evaluation's kernel (the MLP's forward by matmul, no functorch) gives the logits of
    the module itself and of the vmap path, one model or many."""
    stacked = _trainer(digits, hidden=hidden)
    vmapped = _trainer(digits, hidden=hidden, stacked=False)
    stack = torch.stack([stacked.init_params(i) for i in range(3)])
    x = digits.x_test[:100]
    a = stacked.logits_batched(stack, x)
    b = vmapped.logits_batched(stack, x)
    assert a.shape == (3, 100, 10) and torch.allclose(a, b, atol=1e-5)
    from p2pfl.model import load_flat

    net = build_model("mlp", digits.input_shape, 10, hidden=hidden)
    load_flat(net, stack[1])
    with torch.no_grad():
        assert torch.allclose(stacked.logits_batched(stack[1:2], x)[0], net(x), atol=1e-5)
    one = evaluate(stacked, stack[1], digits.x_test, digits.y_test)
    ref = evaluate(vmapped, stack[1], digits.x_test, digits.y_test)
    assert torch.allclose(one.accuracy, ref.accuracy) and torch.allclose(one.loss, ref.loss, atol=1e-5)


def test_stacked_path_only_for_plain_linear_stacks(digits) -> None:
    assert _trainer(digits, "cnn")._stacked is None
    odd = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
    assert LocalTrainer(odd, digits.x_train, digits.y_train, lr=0.1, batch_size=4)._stacked is None
    no_bias = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10, bias=False))
    tr = LocalTrainer(no_bias, digits.x_train, digits.y_train, lr=0.1, batch_size=16)
    assert tr._stacked is not None
    ref = LocalTrainer(no_bias, digits.x_train, digits.y_train, lr=0.1, batch_size=16, stacked=False)
    start = torch.stack([tr.init_params(0), tr.init_params(1)])
    parts = [np.arange(40), np.arange(40, 80)]
    a, _ = tr.train_batched(start, _samplers(parts, 16), 2)
    b, _ = ref.train_batched(start, _samplers(parts, 16), 2)
    assert torch.allclose(a, b, atol=1e-6)


def test_train_batched_into_out(digits) -> None:
    """``out`` gets the result, ``params`` is only read: what the simulator's pooled rows need."""
    tr = _trainer(digits)
    stack = torch.stack([tr.init_params(i) for i in range(3)])
    copy = stack.clone()
    parts = [np.arange(i * 40, (i + 1) * 40) for i in range(3)]
    expected, _ = tr.train_batched(stack, _samplers(parts, 16), 2)
    out = torch.full((3, tr.dim), float("nan"))
    result, _ = tr.train_batched(stack, _samplers(parts, 16), 2, out=out)
    assert result is out and torch.equal(out, expected) and torch.equal(stack, copy)
    untouched, losses = tr.train_batched(stack, _samplers(parts, 16), 0, out=out)
    assert torch.equal(untouched, stack) and torch.isnan(losses).all()
    with pytest.raises(ValueError, match="out must be"):
        tr.train_batched(stack, _samplers(parts, 16), 1, out=torch.zeros(2, tr.dim))


def test_transform_changes_training(digits) -> None:
    tr = _trainer(digits)
    p = tr.init_params(0)
    clean, _ = tr.train(p, BatchSampler(np.arange(200), 16, seed=0), 3)
    flipped, _ = tr.train(p, BatchSampler(np.arange(200), 16, seed=0), 3, transform=_label_flip)
    assert not torch.allclose(clean, flipped)


def test_train_batched_inplace(digits) -> None:
    tr = _trainer(digits)
    stack = torch.stack([tr.init_params(i) for i in range(3)])
    parts = [np.arange(i * 40, (i + 1) * 40) for i in range(3)]
    expected, _ = tr.train_batched(stack, _samplers(parts, 16), 2)
    out, _ = tr.train_batched(stack, _samplers(parts, 16), 2, inplace=True)
    assert out.data_ptr() == stack.data_ptr() and torch.equal(out, expected)


def test_trainer_rejects_bad_input(digits) -> None:
    tr = _trainer(digits)
    with pytest.raises(ValueError):
        tr.train(torch.zeros(tr.dim + 1), BatchSampler(np.arange(10), 16, seed=0), 1)
    with pytest.raises(ValueError, match="samplers"):
        tr.train_batched(torch.zeros(2, tr.dim), _samplers([np.arange(10)], 16), 1)
    with pytest.raises(ValueError, match="batches of 16"):
        tr.train_batched(torch.zeros(1, tr.dim), _samplers([np.arange(10)], 8), 1)
    with pytest.raises(ValueError, match="buffers"):
        LocalTrainer(torch.nn.BatchNorm1d(3), digits.x_train, digits.y_train, lr=0.1, batch_size=4)


# ------------------------------------------------------------------------ evaluation


def test_evaluate_batched_matches_single(digits) -> None:
    tr = _trainer(digits, "cnn", hidden=(4, 8))
    parts = partition(digits.train_labels, 5, "iid", seed=0)
    stack, _ = tr.train_batched(
        torch.stack([tr.init_params(i) for i in range(5)]), _samplers(parts, 16), 10
    )
    batched = evaluate(tr, stack, digits.x_test, digits.y_test, chunk=2, sample_chunk=50)
    assert batched.accuracy.shape == (5,) and batched.loss.shape == (5,)
    net = build_model("cnn", digits.input_shape, 10, hidden=(4, 8))
    from p2pfl.model import load_flat

    for i in range(5):
        single = evaluate(tr, stack[i], digits.x_test, digits.y_test)
        assert torch.allclose(batched.accuracy[i], single.accuracy[0])
        assert torch.allclose(batched.loss[i], single.loss[0], atol=1e-5)
        load_flat(net, stack[i])  # and both agree with the plain module
        with torch.no_grad():
            logits = net(digits.x_test)
        acc = (logits.argmax(1) == digits.y_test).float().mean()
        loss = torch.nn.functional.cross_entropy(logits, digits.y_test)
        assert torch.allclose(batched.accuracy[i], acc) and torch.allclose(
            batched.loss[i], loss, atol=1e-5
        )


def test_per_class_recall(digits) -> None:
    tr = _trainer(digits, lr=0.2, batch_size=32)
    params, _ = tr.train(
        tr.init_params(0), BatchSampler(np.arange(len(digits.y_train)), 32, seed=0), 100
    )
    recall = per_class_recall(tr, params, digits.x_test, digits.y_test)
    assert recall.shape == (10,)
    support = torch.bincount(digits.y_test, minlength=10).float()
    accuracy = evaluate(tr, params, digits.x_test, digits.y_test).accuracy[0]
    assert torch.allclose((recall * support).sum() / support.sum(), accuracy, atol=1e-6)
    preds = predict(tr, params, digits.x_test)[0]
    assert torch.allclose(recall[3], (preds[digits.y_test == 3] == 3).float().mean())
    only_zeros = digits.y_test == 0
    partial = per_class_recall(tr, params, digits.x_test[only_zeros], digits.y_test[only_zeros])
    assert torch.isnan(partial[1:]).all() and not torch.isnan(partial[0])
    stacked = per_class_recall(tr, torch.stack([params, params]), digits.x_test, digits.y_test)
    assert stacked.shape == (2, 10) and torch.allclose(stacked[1], recall)
