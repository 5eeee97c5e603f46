"""What a simulation measures at each evaluation point, and how it is written out.

Accuracy is measured on each peer's *own* current model (decentralized learning has no
global model); we report mean, min, max and spread across peers, plus the consensus
distance -- how far peers' models are from their average -- and the traffic so far.
At large N, evaluating every peer on the whole test set would dominate the run, so a
scenario may name a fixed random sample of peers and a test subset; the row says so.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl.learning import LocalTrainer, evaluate
from sim.engine import Engine
from sim.mixing import plain

METRIC_COLUMNS = [
    "round",
    "virtual_time",
    "wall_time",
    "acc_mean",
    "acc_min",
    "acc_max",
    "acc_std",
    "loss_mean",
    "consensus_distance",
    "bytes_total",
    "bytes_per_peer_mean",
    "bytes_per_peer_max",
    "messages_total",
    "peers_alive",
    "peers_evaluated",
    "test_samples",
]


def consensus_distance(models: list[torch.Tensor], chunk: int = 512) -> float:
    """Mean L2 distance of the models to their average (0 when all agree)."""
    if not models:
        return float("nan")
    total = torch.zeros_like(models[0], dtype=torch.float64)
    for start in range(0, len(models), chunk):
        total += torch.stack(models[start : start + chunk]).to(torch.float64).sum(dim=0)
    centre = (total / len(models)).to(models[0].dtype)
    distances = []
    for start in range(0, len(models), chunk):
        block = torch.stack(models[start : start + chunk])
        distances.append(torch.linalg.vector_norm(block - centre, dim=1))
    return float(torch.cat(distances).mean())


class Evaluator:
    """Evaluates peers' current models; owns the sample of peers and test points."""

    def __init__(
        self,
        trainer: LocalTrainer,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        n_peers: int,
        eval_peers: int = 0,
        test_samples: int = 0,
        seed: int = 0,
        chunk: int = 256,
    ) -> None:
        rng = np.random.default_rng([seed, 0xE7A1])
        if test_samples and test_samples < len(y_test):
            keep = torch.from_numpy(np.sort(rng.choice(len(y_test), test_samples, replace=False)))
            x_test, y_test = x_test[keep], y_test[keep]
        self.trainer = trainer
        self.x_test = x_test
        self.y_test = y_test
        self.peer_sample: np.ndarray | None = None
        if eval_peers and eval_peers < n_peers:
            self.peer_sample = np.sort(rng.choice(n_peers, eval_peers, replace=False))
        self.chunk = chunk
        self.started = time.perf_counter()
        self.seconds = 0.0  # wall time spent measuring (kept out of the rows: not reproducible)

    def measure(self, engine: Engine, round_: int) -> dict[str, Any]:
        started = time.perf_counter()
        candidates = (
            self.peer_sample if self.peer_sample is not None else np.arange(engine.n)
        )
        alive = [int(i) for i in candidates if engine.alive[i] and engine.started[i]]
        models = [plain(engine.protocols[i].params) for i in alive]
        accuracies, losses = [], []
        for start in range(0, len(models), self.chunk):
            block = torch.stack(models[start : start + self.chunk])
            result = evaluate(self.trainer, block, self.x_test, self.y_test)
            accuracies.append(result.accuracy)
            losses.append(result.loss)
        acc = torch.cat(accuracies).double() if accuracies else torch.full((1,), float("nan"))
        # per-peer accuracies, for breakdowns such as accuracy per connected component
        self.last_peers, self.last_accuracy = alive, acc[: len(alive)].numpy()
        loss = torch.cat(losses).double() if losses else torch.full((1,), float("nan"))
        sent = engine.stats.bytes_sent
        row = {
            "round": round_,
            "virtual_time": engine.now,
            "wall_time": time.perf_counter() - self.started,
            "acc_mean": float(acc.mean()),
            "acc_min": float(acc.min()),
            "acc_max": float(acc.max()),
            "acc_std": float(acc.std()) if acc.numel() > 1 else 0.0,
            "loss_mean": float(loss.mean()),
            "consensus_distance": consensus_distance(models),
            "bytes_total": int(sent.sum()),
            "bytes_per_peer_mean": float(sent.mean()),
            "bytes_per_peer_max": int(sent.max()),
            "messages_total": int(engine.stats.messages_sent.sum()),
            "peers_alive": int(engine.alive.sum()),
            "peers_evaluated": len(alive),
            "test_samples": len(self.y_test),
        }
        self.seconds += time.perf_counter() - started
        return row


def csv_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The standard columns first, then any others in the order the rows bring them."""
    columns = list(METRIC_COLUMNS)
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


class RowRecorder:
    """Appends each row to ``metrics.csv`` the moment it is measured, flushed to the OS.

    A run killed, interrupted or crashed keeps every row measured before: the file is
    never only in memory. Rows of one run normally share their columns; should a later
    row bring a new one, the file is rewritten once with the wider header.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._columns: list[str] = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._columns and all(k in self._columns for k in row):
            with self.path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self._columns).writerow(row)
            return
        self._columns = csv_columns(self.rows)
        write_csv(self.rows, self.path)
