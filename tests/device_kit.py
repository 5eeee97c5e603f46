"""The small digits scenario the device tests share (tests/test_sim_device*.py)."""

from __future__ import annotations

from typing import Any


def digits_scenario(
    name: str, *, n: int, rounds: int, lr: float, eval_every: int,
    protocol: str = "dpsgd", local_steps: int | None = None, **sim: Any,
) -> dict[str, Any]:  # fmt: skip
    """``n`` peers on a 4-regular graph, an MLP with 16 hidden units, batches of 16."""
    protocol_table: dict[str, Any] = {"name": protocol}
    if local_steps is not None:
        protocol_table["local_steps"] = local_steps
    return {
        "name": name,
        "seed": 4,
        "rounds": rounds,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": lr},
        "topology": {"kind": "regular", "n": n, "params": {"k": 4}},
        "protocol": protocol_table,
        "sim": {"eval_every": eval_every, "threads": 1, **sim},
    }
