"""Flat parameter vectors: the one representation of a model that peers exchange.

Every protocol, aggregator and message works on a 1-D float32 tensor holding all of a
model's parameters back to back, in ``named_parameters()`` order. A ``ParamLayout`` says
where each named parameter lives in that vector, so a vector can be turned back into
tensors of the right shapes (as views, without copying) for a ``torch.func`` call or for
loading into a module. Only parameters are flattened, never buffers: the models used here
have none, which is what makes a model a pure function of its vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ParamLayout",
    "flatten_module",
    "load_flat",
    "model_from_factory",
    "unflatten",
]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of a module's parameters inside its flat vector.

    ``output_layer`` names the parameters of the module's last ``nn.Linear`` (weight, then
    bias), for protocols such as Bristle that exchange the output layer only. It is empty
    when the layout was not built from a module, and ``output_layer_names`` then falls back
    to the parameters sharing the last parameter's module prefix.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int
    output_layer: tuple[str, ...] = ()

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamLayout:
        """Layout of ``module``'s parameters in ``named_parameters()`` order."""
        named = list(module.named_parameters())
        layout = cls.from_shapes([n for n, _ in named], [tuple(p.shape) for _, p in named])
        output: tuple[str, ...] = ()
        for prefix, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                dot = f"{prefix}." if prefix else ""
                output = tuple(f"{dot}{n}" for n, _ in sub.named_parameters(recurse=False))
        return cls(layout.names, layout.shapes, layout.offsets, layout.numel, output)

    @classmethod
    def from_shapes(cls, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> ParamLayout:
        """Layout of parameters laid out back to back in the given order."""
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} names but {len(shapes)} shapes")
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        offsets: list[int] = []
        total = 0
        for shape in shapes:
            offsets.append(total)
            total += math.prod(shape)
        return cls(
            tuple(names), tuple(tuple(int(s) for s in sh) for sh in shapes), tuple(offsets), total
        )

    def index(self, name: str) -> int:
        """Position of parameter ``name`` in ``names``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no parameter {name!r}; have {', '.join(self.names)}") from None

    def slice_of(self, name: str) -> slice:
        """Where parameter ``name`` lives in the flat vector."""
        i = self.index(name)
        return slice(self.offsets[i], self.offsets[i] + math.prod(self.shapes[i]))

    def slice_of_many(self, names: Sequence[str]) -> slice:
        """One slice covering parameters ``names``; they must be contiguous in the vector."""
        parts = sorted((self.slice_of(n) for n in names), key=lambda s: s.start)
        if not parts:
            raise ValueError("no parameter names given")
        for before, after in zip(parts, parts[1:], strict=False):
            if before.stop != after.start:
                raise ValueError(f"parameters {list(names)} are not contiguous in the vector")
        return slice(parts[0].start, parts[-1].stop)

    def output_layer_names(self) -> tuple[str, ...]:
        """Names of the output layer's parameters (weight and bias of the last Linear)."""
        if self.output_layer:
            return self.output_layer
        if not self.names:
            raise ValueError("empty layout has no output layer")
        prefix = self.names[-1].rpartition(".")[0]
        return tuple(n for n in self.names if n.rpartition(".")[0] == prefix)

    def output_slice(self) -> slice:
        """Where the output layer's parameters live in the flat vector."""
        return self.slice_of_many(self.output_layer_names())


def flatten_module(module: nn.Module) -> torch.Tensor:
    """A 1-D float32 copy of ``module``'s parameters in ``named_parameters()`` order."""
    params = [p.detach().reshape(-1) for p in module.parameters()]
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat(params).to(torch.float32)


def load_flat(module: nn.Module, vec: torch.Tensor) -> None:
    """Copy the flat vector ``vec`` into ``module``'s parameters, in place."""
    layout = ParamLayout.from_module(module)
    if vec.dim() != 1 or vec.numel() != layout.numel:
        raise ValueError(
            f"expected a vector of {layout.numel} values, got shape {tuple(vec.shape)}"
        )
    views = unflatten(vec, layout)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(views[name])


def unflatten(vec: torch.Tensor, layout: ParamLayout) -> dict[str, torch.Tensor]:
    """Views of ``vec`` shaped like the layout's parameters; no data is copied.

    ``vec`` may carry leading batch dimensions, ``(..., numel)``: a stack of vectors
    ``(B, d)`` gives tensors of shape ``(B, *shape)``, ready for ``vmap(in_dims=0)``.
    Writing into a returned view writes into ``vec``.
    """
    if vec.shape[-1:] != (layout.numel,):
        raise ValueError(f"expected last dimension {layout.numel}, got shape {tuple(vec.shape)}")
    lead = tuple(vec.shape[:-1])
    out: dict[str, torch.Tensor] = {}
    for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets, strict=True):
        out[name] = vec[..., offset : offset + math.prod(shape)].view(*lead, *shape)
    return out


def model_from_factory(
    path: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    params: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The user's model that ``path`` (``module:factory``) builds, checked against
    :data:`p2pfl.plugins.MODEL_CONTRACT`: a module with float32 parameters and no buffers
    (what makes it a function of its flat vector) whose logits for a batch of two zero
    inputs have shape ``(2, num_classes)``. ``FactoryError`` (one line) otherwise."""
    from p2pfl.plugins import MODEL_CONTRACT, FactoryError, load_factory

    where = f"model.name={path!r}"
    factory = load_factory(path, "model.name")
    try:
        model = factory(tuple(input_shape), num_classes, **dict(params or {}))
    except Exception as error:
        raise FactoryError(
            f"{where}: the factory raised {_one_line(error)}; {MODEL_CONTRACT}"
        ) from None
    problem = _model_problem(model, tuple(input_shape), num_classes)
    if problem is not None:
        raise FactoryError(f"{where}: {problem}; {MODEL_CONTRACT}")
    return model


def _model_problem(model: Any, input_shape: tuple[int, ...], num_classes: int) -> str | None:
    if not isinstance(model, nn.Module):
        return f"it returned a {type(model).__name__}"
    parameters = list(model.parameters())
    if not parameters:
        return "the model has no parameters"
    if any(p.dtype != torch.float32 for p in parameters):
        return "its parameters must be float32"
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers[:3])})"
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as error:
        return f"its forward pass on a (2, {', '.join(map(str, input_shape))}) batch raised {_one_line(error)}"
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        return f"its output for a batch of 2 is {shape}, not (2, {num_classes})"
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
