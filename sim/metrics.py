"""What a simulation measures at each evaluation point, and how it is written out.

Accuracy is measured on each peer's *own* current model (decentralized learning has no
global model); we report mean, min, max and spread across peers, plus the consensus
distance -- how far peers' models are from their average -- and the traffic so far.
At large N, evaluating every peer on the whole test set would dominate the run, so a
scenario may name a fixed random sample of peers and a test subset; the row says so.

On the device path (``sim.device``) the evaluator keeps the test data on the device and
evaluates the peers' models there, where every one of them is (the start model included:
it is moved when the run is built); ``p2pfl.learning.evaluate`` works where its inputs
are, and the results come back.
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

ALL_DEVICES_COLUMNS = [
    "acc_mean_all",
    "acc_min_all",
    "acc_max_all",
    "acc_std_all",
    "peers_evaluated_all",
]
"""Accuracy over every started device, the dead ones with the model they last held
(added by the disruption runtime; ``acc_*`` above are over live peers only)."""


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
        device: torch.device | None = None,
    ) -> None:
        rng = np.random.default_rng([seed, 0xE7A1])
        if test_samples and test_samples < len(y_test):
            keep = torch.from_numpy(np.sort(rng.choice(len(y_test), test_samples, replace=False)))
            x_test, y_test = x_test[keep], y_test[keep]
        if device is not None:  # where the peers' models are (the device path's)
            x_test, y_test = x_test.to(device), y_test.to(device)
        self.trainer = trainer
        self.x_test = x_test
        self.y_test = y_test
        self.peer_sample: np.ndarray | None = None
        if eval_peers and eval_peers < n_peers:
            self.peer_sample = np.sort(rng.choice(n_peers, eval_peers, replace=False))
        self.chunk = chunk
        self.last_all_peers: list[int] = []
        self.last_all_accuracy: np.ndarray = np.zeros(0)
        self.started = time.perf_counter()
        self.seconds = 0.0  # wall time spent measuring (kept out of the rows: not reproducible)

    def _evaluate(self, models: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accuracy and loss of each model (float64), a block of ``chunk`` at a time."""
        accuracies, losses = [], []
        for start in range(0, len(models), self.chunk):
            block = torch.stack(models[start : start + self.chunk])
            result = evaluate(self.trainer, block, self.x_test, self.y_test)
            accuracies.append(result.accuracy)
            losses.append(result.loss)
        empty = torch.zeros(0, dtype=torch.float64)
        acc = torch.cat(accuracies).double() if accuracies else empty
        loss = torch.cat(losses).double() if losses else empty
        return acc, loss

    def measure(self, engine: Engine, round_: int) -> dict[str, Any]:
        started = time.perf_counter()
        candidates = self.peer_sample if self.peer_sample is not None else np.arange(engine.n)
        alive = [int(i) for i in candidates if engine.alive[i] and engine.started[i]]
        models = [plain(engine.protocols[i].params) for i in alive]
        live_acc, live_loss = self._evaluate(models)
        # per-peer accuracies, for breakdowns such as accuracy per connected component
        self.last_peers, self.last_accuracy = alive, live_acc.numpy()
        # Devices that died keep the model they last held: a disaster study that averages
        # over survivors only hides what the dead devices' owners are left with. They are
        # evaluated only when there are any (runs without failures pay nothing).
        dead = [int(i) for i in candidates if not engine.alive[i] and engine.started[i]]
        dead_acc, _ = self._evaluate([plain(engine.protocols[i].params) for i in dead])
        self.last_all_peers = alive + dead
        self.last_all_accuracy = torch.cat([live_acc, dead_acc]).numpy()
        nan = torch.full((1,), float("nan"), dtype=torch.float64)
        acc = live_acc if live_acc.numel() else nan
        loss = live_loss if live_loss.numel() else nan
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


def all_devices_row(accuracy: np.ndarray | Any) -> dict[str, Any]:
    """``ALL_DEVICES_COLUMNS`` from the accuracies of every evaluated device, dead or alive.

    The counterpart of ``acc_mean`` / ``acc_min`` / ``acc_max`` / ``acc_std`` /
    ``peers_evaluated``, which cover the peers still alive only (survivor-biased).
    """
    acc = np.asarray(accuracy, dtype=np.float64).reshape(-1)
    if not acc.size:
        nan = float("nan")
        return dict.fromkeys(ALL_DEVICES_COLUMNS[:-1], nan) | {"peers_evaluated_all": 0}
    return {
        "acc_mean_all": float(acc.mean()),
        "acc_min_all": float(acc.min()),
        "acc_max_all": float(acc.max()),
        "acc_std_all": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
        "peers_evaluated_all": int(acc.size),
    }


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

    def restart(self, rows: list[dict[str, Any]]) -> None:
        """Continue a file from ``rows`` (a run resumed from its checkpoint): the file is
        rewritten with exactly those rows, atomically, dropping any measured after them."""
        self.rows = list(rows)
        self._columns = csv_columns(self.rows)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        write_csv(self.rows, temporary)
        temporary.replace(self.path)

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._columns and all(k in self._columns for k in row):
            with self.path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self._columns).writerow(row)
            return
        self._columns = csv_columns(self.rows)
        write_csv(self.rows, self.path)
