"""Time every aggregation rule on a stack of n models of d float32 parameters.

    OMP_NUM_THREADS=1 python benchmarks/aggregation.py            # n = 10, 30, 100; d = 1e6
    OMP_NUM_THREADS=1 python benchmarks/aggregation.py --quick    # tiny sizes, a smoke test

Two tables.

1. Every rule through the ``get_aggregator(...)(stack, weights, own=0)`` call the protocols
   make, at each n: CPU milliseconds (median of ``--repeats`` runs after a warm-up).
2. At the largest n, the rules reworked for issue 17 in *memory passes*: a rule's CPU time
   divided by that of one streaming read of the stack (``stack.sum(0)``), measured just
   before it in the same run (the machine is shared, so only such side-by-side ratios are
   worth comparing). Next to each: the same rule as it was before the rework
   (``aggregation_before.py``), numpy's ``median(axis=0)`` on the same stack, ByzFL's
   implementation when ByzFL is importable (``--byzfl-path``), always a faithful
   re-implementation of ByzFL's centered clipping (per iteration: the ``(n, d)``
   differences, their row norms, the clipped differences, their mean), and the largest
   difference between the outputs of the new and the old code.

CPU time, not wall time: on a machine shared with other work it is the better estimate.
Use one thread (``OMP_NUM_THREADS=1``); numpy's BLAS is held to torch's thread count.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.machinery
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import aggregation_before as before
import numpy as np
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


def _cpu_times(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: first-touch allocations, thread pool start
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.process_time() - start)
    return samples


def _aggregator(name: str, params: dict[str, object], f_fraction: float) -> Any:
    if "f" in AGGREGATORS[name]:
        params = {**params, "f_fraction": f_fraction, "clamp": True}
    return get_aggregator(name, **params)


# ---------------------------------------------------------------- table 1: every rule


def _bench_one_n(
    n: int, d: int, repeats: int, f_fraction: float, device: str
) -> dict[str, tuple[list[float], int | None]]:
    """label -> (timed runs in seconds, f used) for a random stack of n models."""
    stack = torch.randn(n, d, generator=torch.Generator().manual_seed(n)).to(device)
    mh = torch.full((n,), 1.0 / n, device=device)  # a Metropolis-Hastings row
    out: dict[str, tuple[list[float], int | None]] = {}
    for label, name, params in RULES:
        agg = _aggregator(name, params, f_fraction)
        weights = mh if "MH" in label else None
        seconds = _cpu_times(functools.partial(agg, stack, weights, 0), repeats)
        out[label] = (seconds, agg.effective_f(n))
    out["foolsgold scores"] = (_cpu_times(lambda: foolsgold_weights(stack), repeats), None)
    return out


def _print_rules(per_n: dict[int, dict[str, tuple[list[float], int | None]]]) -> None:
    ns = sorted(per_n)
    top = ns[-1]
    labels = list(per_n[ns[0]])
    times = {lb: {n: statistics.median(per_n[n][lb][0]) for n in ns} for lb in labels}
    base = times["mean"][top]
    header = f"{'rule':<22}" + "".join(f"{'n=' + str(n):>11}" for n in ns)
    header += f"{'f used':>10}{'x mean @n=' + str(top):>15}"
    print(header)
    print("-" * len(header))
    for label in labels:
        fs = [per_n[n][label][1] for n in ns]
        f_text = "/".join(str(f) for f in fs) if fs[0] is not None else "-"
        row = f"{label:<22}" + "".join(f"{times[label][n] * 1e3:>9.1f}ms" for n in ns)
        print(row + f"{f_text:>10}{times[label][top] / base:>15.1f}")


# ---------------------------------------------------------------- table 2: memory passes


def _load_byzfl(path: str | None) -> types.ModuleType | None:
    """ByzFL's aggregators module, or None when ByzFL is not importable.

    ByzFL's package ``__init__`` also imports its training framework (torchvision);
    the aggregators need only torch and numpy, so when the full import fails the
    package is entered without running its ``__init__``.
    """
    if path:
        sys.path.insert(0, path)
    try:
        return importlib.import_module("byzfl.aggregators.aggregators")
    except ImportError:
        pass
    spec = importlib.machinery.PathFinder.find_spec("byzfl")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("byzfl")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = package
    try:
        return importlib.import_module("byzfl.aggregators.aggregators")
    except ImportError:
        del sys.modules["byzfl"]
        return None


def byzfl_style_centered_clipping(
    x: torch.Tensor, center: torch.Tensor, tau: float, iters: int
) -> torch.Tensor:
    """ByzFL's centered clipping, step for step: differences, norms, clip, mean, per iteration."""
    v = center
    for _ in range(iters):
        differences = x - v
        factor = (tau / torch.linalg.norm(differences, dim=1)).clamp(max=1.0)
        v = v + (differences * factor[:, None]).mean(dim=0)
    return v


def _byzfl_cc(
    module: types.ModuleType, center: torch.Tensor, tau: float, iters: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        agg = module.CenteredClipping(L=iters, tau=float(tau))
        agg.m = center.clone()  # its constructor refuses any m (ByzFL 0.0.11); set it after
        return agg(x)

    return run


Row = tuple[str, Callable[[], Any], Callable[[], Any] | None, Callable[[], Any] | None]


def _comparisons(
    stack: torch.Tensor, f_fraction: float, byzfl: types.ModuleType | None
) -> list[Row]:
    """(label, now, before, ByzFL) for the reworked rules; None where there is none."""
    n = stack.shape[0]
    centre = stack[0]  # own = 0, as the registry passes it
    f_trim = _aggregator("trimmed_mean", {}, f_fraction).effective_f(n)
    f_krum = _aggregator("krum", {}, f_fraction).effective_f(n)

    def now(name: str, **params: object) -> Callable[[], Any]:
        agg = _aggregator(name, dict(params), f_fraction)
        return lambda: agg(stack, None, 0)

    rows: list[Row] = [
        ("median", now("median"), lambda: before.coordinate_median(stack), None),
        ("trimmed_mean", now("trimmed_mean"), lambda: before.trimmed_mean(stack, f_trim), None),
        ("krum", now("krum"), lambda: before.krum(stack, f_krum), None),
        ("multi_krum", now("multi_krum"), lambda: before.multi_krum(stack, f_krum), None),
        ("geometric_median", now("geometric_median"), lambda: before.geometric_median(stack), None),
    ]
    for iters in (1, 3):
        label = "centered_clipping" + (f" x{iters}" if iters > 1 else "")
        rows.append(
            (
                label,
                now("centered_clipping", tau=1.0, iters=iters),
                functools.partial(before.centered_clipping, stack, centre, 1.0, iters),
                None,
            )
        )
    if byzfl is not None:
        theirs: dict[str, Callable[[], Any]] = {
            "median": lambda: byzfl.Median()(stack),
            "trimmed_mean": lambda: byzfl.TrMean(f=f_trim)(stack),
            "krum": lambda: byzfl.Krum(f=f_krum)(stack),
            "centered_clipping": lambda: _byzfl_cc(byzfl, centre, 1.0, 1)(stack),
            "centered_clipping x3": lambda: _byzfl_cc(byzfl, centre, 1.0, 3)(stack),
        }
        rows = [(lb, a, b, theirs.get(lb)) for lb, a, b, _ in rows]
    for it in (1, 3):
        rows.append(
            (
                f"ByzFL-style CC x{it} (re-impl.)",
                functools.partial(byzfl_style_centered_clipping, stack, centre, 1.0, it),
                None,
                None,
            )
        )
    return rows


def _passes(
    fn: Callable[[], Any], one_pass: Callable[[], Any], repeats: int
) -> tuple[float, float]:
    """(median CPU seconds of fn, the same divided by a pass measured right before it)."""
    pass_time = statistics.median(_cpu_times(one_pass, 3))
    seconds = statistics.median(_cpu_times(fn, repeats))
    return seconds, seconds / pass_time


def run_passes(n: int, d: int, repeats: int, f_fraction: float, byzfl_path: str | None) -> None:
    stack = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    byzfl = _load_byzfl(byzfl_path)

    def one_pass() -> Any:
        return stack.sum(dim=0)

    pass_ms = statistics.median(_cpu_times(one_pass, 5)) * 1e3
    _, np_median = _passes(lambda: np.median(stack.numpy(), axis=0), one_pass, repeats)
    print(
        f"\nn = {n}, d = {d:,}: one memory pass (stack.sum(0)) = {pass_ms:.1f} ms CPU; "
        f"numpy median(axis=0) = {np_median:.1f} passes; "
        f"ByzFL {'imported' if byzfl is not None else 'not importable (its columns are -)'}"
    )
    header = (
        f"{'rule':<30}{'now ms':>9}{'now':>7}{'before':>8}{'ByzFL':>7}"
        f"{'now/np.median':>15}{'max|now-before|':>17}"
    )
    print(header + "      (passes unless marked)")
    print("-" * len(header))
    for label, now, old, theirs in _comparisons(stack, f_fraction, byzfl):
        seconds, now_p = _passes(now, one_pass, repeats)
        old_p = _passes(old, one_pass, repeats)[1] if old is not None else None
        their_p = _passes(theirs, one_pass, max(1, repeats // 2))[1] if theirs else None
        diff = float((now() - old()).abs().max()) if old is not None else None
        print(
            f"{label:<30}{seconds * 1e3:>9.1f}{now_p:>7.1f}"
            f"{'-' if old_p is None else f'{old_p:.1f}':>8}"
            f"{'-' if their_p is None else f'{their_p:.1f}':>7}"
            f"{now_p / np_median:>15.2f}"
            f"{'-' if diff is None else f'{diff:.2e}':>17}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (n = 5, 10; d = 1,000)")
    parser.add_argument("--d", type=int, default=1_000_000, help="parameters per model")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 30, 100], help="stack sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell")
    parser.add_argument("--f-fraction", type=float, default=0.2, help="Byzantine fraction")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (table 1)")
    parser.add_argument("--byzfl-path", default=None, help="a folder holding the byzfl package")
    parser.add_argument("--passes-only", action="store_true", help="print table 2 only")
    args = parser.parse_args()
    if args.quick:
        args.d, args.n, args.repeats = 1_000, [5, 10], 1
    ns = sorted(args.n)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; d = {args.d:,}, "
        f"f = floor({args.f_fraction} n) clamped per rule; CPU time"
    )
    if not args.passes_only:
        per_n = {n: _bench_one_n(n, args.d, args.repeats, args.f_fraction, args.device) for n in ns}
        print(f"\nmedian of {args.repeats} runs, CPU ms")
        _print_rules(per_n)
    run_passes(ns[-1], args.d, args.repeats, args.f_fraction, args.byzfl_path)


if __name__ == "__main__":
    main()
