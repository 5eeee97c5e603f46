"""The Flower side of ``benchmarks/vs_flower.py``: FedAvg on the MNIST MLP as a Flower app.

A separate module because Ray's workers import it by name (``benchmarks/`` is put on
their ``PYTHONPATH``) and because it needs ``flwr``, an optional benchmark dependency
(extra ``flower``); ``vs_flower.py`` itself imports neither Flower nor torch at the top.

The task is the one ``p2pfl sim`` runs in the same benchmark, piece for piece: the same
training set cut into the same ``n + 1`` IID shares (client ``k`` holds share ``k + 1``;
share 0 is our server's, which trains nothing), the same start model, the same minibatches
(our per-peer ``BatchSampler`` with peer ``k + 1``'s seed, advanced to the round), the same
number of plain SGD steps (one local epoch), batch size and learning rate, FedAvg weighted
by sample counts, and the server's model evaluated on the whole test set before the first
round and after the last. The training loop itself is the plain torch loop a Flower user
writes; the data and model pieces come from ``p2pfl.learning`` so that nothing but the
framework differs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from p2pfl.learning.datasets import load_dataset
from p2pfl.learning.models import build_model
from p2pfl.learning.partition import partition
from p2pfl.learning.sampler import BatchSampler, sampler_seed
from p2pfl.learning.trainer import LocalTrainer
from p2pfl.model import load_flat

__all__ = ["FlowerTask", "client_app", "server_app"]

#: per worker process: (dataset name, seed, shares) -> (x, y, shares); a Ray actor runs
#: many clients, and loading MNIST per client would be a cost no Flower user pays
_DATA: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, list[Any]]] = {}


class FlowerTask:
    """What both sides agree on; travels to the clients as a ``ConfigRecord``."""

    def __init__(
        self, *, n: int, rounds: int, seed: int, steps: int, batch_size: int, lr: float, dataset: str
    ) -> None:
        self.n, self.rounds, self.seed, self.steps = n, rounds, seed, steps
        self.batch_size, self.lr, self.dataset = batch_size, lr, dataset

    def config(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "shares": self.n + 1,
                "seed": self.seed,
                "steps": self.steps,
                "batch-size": self.batch_size,
                "lr": self.lr,
                "dataset": self.dataset,
            }
        )


def _data(dataset: str, seed: int, shares: int) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    key = (dataset, seed, shares)
    if key not in _DATA:
        data = load_dataset(dataset, seed=seed)
        parts = partition(data.y_train.numpy(), shares, "iid", seed=seed)
        _DATA[key] = (data.x_train, data.y_train, parts)
    return _DATA[key]


def _net(dataset: str, seed: int) -> torch.nn.Module:
    data = load_dataset(dataset, seed=seed)
    return build_model("mlp", data.input_shape, data.num_classes)


def start_state(dataset: str, seed: int, lr: float, batch_size: int) -> dict[str, torch.Tensor]:
    """The start model of a ``p2pfl sim`` run seeded ``seed``, as a state dict."""
    data = load_dataset(dataset, seed=seed)
    net = build_model("mlp", data.input_shape, data.num_classes)
    trainer = LocalTrainer(net, data.x_train, data.y_train, lr=lr, batch_size=batch_size)
    load_flat(net, trainer.init_params(seed))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


client_app = ClientApp()


def _scalar(cfg: ConfigRecord, key: str) -> int | float | str:
    """``cfg[key]``, checked to be a single number or string (not bytes or a list)."""
    value = cfg[key]
    if not isinstance(value, (int, float, str)):
        kind = type(value).__name__
        raise TypeError(f"Flower config {key!r} is a {kind}, expected a number or string")
    return value


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One local epoch of plain SGD from the global model on this client's share."""
    cfg, arrays = msg.content["config"], msg.content["arrays"]
    if not isinstance(cfg, ConfigRecord) or not isinstance(arrays, ArrayRecord):
        raise TypeError("Flower message: expected ConfigRecord 'config', ArrayRecord 'arrays'")
    dataset, seed = str(cfg["dataset"]), int(_scalar(cfg, "seed"))
    shares = int(_scalar(cfg, "shares"))
    steps, batch_size = int(_scalar(cfg, "steps")), int(_scalar(cfg, "batch-size"))
    x, y, parts = _data(dataset, seed, shares)
    peer = int(context.node_config["partition-id"]) + 1  # share 0 is the server's
    sampler = BatchSampler(parts[peer], batch_size, sampler_seed(seed, peer))
    done = (int(_scalar(cfg, "server-round")) - 1) * steps * batch_size
    sampler.load_state_dict({**sampler.state_dict(), "consumed": done})
    net = _net(dataset, seed)
    net.load_state_dict(arrays.to_torch_state_dict())
    optimizer = torch.optim.SGD(net.parameters(), lr=float(_scalar(cfg, "lr")))
    total = 0.0
    for _ in range(steps):
        idx = torch.from_numpy(sampler.next_batch().copy())
        loss = F.cross_entropy(net(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.item())
    reply = RecordDict(
        {
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"train_loss": total / steps, "num-examples": len(parts[peer])}),
        }
    )
    return Message(content=reply, reply_to=msg)


def _accuracy(net: torch.nn.Module, dataset: str, seed: int) -> float:
    data = load_dataset(dataset, seed=seed)
    with torch.no_grad():
        predicted = net(data.x_test).argmax(dim=1)
    return float((predicted == data.y_test).double().mean())


def server_app(task: FlowerTask, result_path: Path) -> ServerApp:
    """FedAvg over every client each round (full participation); the final global
    model's test accuracy (and the start model's) written to ``result_path`` as JSON."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        accuracy: dict[int, float] = {}

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round not in (0, task.rounds):  # p2pfl sim: round 0 and the last
                return None
            net = _net(task.dataset, task.seed)
            net.load_state_dict(arrays.to_torch_state_dict())
            accuracy[server_round] = _accuracy(net, task.dataset, task.seed)
            return MetricRecord({"accuracy": accuracy[server_round]})

        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # no client-side evaluation: p2pfl sim does none either
            min_train_nodes=task.n,
            min_available_nodes=task.n,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(start_state(task.dataset, task.seed, task.lr, task.batch_size)),
            num_rounds=task.rounds,
            train_config=task.config(),
            evaluate_fn=evaluate,
        )
        result_path.write_text(
            json.dumps({"acc_start": accuracy.get(0, math.nan), "acc_final": accuracy.get(task.rounds, math.nan)})
        )

    return app
