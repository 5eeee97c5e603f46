"""Carrying out protocols' ``Train`` effects: batched across peers, computed lazily.

A peer's training result depends only on its input parameters and its own batch sampler,
never on the virtual time at which it runs. So the simulator does not compute a ``Train``
effect when it is issued: it queues the job and computes *every* queued job in one batched
call the first time any result is needed. Peers that started training at different times
still share a batch; thousands of peers become a handful of ``vmap`` calls.

``backend="per_peer"`` runs the same jobs one model at a time, in the same order per peer,
as the reference path for equivalence tests and as a baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from p2pfl.learning import BatchSampler, LocalTrainer

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class TrainJob:
    peer: int
    params: torch.Tensor
    steps: int
    result: torch.Tensor | None = None
    loss: float = float("nan")
    cancelled: bool = False


class TrainingExecutor:
    """Queues ``Train`` effects and computes them in batches on demand."""

    def __init__(
        self,
        trainer: LocalTrainer,
        samplers: list[BatchSampler | None],
        *,
        backend: str = "batched",
        transforms: dict[int, BatchTransform] | None = None,
        max_batch: int | None = None,
    ) -> None:
        if backend not in ("batched", "per_peer"):
            raise ValueError(f"training backend must be 'batched' or 'per_peer', got {backend!r}")
        self.trainer = trainer
        self.samplers = samplers
        self.backend = backend
        self.transforms = transforms or {}
        self.max_batch = max_batch
        self.pending: list[TrainJob] = []
        self.jobs_run = 0
        self.batches_run = 0

    def submit(self, peer: int, params: torch.Tensor, steps: int) -> TrainJob:
        job = TrainJob(peer, params, steps)
        self.pending.append(job)
        return job

    def ensure_done(self, job: TrainJob) -> None:
        """Make ``job.result`` available, computing every queued job if needed."""
        if job.result is None:
            self.flush()

    def flush(self) -> None:
        jobs = [j for j in self.pending if not j.cancelled]
        self.pending = []
        if not jobs:
            return
        if self.backend == "per_peer":
            for job in jobs:
                self._run_one(job)
            return
        # A peer's jobs must run in submission order (its sampler advances); peel off
        # one job per peer per pass. Normally every peer has exactly one pending job.
        while jobs:
            seen: set[int] = set()
            this_pass: list[TrainJob] = []
            later: list[TrainJob] = []
            for job in jobs:
                (later if job.peer in seen else this_pass).append(job)
                seen.add(job.peer)
            self._run_batched(this_pass)
            jobs = later

    # -- execution ---------------------------------------------------------------------
    def _run_one(self, job: TrainJob) -> None:
        sampler = self.samplers[job.peer]
        self.jobs_run += 1
        if sampler is None:  # relay-only peer: no data, nothing to learn
            job.result = job.params
            return
        transform = self.transforms.get(job.peer)
        job.result, job.loss = self.trainer.train(job.params, sampler, job.steps, transform=transform)

    def _run_batched(self, jobs: list[TrainJob]) -> None:
        by_steps: dict[int, list[TrainJob]] = {}
        for job in jobs:
            if self.samplers[job.peer] is None:
                self._run_one(job)
            else:
                by_steps.setdefault(job.steps, []).append(job)
        for steps, group in sorted(by_steps.items()):
            size = self.max_batch or self.trainer.peers_per_call(self.trainer.batch_size)
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                params = torch.stack([job.params for job in chunk])
                samplers = [self.samplers[job.peer] for job in chunk]
                transforms = None
                if self.transforms:
                    transforms = [self.transforms.get(job.peer) for job in chunk]
                # ``params`` is a fresh stack: let the trainer update it in place.
                result, losses = self.trainer.train_batched(
                    params, samplers, steps, transforms=transforms, inplace=True
                )
                for row, job in enumerate(chunk):
                    job.result = result[row]
                    job.loss = float(losses[row])
                self.jobs_run += len(chunk)
                self.batches_run += 1
