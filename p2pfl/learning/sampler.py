"""Per-peer minibatch order: deterministic, cheap, and resumable from one integer.

A peer's stream of training indices is the concatenation of per-epoch permutations of its
partition. Epoch ``e``'s permutation is a pure function of ``(seed, e)`` (the argsort of a
counter-based hash), so the sampler's whole state is the number of indices handed out so
far: a checkpoint stores one integer, and many epochs can be drawn in one vectorised
call. The latter matters when 10,000 peers hold six samples each and every batch of 32
spans several epochs.

Every batch has exactly ``batch_size`` indices (what ``vmap`` over peers needs): a batch
that reaches the end of an epoch continues into the next, so a partition smaller than
``batch_size`` yields batches that repeat samples, each as evenly as the epochs allow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BatchSampler", "derive_seed", "sampler_seed"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Draw at least this many batches' worth of indices per refill (amortises the hashing).
_PREFETCH_BATCHES = 8


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (independent streams per peer)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


def sampler_seed(seed: int, peer_index: int) -> int:
    """The minibatch seed of peer ``peer_index`` in a run seeded ``seed``.

    The simulator and the real node both seed their samplers with it, so peer ``i``
    draws the same minibatches of the same data share in either driver.
    """
    return derive_seed(seed, 1, peer_index)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixing hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


class BatchSampler:
    """Deterministic minibatches of one peer's sample ``indices``."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or len(self.indices) == 0:
            raise ValueError("a BatchSampler needs a non-empty 1-D array of indices")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._key = _mix64(np.array([self.seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        self._consumed = 0
        self._buffer = np.empty(0, dtype=np.int64)
        self._buffer_start = 0  # stream position of _buffer[0]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def consumed(self) -> int:
        """How many indices have been handed out since the start."""
        return self._consumed

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from."""
        return self._consumed // len(self.indices)

    def next_batch(self) -> np.ndarray:
        """The next ``batch_size`` sample indices (a read-only view; do not modify)."""
        end = self._consumed + self.batch_size
        if end > self._buffer_start + len(self._buffer):
            self._refill(end)
        lo = self._consumed - self._buffer_start
        self._consumed = end
        return self._buffer[lo : lo + self.batch_size]

    def _refill(self, end: int) -> None:
        n = len(self.indices)
        first = self._consumed // n
        ahead = self._consumed + _PREFETCH_BATCHES * self.batch_size
        last = (max(end, ahead) - 1) // n
        self._buffer = self.epochs(first, last + 1).reshape(-1)
        self._buffer.setflags(write=False)
        self._buffer_start = first * n

    def epochs(self, start: int, stop: int) -> np.ndarray:
        """The permuted indices of epochs ``start .. stop-1``, shape ``(stop - start, n)``."""
        n = len(self.indices)
        e = np.arange(start, stop, dtype=np.uint64)[:, None]
        i = np.arange(n, dtype=np.uint64)[None, :]
        with np.errstate(over="ignore"):
            keys = _mix64(_mix64(self._key ^ _mix64(e * _GOLDEN + _GOLDEN)) + i * _GOLDEN)
        return self.indices[np.argsort(keys, axis=1, kind="stable")]

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position, msgpack-able: restore with ``load_state_dict``."""
        return {
            "consumed": self._consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "size": len(self.indices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position saved by ``state_dict`` (same indices, seed and batch size)."""
        mine = (self.seed, self.batch_size, len(self.indices))
        theirs = (state["seed"], state["batch_size"], state["size"])
        if mine != theirs:
            raise ValueError(
                f"sampler state is for (seed, batch_size, size)={theirs}, this is {mine}"
            )
        self._consumed = int(state["consumed"])
        self._buffer = np.empty(0, dtype=np.int64)
        self._buffer_start = 0
