"""Running the batched rounds on an accelerator: device choice and the device kernels.

What lives on the device and what does not. The expensive part of a batched round is
arithmetic on ``(N, d)`` stacks: the training steps of every peer and the mixing product
``W @ T``. Both are device-generic torch here: the stack, the training data (``x``, ``y``)
and the mixing matrix (a sparse CSR tensor) are moved to the device once; per round only
the batch indices travel (``N x batch`` int64, a few hundred KB at 10,000 peers) and,
where a caller reads them, per-peer losses. Protocol messages stay where the simulator's
protocols expect them (CPU tensors): the boundary is :meth:`DeviceRounds.params`, which
hands out CPU copies of the rows asked for, nothing else crosses per round.

``resolve_device`` turns the configured name into a ``torch.device`` or a one-line
configuration error (``sim.device = "cuda"`` on a machine without CUDA).

``DeviceRounds`` is D-PSGD with fixed mixing weights in rounds on one device: the same
computation as the simulator's batched path (train every peer from its mixed row, by
chunks; mix with the Metropolis-Hastings matrix), minus the event loop. On the CPU it
reproduces the simulator's models within float tolerance (torch's sparse product sums in
its own order, scipy's in another); on CUDA within a looser one (other kernels).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from p2pfl.learning import BatchSampler, LocalTrainer
from p2pfl.model import unflatten
from sim.errors import ScenarioError

#: devices a scenario may name (``sim.device``)
DEVICES = ("cpu", "cuda")


def resolve_device(name: str, *, key: str = "sim.device") -> torch.device:
    """``name`` as a torch device, or a one-line ``ScenarioError`` saying why not."""
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise ScenarioError(f"{key} = {name!r}: expected one of {', '.join(DEVICES)} (optionally 'cuda:N')")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ScenarioError(f"{key} = {name!r}: CUDA is not available on this machine (torch {torch.__version__})")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ScenarioError(f"{key} = {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ScenarioError(f"{key} = {name!r}: {error}") from None


def peak_device_bytes(device: torch.device) -> int:
    """Peak memory torch allocated on ``device`` since the last reset (0 for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return 0


class DeviceRounds:
    """Train-then-mix rounds for ``N`` peers with the whole stack on ``device``.

    ``trainer`` must be a Flatten/Linear/ReLU stack (the batched kernel of
    ``LocalTrainer``); ``samplers`` give each peer's batches exactly as the simulator's
    executor draws them; ``weights`` is the ``(N, N)`` mixing matrix (scipy sparse).
    Two ``(N, d)`` stacks on the device (double buffering) and one chunk of mixed rows:
    about two rows per peer of device memory.
    """

    def __init__(
        self,
        trainer: LocalTrainer,
        samplers: Sequence[BatchSampler],
        weights: Any,
        start: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        steps: int = 1,
        chunk: int | None = None,
    ) -> None:
        self.device = torch.device(device) if isinstance(device, str) else device
        stacked = getattr(trainer, "_stacked", None)
        if stacked is None:
            raise ScenarioError(
                "sim.device: the device path trains Flatten/Linear/ReLU models only (model.name = 'mlp' or 'logreg')"
            )
        self.kernel = stacked
        self.trainer = trainer
        self.samplers = list(samplers)
        self.steps = steps
        n, dim = len(self.samplers), trainer.dim
        self.n, self.dim = n, dim
        self.chunk = chunk or trainer.peers_per_call(trainer.batch_size)
        self.x = trainer.x.to(self.device)
        self.y = trainer.y.to(self.device)
        csr = weights.tocsr().astype(np.float32)
        self.weights = _csr(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data),
            csr.shape,
            self.device,
        )
        self.blocks = [(a, min(a + self.chunk, n)) for a in range(0, n, self.chunk)]
        self.rows = [self.weights_rows(a, b) for a, b in self.blocks]
        self.stacks = [torch.empty((n, dim), dtype=torch.float32, device=self.device) for _ in range(2)]
        self.start = start.to(self.device, torch.float32)
        self.done = 0
        self.losses = torch.zeros(n, dtype=torch.float32, device=self.device)

    def weights_rows(self, first: int, stop: int) -> torch.Tensor:
        """Rows ``first:stop`` of the mixing matrix, as their own CSR tensor."""
        crow = self.weights.crow_indices()
        lo, hi = int(crow[first]), int(crow[stop])
        return _csr(
            crow[first : stop + 1] - lo,
            self.weights.col_indices()[lo:hi],
            self.weights.values()[lo:hi],
            (stop - first, self.n),
            self.device,
        )

    def run(self, rounds: int) -> None:
        """``rounds`` rounds: each peer trains from its mixed row (the start model in the
        first round), the results become the next round's stack."""
        for _ in range(rounds):
            out = self.stacks[self.done % 2]
            trained = self.stacks[(self.done - 1) % 2] if self.done else None
            for (a, b), rows in zip(self.blocks, self.rows, strict=True):
                if trained is None:
                    source = self.start.expand(b - a, self.dim).contiguous()
                else:
                    source = torch.sparse.mm(rows, trained)
                self._train(source, out[a:b], a, b)
            self.done += 1

    def params(self, peers: Sequence[int]) -> torch.Tensor:
        """The models of ``peers`` now (their last round's mix), as a CPU tensor: the one
        place rows leave the device."""
        if not self.done:
            return self.start.expand(len(peers), self.dim).cpu()
        trained = self.stacks[(self.done - 1) % 2]
        index = torch.as_tensor(list(peers), dtype=torch.int64)
        out = []
        for a, b in self.blocks:
            inside = index[(index >= a) & (index < b)]
            if len(inside):
                mixed = torch.sparse.mm(self.weights_rows(a, b), trained)
                out.append((inside, mixed[(inside - a).to(self.device)]))
        result = torch.empty((len(peers), self.dim), dtype=torch.float32)
        order = {int(p): i for i, p in enumerate(peers)}
        for inside, values in out:
            result[[order[int(p)] for p in inside]] = values.cpu()
        return result

    def _train(self, source: torch.Tensor, target: torch.Tensor, a: int, b: int) -> None:
        src = unflatten(source, self.trainer.layout)
        dst = unflatten(target, self.trainer.layout)
        batch = self.trainer.batch_size
        for _ in range(self.steps):
            idx = np.concatenate([s.next_batch() for s in self.samplers[a:b]])
            index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.device)
            x = self.x.index_select(0, index).view(b - a, batch, *self.trainer.input_shape)
            y = self.y.index_select(0, index).view(b - a, batch)
            loss = self.kernel.step(
                src, dst, x, y, lr=self.trainer.lr, weight_decay=self.trainer.weight_decay
            )
            self.losses[a:b] = loss
            src = dst


def _csr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """A CSR tensor on ``device`` (built from valid scipy CSR: no invariant checks; torch's
    note that sparse CSR is a beta feature is silenced, the products used are stable)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, device=device, check_invariants=False)
