"""Flat parameter vectors: layouts, flattening, views, output-layer slices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from p2pfl.learning.models import build_model
from p2pfl.model import ParamLayout, flatten_module, load_flat, unflatten


@pytest.fixture(params=["logreg", "mlp", "cnn"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return build_model(request.param, (1, 8, 8), 10)


def test_layout_matches_named_parameters(model: nn.Module) -> None:
    layout = ParamLayout.from_module(model)
    named = list(model.named_parameters())
    assert layout.names == tuple(n for n, _ in named)
    assert layout.shapes == tuple(tuple(p.shape) for _, p in named)
    assert layout.numel == sum(p.numel() for _, p in named)
    assert layout.offsets[0] == 0
    for name, p in named:
        sl = layout.slice_of(name)
        assert sl.stop - sl.start == p.numel()


def test_flatten_unflatten_round_trip(model: nn.Module) -> None:
    layout = ParamLayout.from_module(model)
    vec = flatten_module(model)
    assert vec.dtype == torch.float32 and vec.shape == (layout.numel,)
    views = unflatten(vec, layout)
    for name, p in model.named_parameters():
        assert torch.equal(views[name], p.detach())


def test_flatten_is_a_copy_and_unflatten_gives_views(model: nn.Module) -> None:
    layout = ParamLayout.from_module(model)
    vec = flatten_module(model)
    first = next(model.parameters())
    vec[0] += 1.0
    assert first.detach().reshape(-1)[0] != vec[0]  # flatten copied
    views = unflatten(vec, layout)
    name = layout.names[-1]
    views[name].fill_(7.0)  # a view writes through
    assert torch.all(vec[layout.slice_of(name)] == 7.0)


def test_load_flat_round_trip(model: nn.Module) -> None:
    vec = torch.arange(ParamLayout.from_module(model).numel, dtype=torch.float32) / 1000
    load_flat(model, vec)
    assert torch.equal(flatten_module(model), vec)
    with pytest.raises(ValueError):
        load_flat(model, vec[:-1])


def test_unflatten_batched_stack() -> None:
    model = build_model("mlp", (1, 8, 8), 10, hidden=(5,))
    layout = ParamLayout.from_module(model)
    stack = torch.randn(3, layout.numel, generator=torch.Generator().manual_seed(0))
    views = unflatten(stack, layout)
    assert views["fc1.weight"].shape == (3, 5, 64)
    for row in range(3):
        single = unflatten(stack[row], layout)
        for name in layout.names:
            assert torch.equal(views[name][row], single[name])


def test_output_layer_is_last_linear(model: nn.Module) -> None:
    layout = ParamLayout.from_module(model)
    assert layout.output_layer_names() == ("out.weight", "out.bias")
    sl = layout.output_slice()
    assert sl.stop == layout.numel  # output layer registered last
    out = model.get_submodule("out")
    assert isinstance(out, nn.Linear) and out.bias is not None
    assert sl.stop - sl.start == out.weight.numel() + out.bias.numel()


def test_output_layer_fallback_without_module() -> None:
    layout = ParamLayout.from_shapes(
        ["a.weight", "a.bias", "b.weight", "b.bias"], [(3, 2), (3,), (2, 3), (2,)]
    )
    assert layout.output_layer_names() == ("b.weight", "b.bias")
    assert layout.output_slice() == slice(9, 17)


def test_layout_errors() -> None:
    with pytest.raises(ValueError):
        ParamLayout.from_shapes(["a", "a"], [(1,), (1,)])
    layout = ParamLayout.from_shapes(["a", "b", "c"], [(2,), (2,), (2,)])
    with pytest.raises(KeyError, match="no parameter"):
        layout.slice_of("z")
    with pytest.raises(ValueError, match="contiguous"):
        layout.slice_of_many(["a", "c"])
    assert layout.slice_of_many(["b", "a"]) == slice(0, 4)
    with pytest.raises(ValueError):
        unflatten(torch.zeros(5), layout)
