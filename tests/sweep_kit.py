"""The tiny sweep base the sweep tests share: digits, logistic regression, a ring of 6."""

from __future__ import annotations


def tiny_base(
    *, rounds: int = 2, local_steps: int = 2, eval_every: int = 2, step_time: float | None = 0.002
) -> str:
    """A base scenario (TOML) that runs in well under a second; ``step_time=None`` leaves
    the network section out (the default step time)."""
    network = "" if step_time is None else f"[network]\nstep_time = {step_time}\n"
    return f"""
name = "tiny"
seed = 4
rounds = {rounds}
[data]
dataset = "digits"
batch_size = 16
[model]
name = "logreg"
lr = 0.2
[topology]
kind = "ring"
n = 6
[protocol]
name = "dpsgd"
local_steps = {local_steps}
{network}[sim]
eval_every = {eval_every}
threads = 1
"""
