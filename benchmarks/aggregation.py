"""Time every aggregation rule on a stack of n models of d float32 parameters.

    python benchmarks/aggregation.py            # n = 10, 30, 100 at d = 1,000,000
    python benchmarks/aggregation.py --quick    # tiny sizes, a smoke test in seconds

Each cell is the median (first table) and the fastest (second table, the better estimate
on a machine shared with other work) of ``--repeats`` runs, after one warm-up run, of the
rule through the same ``get_aggregator(...)(stack, weights, own=0)`` call the protocols
make. Rules
that take ``f`` use ``f_fraction`` (default 0.2) with ``clamp=True``, so Bulyan runs at
every n (the f it used is printed). The last column is the time at the largest n divided
by the plain mean's. Peak memory stays below about 2 GB at n = 100, d = 1e6 (the stack is
400 MB; sorting it for the trimmed mean allocates values and int64 indices).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from p2pfl.aggregation import AGGREGATORS, foolsgold_weights, get_aggregator

# (label, aggregator name, params); f-based rules get f_fraction and clamp added.
RULES: list[tuple[str, str, dict[str, object]]] = [
    ("mean", "mean", {}),
    ("mean (MH weights)", "mean", {}),
    ("median", "median", {}),
    ("trimmed_mean", "trimmed_mean", {}),
    ("krum", "krum", {}),
    ("multi_krum", "multi_krum", {}),
    ("bulyan", "bulyan", {}),
    ("geometric_median", "geometric_median", {}),
    ("centered_clipping", "centered_clipping", {"tau": 1.0}),
    ("centered_clipping x3", "centered_clipping", {"tau": 1.0, "iters": 3}),
    ("nnm+mean", "nnm+mean", {}),
    ("nnm+krum", "nnm+krum", {}),
]


def _time(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: first-touch allocations, thread pool start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return samples


def _bench_one_n(
    n: int, d: int, repeats: int, f_fraction: float, device: str
) -> dict[str, tuple[list[float], int | None]]:
    """label -> (timed runs in seconds, f used) for a random stack of n models."""
    stack = torch.randn(n, d, generator=torch.Generator().manual_seed(n)).to(device)
    mh = torch.full((n,), 1.0 / n, device=device)  # a Metropolis-Hastings row
    out: dict[str, tuple[list[float], int | None]] = {}
    for label, name, params in RULES:
        if "f" in AGGREGATORS[name]:
            params = {**params, "f_fraction": f_fraction, "clamp": True}
        agg = get_aggregator(name, **params)
        weights = mh if "MH" in label else None
        seconds = _time(lambda a=agg, w=weights: a(stack, w, 0), repeats)
        out[label] = (seconds, agg.effective_f(n))
    out["foolsgold scores"] = (_time(lambda: foolsgold_weights(stack), repeats), None)
    return out


def run(ns: list[int], d: int, repeats: int, f_fraction: float, device: str) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, device {device}; d = {d:,}, "
        f"f = floor({f_fraction} n) clamped per rule"
    )
    per_n = {n: _bench_one_n(n, d, repeats, f_fraction, device) for n in ns}
    labels = list(per_n[ns[0]])
    used_f = {label: {n: per_n[n][label][1] for n in ns} for label in labels}
    for stat_name, stat in (("median", statistics.median), ("fastest", min)):
        times = {label: {n: stat(per_n[n][label][0]) for n in ns} for label in labels}
        print(f"\n{stat_name} of {repeats} runs")
        _print_table(times, used_f, ns)


def _print_table(
    times: dict[str, dict[int, float]], used_f: dict[str, dict[int, int | None]], ns: list[int]
) -> None:
    top = ns[-1]
    base = times["mean"][top]
    header = f"{'rule':<22}" + "".join(f"{'n=' + str(n):>11}" for n in ns)
    header += f"{'f used':>10}{'x mean @n=' + str(top):>15}"
    print(header)
    print("-" * len(header))
    for label, row_times in times.items():
        fs = [used_f[label][n] for n in ns]
        f_text = "/".join(str(f) for f in fs) if fs[0] is not None else "-"
        row = f"{label:<22}" + "".join(f"{row_times[n] * 1e3:>9.1f}ms" for n in ns)
        print(row + f"{f_text:>10}{row_times[top] / base:>15.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (n = 5, 10; d = 1,000)")
    parser.add_argument("--d", type=int, default=1_000_000, help="parameters per model")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 30, 100], help="stack sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell")
    parser.add_argument("--f-fraction", type=float, default=0.2, help="Byzantine fraction")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    args = parser.parse_args()
    if args.quick:
        args.d, args.n, args.repeats = 1_000, [5, 10], 1
    run(sorted(args.n), args.d, args.repeats, args.f_fraction, args.device)


if __name__ == "__main__":
    main()
