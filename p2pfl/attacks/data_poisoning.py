"""Data poisoning: batch transforms ``(x, y) -> (x, y)`` a Byzantine peer trains on.

The peer then runs the honest protocol with the poisoned model, which is why such attacks
are hard to filter: the update is a genuine gradient step, on the wrong data. Transforms
never modify their inputs; they return new tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Corner = Literal["top_left", "top_right", "bottom_left", "bottom_right"]


def _check_class(name: str, value: int, num_classes: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a class index (int >= 0), got {value!r}")
    if num_classes is not None and value >= num_classes:
        raise ValueError(f"{name} must be < num_classes = {num_classes}, got {value}")


@dataclass(frozen=True)
class LabelFlip:
    """Every label ``y`` becomes ``num_classes - 1 - y`` (0 <-> C-1, 1 <-> C-2, ...)."""

    num_classes: int

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x, (self.num_classes - 1) - y


@dataclass(frozen=True)
class TargetedLabelFlip:
    """Labels ``source`` become ``target``; all other labels are kept."""

    source: int
    target: int

    def __post_init__(self) -> None:
        _check_class("source", self.source)
        _check_class("target", self.target)
        if self.source == self.target:
            raise ValueError(f"source and target must differ, both are {self.source}")

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.where(y == self.source, torch.full_like(y, self.target), y)


@dataclass(frozen=True)
class Trigger:
    """A ``size x size`` square of value ``value`` in one corner of every image.

    ``value`` should be the maximum pixel intensity *as the model sees it*: 1.0 for images
    in ``[0, 1]``, or e.g. ``(1 - 0.1307) / 0.3081`` for standardised MNIST. Images are the
    last two dimensions of ``x`` (``(B, H, W)`` or ``(B, C, H, W)``); for flattened inputs
    ``(B, C*H*W)`` give ``image_shape=(H, W)``.
    """

    size: int = 3
    value: float = 1.0
    corner: Corner = "bottom_right"
    image_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"trigger size must be an int >= 1, got {self.size!r}")
        if self.corner not in ("top_left", "top_right", "bottom_left", "bottom_right"):
            raise ValueError(
                f"unknown corner {self.corner!r}; accepted: top_left, top_right, "
                "bottom_left, bottom_right"
            )
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(self.image_shape))

    def mask(self, height: int, width: int) -> Tensor:
        """Boolean ``(height, width)`` mask of the trigger's pixels."""
        if self.size > min(height, width):
            raise ValueError(f"trigger size {self.size} does not fit a {height}x{width} image")
        rows = (
            slice(0, self.size)
            if self.corner.startswith("top")
            else slice(height - self.size, height)
        )
        cols = (
            slice(0, self.size) if self.corner.endswith("left") else slice(width - self.size, width)
        )
        m = torch.zeros(height, width, dtype=torch.bool)
        m[rows, cols] = True
        return m

    def apply(self, x: Tensor) -> Tensor:
        """A copy of ``x`` with the trigger stamped on every image."""
        out = x.clone()
        if self.image_shape is None:
            if out.dim() < 2:
                raise ValueError(
                    f"trigger: x of shape {tuple(x.shape)} has no image dimensions; "
                    "give image_shape for flattened inputs"
                )
            images = out
        else:
            h, w = self.image_shape
            if out.shape[-1] % (h * w) != 0:
                raise ValueError(
                    f"trigger: last dimension {out.shape[-1]} is not a multiple of {h}x{w}"
                )
            images = out.view(*out.shape[:-1], out.shape[-1] // (h * w), h, w)
        images[..., self.mask(*images.shape[-2:])] = self.value
        return out


def apply_trigger(x: Tensor, trigger: Trigger | None = None) -> Tensor:
    """``x`` with the backdoor trigger (default: a 3x3 square of 1.0, bottom right) stamped on."""
    return (trigger or Trigger()).apply(x)


@dataclass(frozen=True)
class Backdoor:
    """Stamp the trigger on a ``fraction`` of each batch and relabel those samples ``target_label``.

    The first ``round(fraction * B)`` samples of every batch are poisoned; batches come
    shuffled, so which samples those are is random, and the transform itself needs no
    random state. Learning both tasks keeps clean accuracy high while the trigger flips
    predictions, which is what makes backdoors stealthy.
    """

    target_label: int
    fraction: float = 0.5
    trigger: Trigger = Trigger()

    def __post_init__(self) -> None:
        _check_class("target_label", self.target_label)
        if isinstance(self.fraction, bool) or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be a number in [0, 1], got {self.fraction!r}")

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        k = int(self.fraction * x.shape[0] + 0.5)
        if k == 0:
            return x, y
        x_out, y_out = x.clone(), y.clone()
        x_out[:k] = self.trigger.apply(x[:k])
        y_out[:k] = self.target_label
        return x_out, y_out

    def test_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Triggered test samples whose true label is not the target, labelled the target.

        A model's accuracy on this batch is the backdoor's attack success rate.
        """
        keep = y != self.target_label
        x_kept = x[keep]
        return self.trigger.apply(x_kept), torch.full_like(y[keep], self.target_label)


def label_flip(num_classes: int) -> LabelFlip:
    """Batch transform flipping every label ``y`` to ``num_classes - 1 - y``."""
    return LabelFlip(num_classes)


def targeted_label_flip(source: int, target: int) -> TargetedLabelFlip:
    """Batch transform relabelling class ``source`` as ``target``."""
    return TargetedLabelFlip(source, target)


def backdoor(trigger: Trigger | None, target_label: int, fraction: float = 0.5) -> Backdoor:
    """Batch transform implanting ``trigger`` -> ``target_label`` on ``fraction`` of each batch."""
    return Backdoor(target_label, fraction, trigger or Trigger())


def attack_success_rate(
    predictions: Tensor, labels: Tensor, target: int, source: int | None = None
) -> float:
    """Fraction of the attacked test samples predicted as ``target``.

    Attacked samples are those whose true label is not ``target`` and, for a targeted flip,
    is ``source``. For a backdoor pass predictions on triggered inputs. ``nan`` when no
    sample qualifies.
    """
    attacked = labels != target
    if source is not None:
        attacked &= labels == source
    count = int(attacked.sum())
    if count == 0:
        return float("nan")
    return float((predictions[attacked] == target).sum()) / count
