"""A user-defined CNN for p2pfl: named in a scenario as ``examples/custom/model.py:small_cnn``.

p2pfl calls ``small_cnn(input_shape, num_classes, **model.params)`` once and trains the
returned module's flat parameter vector on every peer. What the module must be (see
``p2pfl.plugins.MODEL_CONTRACT``): parameters only, no buffers (no BatchNorm), logits of
shape ``(B, num_classes)`` for a batch ``(B, *input_shape)``.
"""

from __future__ import annotations

from torch import nn


def small_cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 8) -> nn.Module:
    """One 3x3 convolution block, then a linear classifier."""
    in_channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * (height // 2) * (width // 2), num_classes),
    )
