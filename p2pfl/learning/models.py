"""The small classifiers peers train.

Every model is a pure function of its parameters: no BatchNorm, no dropout, no buffers.
That is what lets ``torch.func.functional_call`` + ``vmap`` run thousands of peers'
models as one batched computation, and lets a model be exchanged as a flat vector alone.
The output layer is always the last ``nn.Linear``, named ``out`` (Bristle exchanges it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

__all__ = ["MODELS", "build_model"]


def _logreg(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None
) -> nn.Module:
    if hidden:
        raise ValueError("logreg has no hidden layers")
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            out=nn.Linear(math.prod(input_shape), num_classes),
        )
    )


def _mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None
) -> nn.Module:
    widths = (32,) if hidden is None else tuple(hidden)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = math.prod(input_shape)
    for i, h in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"act{i}"] = nn.ReLU()
        width = h
    layers["out"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def _cnn(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None
) -> nn.Module:
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks, then a linear output layer.

    ``hidden`` gives the two blocks' channel counts (default 16, 32). Padding keeps the
    spatial size before each pool, so 8x8 inputs end at 2x2 and 28x28 at 7x7.
    """
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs (channels, height, width) input, got {input_shape}")
    channels = (16, 32) if hidden is None else tuple(hidden)
    if len(channels) != 2:
        raise ValueError(f"cnn takes two channel counts in hidden, got {channels}")
    c, h, w = input_shape
    if h < 4 or w < 4:
        raise ValueError(f"cnn needs inputs of at least 4x4, got {h}x{w}")
    c1, c2 = channels
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(c, c1, kernel_size=3, padding=1),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            out=nn.Linear(c2 * (h // 2 // 2) * (w // 2 // 2), num_classes),
        )
    )


ModelBuilder = Callable[[tuple[int, ...], int, "tuple[int, ...] | None"], nn.Module]

MODELS: dict[str, ModelBuilder] = {"logreg": _logreg, "mlp": _mlp, "cnn": _cnn}


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: tuple[int, ...] | None = None,
) -> nn.Module:
    """A freshly initialised model ``name`` for inputs of ``input_shape`` (no batch dim).

    ``hidden``: the MLP's hidden widths (default ``(32,)``) or the CNN's two channel
    counts (default ``(16, 32)``). Initialisation draws from torch's global generator;
    use ``LocalTrainer.init_params(seed)`` for reproducible starting vectors.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return MODELS[name](tuple(input_shape), num_classes, hidden)
