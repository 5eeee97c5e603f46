"""The shared start model of zeroth-order fine-tuning: a model trained briefly with SGD.

Zeroth-order methods (MeZO, "Just One Byte") fine-tune: from a random start SPSA needs
far more steps than SGD (its estimate's variance grows with the model's size). Every peer
computes the same start from the configuration alone, as Bristle's extractor is computed:
``steps`` SGD steps from the seeded initial model on a "public" split of ``samples``
training samples drawn with the run's seed. That split is drawn from the same training
set the peers' shares are cut from (it overlaps them): the set-up is fine-tuning on the
peers' task, not transfer from another task.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from p2pfl.learning import BatchSampler, LocalTrainer

__all__ = ["pretrained_start"]

#: keeps this split's draw apart from every other use of the run's seed
_TAG = 0x2E80


def pretrained_start(
    trainer: LocalTrainer, init: Tensor, *, seed: int, samples: int, steps: int
) -> Tensor:
    """``steps`` SGD steps from ``init`` on ``samples`` training samples drawn with ``seed``;
    ``init`` itself for 0 steps. Deterministic: every peer computes the same vector."""
    if steps <= 0:
        return init
    rng = np.random.default_rng([seed, _TAG])
    n_train = len(trainer.y)
    public = np.sort(rng.choice(n_train, min(samples, n_train), replace=False))
    sampler = BatchSampler(public, trainer.batch_size, int(rng.integers(2**62)))
    start, _ = trainer.train(init, sampler, steps)
    return start
