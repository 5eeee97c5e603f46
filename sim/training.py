"""Carrying out protocols' ``Train`` effects: batched across peers, computed lazily.

A peer's training result depends only on its input parameters and its own batch sampler,
never on the virtual time at which it runs. So the simulator does not compute a ``Train``
effect when it is issued: it queues the job and computes *every* queued job in one batched
call the first time any result is needed. Peers that started training at different times
still share a batch; thousands of peers become a handful of batched calls.

With ``defer_mixing`` (the default of the batched backend) results come back as ``Row``
tensors and the protocols' weighted means are deferred (see ``sim.mixing``): when a job's
input is such a mean, the executor computes a chunk of peers' means as one sparse product
into a reused scratch chunk and trains that chunk straight from it, writing into a block
of the row arena (a chunk is split where it must fill a hole the arena has left). No
per-peer model object, stack or copy is made, and a mean's value is not kept: a peer's
model is a row of a shared buffer, or a mean of such rows.

``backend="per_peer"`` runs the same jobs one model at a time, in the same order per peer,
with plain tensors and eager means: the reference path for equivalence tests and the
baseline of the benchmark.

With a ``device`` (``sim.device``; see ``sim.device`` and docs/gpu.md) the batched path
keeps everything on that device: the arena's blocks (``DeviceArena``), the deferred means
(``DeviceMixer``), the scratch, and the training data, moved there once; per chunk only
the batch indices go over and the losses and row bounds come back. Without one (the
default) it is the numpy/scipy path above, untouched. ``device=torch.device("cpu")``
runs the device path's torch code on the CPU: how it is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from p2pfl.learning import BatchSampler, LocalTrainer
from sim.device import DeviceArena, DeviceMixer, device_chunk
from sim.memory import arena_rows, release_free_heap
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
        device: torch.device | None = None,
    ) -> None:
        if backend not in ("batched", "per_peer"):
            raise ValueError(f"training backend must be 'batched' or 'per_peer', got {backend!r}")
        if defer_mixing and backend != "batched":
            raise ValueError("defer_mixing needs the batched backend")
        if device is not None and (backend != "batched" or defer_mixing is False or transforms):
            raise ValueError("the device path needs the batched backend, deferred means and no batch transforms")
        self.trainer = trainer
        self.samplers = samplers
        self.backend = backend
        self.transforms = transforms or {}
        #: where the device path keeps rows, means and training data (``None``: numpy/scipy)
        self.device = device
        #: peers per batched call: activations stay in cache (see ``LocalTrainer.peers_per_call``)
        self.chunk = max_batch or (
            trainer.peers_per_call(trainer.batch_size) if device is None else device_chunk(trainer, device)
        )
        if defer_mixing is None:
            defer_mixing = backend == "batched"
        #: where results live: one buffer of room for a few rounds of peers (the round
        #: being trained and the rounds its means read), reused a block at a time as rows die
        self.arena: RowArena | DeviceArena
        self.mixer: Mixer | None
        if device is None:
            rows = arena_rows(len(samplers), self.chunk, row_bytes=4 * trainer.dim)
            self.arena = RowArena(trainer.dim, capacity=rows)
            self.mixer = Mixer(self.arena, chunk=self.chunk) if defer_mixing else None
        else:
            # the device's own arena, as many rows (no cap from the host's memory: its
            # blocks are the device's, allocated as they go)
            self.arena = DeviceArena(trainer.dim, arena_rows(len(samplers), self.chunk), device)
            self.mixer = DeviceMixer(self.arena, chunk=self.chunk)
        #: the trainer the batched path calls: on the device path, one whose training data
        #: were moved there once (only batch indices travel per chunk)
        self.batch_trainer = trainer if device is None else trainer.on_device(device)
        #: one chunk's training inputs (deferred means computed for it), reused
        self.scratch: torch.Tensor | None = None
        self._trim_at = len(samplers)  # see ``flush``: give the start models' memory back
        #: per peer, training jobs run so far (a job's generation), and the newest one
        self.generation = [0] * len(samplers)
        self._newest = 0
        #: the smallest piece a chunk is split into to fill a hole of the arena
        self.min_piece = max(8, self.chunk // 4)
        if self.mixer is not None:
            mixer = self.mixer
            # the arena is full: settle the means of peers two generations or more behind
            # the newest (stopped or far behind: their values cost a row each, the old
            # rows they pin up to a block each)
            self.arena.reclaim = lambda: mixer.settle_spent(before=self._newest - 1)
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
        if self.jobs_run >= self._trim_at and self.backend == "batched":
            # Every peer starts from its own copy of the start model: one small heap block
            # each, freed after the first round but kept by the C allocator (other objects
            # live between them), about a row per peer for nothing. Handed back twice,
            # after the first and the second round of jobs.
            self._trim_at = self._trim_at + len(self.samplers) if self._trim_at <= len(self.samplers) else 1 << 62
            release_free_heap()
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
        if self.mixer is not None:
            if self.mixer.pending:
                # Means nobody trains from (a crashed peer's, say): compute them now, so
                # that the rows they read can be reused instead of pinning their blocks.
                self.mixer.flush()

    # -- execution ---------------------------------------------------------------------
    def _run_one(self, job: TrainJob) -> None:
        sampler = self.samplers[job.peer]
        self.jobs_run += 1
        if sampler is None:  # relay-only peer: no data, nothing to learn
            job.result = job.params
            return
        transform = self.transforms.get(job.peer)
        # a node's own call (p2pfl.node): the per-peer backend trains exactly as a node does
        job.result, job.loss = self.trainer.train_one(
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
            losses = torch.empty(len(group))
            results: list[torch.Tensor] = []
            # The device arena's blocks are tensors of their own, and a mean whose rows lie
            # in k blocks costs k products: the whole group's results go into one block.
            block = self.arena.take(len(group)) if self.device is not None else None
            start = 0
            while start < len(group):
                # Equal chunks of what is left (190 jobs: 95 + 95, not 152 + 38), a chunk
                # or as much of it as the arena's hole takes; after a hole the rest is cut
                # into equal chunks again: no call of a few rows (each costs a training
                # call and a product) at the end of a split chunk.
                left = len(group) - start
                size = -(-left // -(-left // self.chunk))
                start += self._run_piece(group, start, start + size, steps, losses, results, block)
            del block
            for job, result, loss in zip(group, results, losses.tolist(), strict=True):
                job.result = result
                job.loss = loss
            self.jobs_run += len(group)

    def _run_piece(
        self, group: list[TrainJob], start: int, stop: int, steps: int,
        losses: torch.Tensor, results: list[torch.Tensor],
        block: tuple[int, int, torch.Tensor] | None = None,
    ) -> int:
        """Train ``group[start:stop]``, or as much of it as the arena's first hole takes
        (at least ``min_piece`` rows unless fewer are left); how many jobs it trained.
        ``block`` (the device path): the group's rows, taken already."""
        if block is None:
            ident, first, target = self.arena.take(stop - start, at_least=min(stop - start, self.min_piece))
        else:
            ident, first, target = block[0], block[1] + start, block[2][start:stop]
        stop = start + target.shape[0]
        chunk = group[start:stop]
        generations = [self.generation[job.peer] for job in chunk]
        self._newest = max(self._newest, *generations)
        source = self._inputs([job.params for job in chunk], target, generations)
        for job in chunk:
            self.generation[job.peer] += 1
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
            _, losses[start:stop] = self.batch_trainer.train_batched(
                source, samplers, steps, transforms=transforms, chunk=len(chunk), out=target  # type: ignore[arg-type]
            )
        if self.mixer is not None:
            bounds = None
            if target.shape[1]:
                # every result is about to travel and be bounded by each receiver's
                # contract: bound the chunk now, while it is in cache, in one pass (a
                # row's L2 norm bounds each of its values; NaN and Inf carry through)
                bounds = torch.linalg.vector_norm(target, 2, dim=1).tolist()
            results += self.mixer.rows(ident, first, target, bounds)
        else:
            results += target.unbind(0)
        return len(chunk)

    def _inputs(
        self, params: list[torch.Tensor], target: torch.Tensor, generations: list[int] | None = None
    ) -> torch.Tensor:
        """The chunk's starting parameters as one ``(k, d)`` tensor, copying only if needed.

        Deferred means are computed into the executor's scratch (one chunk's worth, reused
        for every chunk) and trained from there: their values are never stored, which is
        what keeps the batched path at about two rows per peer. Inputs with no deferred
        mean among them are stacked into ``target`` and trained in place, as before.
        """
        mixer = self.mixer
        if mixer is not None:
            pending = sum(1 for p in params if mixer.is_pending(p))
            if pending:
                self.fused_chunks += pending == len(params)
                return mixer.compute_into(params, self._scratch(len(params)), generations)
        rows = consecutive(params)
        if rows is not None:
            return rows
        torch.stack([plain(p) for p in params], out=target)
        return target

    def _scratch(self, rows: int) -> torch.Tensor:
        """``rows`` rows of the shared scratch (allocated once, at the largest chunk)."""
        if self.scratch is None or self.scratch.shape[0] < rows:
            self.scratch = torch.empty(
                (max(rows, self.chunk), self.trainer.dim), dtype=torch.float32, device=self.device
            )
        return self.scratch[:rows]
