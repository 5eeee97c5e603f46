"""Evaluation's two kernels side by side: the MLP's stacked forward (``_StackedMLP.logits``,
by ``matmul``) against functorch's ``vmap`` over ``functional_call`` (every other model's
path), on the same models and test images, in one run.

Prints CPU milliseconds per ``evaluate`` call (median of ``--repeats``, torch on one
thread) and the largest difference in accuracy and loss between the two, for one model
(a node's evaluation every round) and a stack of many (the simulator's).

    python benchmarks/evaluation.py
    python benchmarks/evaluation.py --datasets mnist --models 1,100,1000 --samples 2000
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch

from p2pfl.learning import LocalTrainer, build_model, evaluate, load_dataset


def cpu_ms(trainer: LocalTrainer, stack: torch.Tensor, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    evaluate(trainer, stack, x, y)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        evaluate(trainer, stack, x, y)
        times.append(1000 * (time.thread_time() - start))
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--models", default="1,100", help="stack sizes, comma-separated")
    parser.add_argument("--samples", type=int, default=2000, help="test images (at most)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| dataset | models | test images | stacked ms | vmap ms | ratio | max |acc diff| | max |loss diff| |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.datasets.split(","):
        data = load_dataset(name)
        torch.manual_seed(0)
        net = build_model("mlp", data.input_shape, data.num_classes)
        stacked = LocalTrainer(net, data.x_train, data.y_train, lr=0.1, batch_size=16)
        vmapped = LocalTrainer(net, data.x_train, data.y_train, lr=0.1, batch_size=16, stacked=False)
        x, y = data.x_test[: args.samples], data.y_test[: args.samples]
        for count in (int(c) for c in args.models.split(",")):
            stack = torch.stack([stacked.init_params(i) for i in range(count)])
            a = cpu_ms(stacked, stack, x, y, args.repeats)
            b = cpu_ms(vmapped, stack, x, y, args.repeats)
            ra, rb = evaluate(stacked, stack, x, y), evaluate(vmapped, stack, x, y)
            acc = (ra.accuracy - rb.accuracy).abs().max().item()
            loss = (ra.loss - rb.loss).abs().max().item()
            print(f"| {name} | {count} | {len(x)} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {acc:.1e} | {loss:.1e} |")


if __name__ == "__main__":
    from bench_cli import run

    run(main)
