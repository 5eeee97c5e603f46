"""Carrying out protocols' ``Train`` effects: batched across peers, computed lazily.

A peer's training result depends only on its input parameters and its own batch sampler,
never on the virtual time at which it runs. So the simulator does not compute a ``Train``
effect when it is issued: it queues the job and computes *every* queued job in one batched
call the first time any result is needed. Peers that started training at different times
still share a batch; thousands of peers become a handful of batched calls.

With ``defer_mixing`` (the default of the batched backend) results come back as ``Row``
tensors and the protocols' weighted means are deferred (see ``sim.mixing``): when a job's
input is such a mean, the executor computes a chunk of peers' means as one sparse product
and trains that chunk straight from it, writing into a pooled result buffer. No per-peer
model object, stack or copy is made; a peer's model is a row of a shared buffer.

``backend="per_peer"`` runs the same jobs one model at a time, in the same order per peer,
with plain tensors and eager means: the reference path for equivalence tests and the
baseline of the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from p2pfl.learning import BatchSampler, LocalTrainer
from sim.mixing import Mixer, RowArena, consecutive, plain

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
        defer_mixing: bool | None = None,
    ) -> None:
        if backend not in ("batched", "per_peer"):
            raise ValueError(f"training backend must be 'batched' or 'per_peer', got {backend!r}")
        if defer_mixing and backend != "batched":
            raise ValueError("defer_mixing needs the batched backend")
        self.trainer = trainer
        self.samplers = samplers
        self.backend = backend
        self.transforms = transforms or {}
        #: peers per batched call: activations stay in cache (see ``LocalTrainer.peers_per_call``)
        self.chunk = max_batch or trainer.peers_per_call(trainer.batch_size)
        if defer_mixing is None:
            defer_mixing = backend == "batched"
        #: where results live: one buffer holds a whole round of peers, reused when free
        self.arena = RowArena(trainer.dim, capacity=len(samplers))
        self.mixer: Mixer | None = Mixer(self.arena, chunk=self.chunk) if defer_mixing else None
        self.pending: list[TrainJob] = []
        self.jobs_run = 0
        self.batches_run = 0
        self.fused_chunks = 0  # chunks trained straight from their deferred means

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
        if self.mixer is not None and self.mixer.pending:
            # Means nobody trains from (a crashed peer's, say): compute them now, so that
            # the rows they read can be reused instead of pinning a whole buffer.
            self.mixer.flush()

    # -- execution ---------------------------------------------------------------------
    def _run_one(self, job: TrainJob) -> None:
        sampler = self.samplers[job.peer]
        self.jobs_run += 1
        if sampler is None:  # relay-only peer: no data, nothing to learn
            job.result = job.params
            return
        transform = self.transforms.get(job.peer)
        job.result, job.loss = self.trainer.train(
            plain(job.params), sampler, job.steps, transform=transform
        )

    def _run_batched(self, jobs: list[TrainJob]) -> None:
        # Relay-only peers (no data) train nothing, but their result still becomes a row
        # like everyone's (group "0 steps"): a neighbour's stack then stays deferrable.
        by_steps: dict[int, list[TrainJob]] = {}
        for job in jobs:
            steps = 0 if self.samplers[job.peer] is None else job.steps
            by_steps.setdefault(steps, []).append(job)
        for steps, group in sorted(by_steps.items()):
            ident, first, out = self.arena.take(len(group))
            losses = torch.empty(len(group))
            norms = torch.empty(len(group))
            # Equal chunks (190 jobs: 95 + 95, not 152 + 38): no tiny call at the end.
            size = -(-len(group) // -(-len(group) // self.chunk))
            for start in range(0, len(group), size):
                stop = min(start + size, len(group))
                chunk = group[start:stop]
                target = out[start:stop]
                source = self._inputs([job.params for job in chunk], target)
                self.batches_run += 1
                if steps == 0:
                    if source is not target:
                        target.copy_(source)
                    losses[start:stop] = float("nan")
                else:
                    samplers = [self.samplers[job.peer] for job in chunk]
                    transforms = None
                    if self.transforms:
                        transforms = [self.transforms.get(job.peer) for job in chunk]
                    _, losses[start:stop] = self.trainer.train_batched(
                        source, samplers, steps, transforms=transforms, chunk=len(chunk), out=target  # type: ignore[arg-type]
                    )
                if self.mixer is not None and target.shape[1]:
                    # every result is about to travel and be bounded by each receiver's
                    # contract: bound the chunk now, while it is in cache, in one pass (a
                    # row's L2 norm bounds each of its values; NaN and Inf carry through)
                    torch.linalg.vector_norm(target, 2, dim=1, out=norms[start:stop])
            results: Sequence[torch.Tensor]
            if self.mixer is not None:
                bounds = norms.tolist() if out.shape[1] else None
                results = self.mixer.rows(ident, first, out, bounds)
            else:
                results = out.unbind(0)
            for job, result, loss in zip(group, results, losses.tolist(), strict=True):
                job.result = result
                job.loss = loss
            self.jobs_run += len(group)

    def _inputs(self, params: list[torch.Tensor], scratch: torch.Tensor) -> torch.Tensor:
        """The chunk's starting parameters as one ``(k, d)`` tensor, copying only if needed."""
        mixer = self.mixer
        if mixer is not None and all(mixer.is_pending(p) for p in params):
            self.fused_chunks += 1
            return mixer.resolve(params)  # type: ignore[arg-type]
        rows = consecutive(params)
        if rows is not None:
            return rows
        torch.stack([plain(p) for p in params], out=scratch)
        return scratch
