"""Losses of a few parameter vectors on one shared mini-batch: what both drivers compute
for an ``EvaluateLosses`` effect (zeroth-order protocols, ``p2pfl.protocols.zeroth_order``).

SPSA estimates a directional derivative from ``L(x + eps z) - L(x - eps z)``; both losses
must be taken on the *same* batch, or the batch-to-batch noise swamps the difference.
So one batch is drawn from the peer's sampler (advancing it exactly as one ``Train``
step would) and every vector is evaluated on it, forward passes only, no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from p2pfl.learning.sampler import BatchSampler
from p2pfl.learning.trainer import BatchTransform, LocalTrainer

__all__ = ["batch_losses"]


def batch_losses(
    trainer: LocalTrainer,
    sampler: BatchSampler | None,
    params: Sequence[torch.Tensor],
    *,
    transform: BatchTransform | None = None,
) -> list[float]:
    """The mean cross-entropy of each of ``params`` on ``sampler``'s next batch.

    ``sampler`` ``None`` (a peer that holds no data): NaN for each, nothing drawn.
    ``transform`` changes the batch first (an attacker's poisoned data), as in training.
    """
    if sampler is None or not params:
        return [float("nan")] * len(params)
    for vector in params:
        if vector.dim() != 1 or vector.numel() != trainer.dim:
            raise ValueError(
                f"expected parameter vectors of {trainer.dim} values, got {tuple(vector.shape)}"
            )
    # the sampler's view is read-only: copy, as LocalTrainer.train does
    index = torch.from_numpy(np.array(sampler.next_batch(), dtype=np.int64))
    x, y = trainer.x.index_select(0, index), trainer.y.index_select(0, index)
    if transform is not None:
        x, y = transform(x, y)
    stack = torch.stack([v.detach().to(torch.float32) for v in params])
    with torch.no_grad():
        logits = trainer.logits_batched(stack, x)  # (k, batch, classes)
        losses = [F.cross_entropy(row, y) for row in logits]
    return [float(loss) for loss in losses]
