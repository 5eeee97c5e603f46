"""Test accuracy and loss of one model or of many peers' models at once.

Many peers are evaluated as one ``vmap`` over their parameter vectors with the test data
shared (not copied per peer). Work is cut into blocks of peers x test samples so memory
stays bounded whatever the number of peers or the size of the test set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from p2pfl.learning.trainer import LocalTrainer

__all__ = ["EvalResult", "evaluate", "per_class_recall", "predict"]


@dataclass(frozen=True)
class EvalResult:
    """Per-model accuracy and mean cross-entropy loss, each of shape ``(B,)``."""

    accuracy: torch.Tensor
    loss: torch.Tensor


def _as_stack(trainer: LocalTrainer, params: torch.Tensor) -> torch.Tensor:
    if params.dim() == 1:
        params = params.unsqueeze(0)
    if params.dim() != 2 or params.shape[1] != trainer.dim:
        raise ValueError(
            f"expected params of shape (d,) or (B, d) with d={trainer.dim}, got {tuple(params.shape)}"
        )
    return params.detach().to(torch.float32)


def _blocks(
    trainer: LocalTrainer,
    num_models: int,
    num_samples: int,
    chunk: int | None,
    sample_chunk: int | None,
) -> tuple[int, int]:
    """Models per block and samples per block: within the activation budget unless given."""
    samples = sample_chunk or min(max(num_samples, 1), 4096, trainer.peers_per_call(1))
    models = chunk or trainer.peers_per_call(samples)
    return max(1, min(models, num_models)), max(1, samples)


def _logit_blocks(
    trainer: LocalTrainer,
    stack: torch.Tensor,
    x: torch.Tensor,
    chunk: int | None,
    sample_chunk: int | None,
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield ``(model rows, sample columns, logits (models, samples, classes))`` per block."""
    models, samples = _blocks(trainer, len(stack), len(x), chunk, sample_chunk)
    with torch.no_grad():
        for m0 in range(0, len(stack), models):
            rows = slice(m0, min(m0 + models, len(stack)))
            for s0 in range(0, len(x), samples):
                cols = slice(s0, min(s0 + samples, len(x)))
                yield rows, cols, trainer.logits_batched(stack[rows], x[cols])


def evaluate(
    trainer: LocalTrainer,
    params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chunk: int | None = None,
    sample_chunk: int | None = None,
) -> EvalResult:
    """Accuracy and mean loss on ``(x, y)`` of each model in ``params``.

    ``params`` is one vector ``(d,)`` (treated as a stack of one: results have shape
    ``(1,)``) or a stack ``(B, d)``. ``chunk`` models and ``sample_chunk`` test samples
    are evaluated together (defaults keep activations within a fixed memory budget).
    The sums are kept where ``params`` and the test data are (an accelerator's: the
    simulator's ``sim.device``); the results come back on the CPU.
    """
    stack = _as_stack(trainer, params)
    num = len(stack)
    correct = torch.zeros(num, dtype=torch.float64, device=stack.device)
    loss_sum = torch.zeros(num, dtype=torch.float64, device=stack.device)
    for rows, cols, logits in _logit_blocks(trainer, stack, x, chunk, sample_chunk):
        target = y[cols]
        k, m = logits.shape[:2]
        losses = F.cross_entropy(logits.reshape(k * m, -1), target.repeat(k), reduction="none")
        loss_sum[rows] += losses.view(k, m).sum(dim=1, dtype=torch.float64)
        correct[rows] += (logits.argmax(dim=-1) == target).sum(dim=1, dtype=torch.float64)
    n = max(len(x), 1)
    return EvalResult(
        accuracy=(correct / n).to(torch.float32).cpu(), loss=(loss_sum / n).to(torch.float32).cpu()
    )


def predict(
    trainer: LocalTrainer,
    params: torch.Tensor,
    x: torch.Tensor,
    *,
    chunk: int | None = None,
    sample_chunk: int | None = None,
) -> torch.Tensor:
    """Predicted classes ``(B, N)`` of each model in ``params`` ((d,) gives ``(1, N)``)."""
    stack = _as_stack(trainer, params)
    out = torch.empty(len(stack), len(x), dtype=torch.int64)
    for rows, cols, logits in _logit_blocks(trainer, stack, x, chunk, sample_chunk):
        out[rows, cols] = logits.argmax(dim=-1)
    return out


def per_class_recall(
    trainer: LocalTrainer,
    params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Recall of each class: the fraction of its samples predicted correctly.

    ``params`` (d,) gives shape ``(num_classes,)``, a stack (B, d) gives ``(B, num_classes)``.
    A class absent from ``y`` has recall NaN. ``num_classes`` defaults to the model's
    number of outputs.
    """
    if num_classes is None:
        num_classes = trainer.num_outputs
    preds = predict(trainer, params, x)
    hits = (preds == y).to(torch.float64)
    support = torch.bincount(y, minlength=num_classes).to(torch.float64)
    per_class = torch.zeros(len(preds), num_classes, dtype=torch.float64)
    per_class.index_add_(1, y, hits)
    recall = (per_class / support).to(torch.float32)
    return recall[0] if params.dim() == 1 else recall
