"""Batched simulation at scale: D-PSGD, MNIST MLP (784-32-10), random 4-regular graph.

    python benchmarks/sim_scale.py                 # the full run (about half an hour on 2 cores)
    python benchmarks/sim_scale.py --quick         # CI smoke: digits, tiny N, a few seconds
    python benchmarks/sim_scale.py --parts ratio --sizes 1000 --ratio-rounds 10

Three parts, each in a fresh subprocess (so its peak memory is its own):

``ratio``
    For each N in ``--sizes``: the *bare batched compute* -- the same forward/backward
    passes (``LocalTrainer.train_batched``) and the same mixing products (the sparse
    Metropolis-Hastings matrix times the ``(N, d)`` parameter stack, by chunks of peers,
    each chunk trained straight from its mixed rows) with no simulator around them --
    against the simulator doing the same rounds (build excluded, no evaluation). Both
    run ``--warm-up`` rounds untimed first (the first touch of a gigabyte of fresh memory
    is a one-off cost the long run pays once), then the timed rounds, alternating between
    the two in ``--segments`` segments so that load changes hit both. Both start from the
    same parameters and seeds, so their final models must agree: the largest difference
    is reported. Target: simulator / bare <= 1.5.
``scale``
    One long run (``--scale-n`` peers, ``--scale-rounds`` rounds) through
    ``run_simulation``, evaluating a fixed random sample of ``--eval-peers`` peers on a
    fixed random subset of ``--eval-test`` test images every ``--eval-every`` rounds.
    Reports wall time and peak resident memory (``ru_maxrss``). Targets: 10,000 peers x
    100 rounds in under 10 minutes and 8 GiB.
``reference``
    Batched vs per-peer reference backend (one model at a time, eager means) at
    ``--reference-n`` peers, same rounds; reports the speed-up and the largest parameter
    difference between the two.

``memory``
    For each N in ``--memory-sizes``: parameter rows per peer, (peak RSS - RSS before
    the build) / (N x d x 4 bytes), over ``--memory-rounds`` rounds. Target: <= 2.5.
``big``
    The same measurement at ``--big-n`` peers (default 60,000) for ``--big-rounds``
    rounds: wall per round and peak RSS of one very large run.
``device``
    For each N in ``--device-sizes`` (default 10,000 and 100,000): the bare batched
    compute (train + mix, ``sim.device.DeviceRounds``) on the CPU and on CUDA, wall per
    round and peak device memory; then the whole simulator (``engine.run``, no
    evaluation) on the default numpy/scipy path, on the device path run on the CPU
    (``build_simulation(..., device_path=True)``: the CUDA code on the CPU) and, where
    there is CUDA, with ``sim.device = "cuda"``: wall per round, peak device memory (the
    device arena's peak rows on the CPU), and the largest difference of a sample of final
    models from the default path's. On a machine without CUDA only the CPU rows appear.

Wall time is what the targets are about; CPU time (``time.process_time``) is printed too,
because on a shared machine it is far less noisy. Results go to a CSV and a PNG
(``--out``, default ``benchmarks/results/sim_scale.csv``). ``--plot CSV`` re-draws the PNG
beside an existing results CSV and runs nothing:

    python benchmarks/sim_scale.py --plot benchmarks/results/sim_scale_big60k_default.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_cli import require_dataset

# One thread per process unless told otherwise: set before numpy/torch load their pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sim_scale.csv"
COLUMNS = [
    "part", "n", "rounds", "variant", "wall_s", "cpu_s", "wall_per_round_s",
    "ratio_wall", "ratio_cpu", "peak_rss_mib", "acc_final", "max_param_diff", "note", "rows_per_peer",
]


# ------------------------------------------------------------------------------ scenarios


def scenario(
    n: int,
    rounds: int,
    *,
    dataset: str,
    backend: str = "batched",
    seed: int = 1,
    eval_every: int | None = None,
    eval_peers: int = 0,
    eval_test: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """The benchmark's scenario: D-PSGD, one local batch of 32 per round, MLP 32 hidden."""
    return {
        "name": f"sim-scale-n{n}",
        "seed": seed,
        "rounds": rounds,
        "data": {"dataset": dataset, "partition": "iid", "batch_size": 32},
        "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
        "topology": {"kind": "regular", "n": n, "params": {"k": 4}},
        "protocol": {"name": "dpsgd", "local_steps": 1},
        "sim": {
            "backend": backend,
            "eval_every": eval_every or rounds,
            "eval_peers": eval_peers,
            "eval_test_samples": eval_test,
            "threads": threads,
        },
    }


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _warm_up(simulation: Any) -> None:
    """Import and initialise torch.func's machinery once, outside every timed region."""
    import torch

    from p2pfl.learning import BatchSampler

    trainer = simulation.trainer
    sampler = BatchSampler(__import__("numpy").arange(64), trainer.batch_size, seed=0)
    trainer.train_batched(trainer.init_params(0).unsqueeze(0), [sampler], 1)
    torch.zeros(1)


def _run_engine(simulation: Any) -> None:
    """Run the rounds, then compute the last round's means (deferred until needed)."""
    simulation.engine.run()
    mixer = simulation.engine.executor.mixer
    if mixer is not None:
        mixer.flush()


def _final_params(simulation: Any, peers: list[int]) -> Any:
    import torch

    from sim.mixing import plain

    return torch.stack([plain(simulation.engine.protocols[i].params) for i in peers])


# ------------------------------------------------------------------------------ parts


class BareCompute:
    """The simulated work without the simulator: train, then mix, round after round.

    Chunk by chunk of peers, the chunk's mixed rows (``W[chunk] @ T``, a sparse product
    of the Metropolis-Hastings rows and the trained stack) are trained straight into the
    next parameter stack, which is double-buffered and so allocated once. This is the
    fastest arrangement found for the bare loop (one full ``W @ T`` per round allocates a
    fresh ``(N, d)`` array, which costs page faults at 10,000 peers).
    """

    def __init__(self, simulation: Any) -> None:
        import numpy as np

        from topologies import metropolis_hastings

        self.trainer = simulation.trainer
        self.samplers = simulation.engine.executor.samplers
        n, dim = len(self.samplers), self.trainer.dim
        chunk = self.trainer.peers_per_call(self.trainer.batch_size)
        weights = metropolis_hastings(simulation.graph).tocsr().astype(np.float32)
        self.blocks = [(a, min(a + chunk, n), weights[a : a + chunk]) for a in range(0, n, chunk)]
        self.init = self.trainer.init_params(simulation.scenario.seed).expand(n, dim)
        self.steps = simulation.scenario.protocol.local_steps
        self.stacks = [np.empty((n, dim), dtype=np.float32) for _ in range(2)]
        self.trained: Any = None
        self.done = 0

    def run(self, rounds: int) -> None:
        import torch

        for _ in range(rounds):
            out = torch.from_numpy(self.stacks[self.done % 2])
            for a, b, rows in self.blocks:
                source = self.init[a:b] if self.trained is None else torch.from_numpy(rows @ self.trained)
                self.trainer.train_batched(source, self.samplers[a:b], self.steps, chunk=b - a, out=out[a:b])
            self.trained = self.stacks[self.done % 2]
            self.done += 1

    def finish(self) -> list[tuple[int, Any]]:
        """The last round's mix, as ``(first peer, rows)`` per chunk."""
        import torch

        return [(a, torch.from_numpy(rows @ self.trained)) for a, _, rows in self.blocks]


def _pick(chunks: list[tuple[int, Any]], peers: list[int]) -> Any:
    import torch

    def row(peer: int) -> Any:
        first, values = max((c for c in chunks if c[0] <= peer), key=lambda c: c[0])
        return values[peer - first]

    return torch.stack([row(p) for p in peers])


def part_ratio(
    n: int, rounds: int, warm_up: int, dataset: str, threads: int, segments: int = 2
) -> list[dict[str, Any]]:
    """Bare compute and simulator, both warmed up, then timed in alternating segments.

    Alternating (bare, simulator, bare, simulator, ...) rather than one after the other
    keeps a change in the machine's load from landing on one side only.
    """
    import torch

    from sim.runner import build_simulation
    from sim.scenario import scenario_from_dict

    segments = max(1, min(segments, rounds))
    lengths = [rounds // segments + (i < rounds % segments) for i in range(segments)]
    raw = scenario(n, warm_up + rounds, dataset=dataset, threads=threads)
    bare = BareCompute(build_simulation(scenario_from_dict(raw)))
    build_start = _clock()
    simulation = build_simulation(scenario_from_dict(raw))
    build_wall, _ = _since(build_start)
    engine = simulation.engine
    _warm_up(simulation)

    warm_start = _clock()
    bare.run(warm_up)
    engine.rounds = warm_up
    engine.run()
    warm_wall, _ = _since(warm_start)
    times = {"bare": [0.0, 0.0], "sim": [0.0, 0.0]}
    for index, length in enumerate(lengths):
        start = _clock()
        bare.run(length)
        final = bare.finish() if index == len(lengths) - 1 else None
        for i, value in enumerate(_since(start)):
            times["bare"][i] += value
        start = _clock()
        engine.rounds += length
        if index == len(lengths) - 1:
            _run_engine(simulation)
        else:
            engine.run()
        for i, value in enumerate(_since(start)):
            times["sim"][i] += value
    assert final is not None
    sample = sorted({0, n // 3, n // 2, n - 1})
    diff = float((_pick(final, sample) - _final_params(simulation, sample)).abs().max())
    (bare_wall, bare_cpu), (sim_wall, sim_cpu) = times["bare"], times["sim"]
    mixer = engine.executor.mixer
    if mixer is None:  # the batched backend always defers mixing; its products are reported
        raise RuntimeError("part_ratio: the simulator's executor has no mixer (not deferred)")
    note = (
        f"timed rounds {warm_up + 1}..{warm_up + rounds} in {segments} alternating segments "
        f"(warm-up of both {warm_wall:.1f}s); {engine.events_processed} events, "
        f"{engine.executor.batches_run} training calls, {mixer.products} mixing "
        f"products; build {build_wall:.1f}s; torch threads {torch.get_num_threads()}"
    )
    return [
        _row("ratio", n, rounds, "bare batched compute", bare_wall, bare_cpu),
        _row(
            "ratio", n, rounds, "simulator", sim_wall, sim_cpu,
            ratio_wall=sim_wall / bare_wall, ratio_cpu=sim_cpu / bare_cpu,
            max_param_diff=diff, note=note,
        ),
    ]


def part_scale(
    n: int, rounds: int, dataset: str, threads: int, eval_every: int, eval_peers: int, eval_test: int
) -> list[dict[str, Any]]:
    from sim.runner import build_simulation, run_simulation
    from sim.scenario import scenario_from_dict

    raw = scenario(
        n, rounds, dataset=dataset, threads=threads,
        eval_every=eval_every, eval_peers=eval_peers, eval_test=eval_test,
    )
    start = _clock()
    simulation = build_simulation(scenario_from_dict(raw))
    build_wall, build_cpu = _since(start)
    run_start = _clock()
    rows = run_simulation(simulation, show_progress=False)
    run_wall, run_cpu = _since(run_start)
    accuracy = " ".join(f"r{r['round']}={r['acc_mean']:.3f}" for r in rows)
    evaluated = rows[-1]["peers_evaluated"], rows[-1]["test_samples"]
    eval_time = simulation.evaluator.seconds
    note = (
        f"build {build_wall:.1f}s + run {run_wall:.1f}s; accuracy of {evaluated[0]} sampled peers "
        f"on {evaluated[1]} test images: {accuracy}"
    )
    if eval_time:
        note += f"; evaluation {eval_time:.1f}s"
    return [
        _row(
            "scale", n, rounds, "simulator + evaluation", build_wall + run_wall, build_cpu + run_cpu,
            per_round=run_wall / rounds, peak_rss_mib=_peak_rss_mib(),
            acc_final=rows[-1]["acc_mean"], note=note,
        )
    ]


def part_reference(n: int, rounds: int, dataset: str, threads: int) -> list[dict[str, Any]]:
    from sim.runner import build_simulation
    from sim.scenario import scenario_from_dict

    results: dict[str, Any] = {}
    for backend in ("per_peer", "batched"):
        simulation = build_simulation(
            scenario_from_dict(scenario(n, rounds, dataset=dataset, backend=backend, threads=threads))
        )
        _warm_up(simulation)
        start = _clock()
        _run_engine(simulation)
        results[backend] = (_since(start), simulation)
    (ref_wall, ref_cpu), ref_sim = results["per_peer"]
    (bat_wall, bat_cpu), bat_sim = results["batched"]
    peers = list(range(n))
    diff = float((_final_params(ref_sim, peers) - _final_params(bat_sim, peers)).abs().max())
    return [
        _row("reference", n, rounds, "per-peer reference", ref_wall, ref_cpu),
        _row(
            "reference", n, rounds, "batched", bat_wall, bat_cpu,
            ratio_wall=ref_wall / bat_wall, ratio_cpu=ref_cpu / bat_cpu, max_param_diff=diff,
            note="ratio = per-peer time / batched time",
        ),
    ]


def _rss_bytes() -> int:
    """Resident memory now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _count_live_rows(simulation: Any) -> dict[str, int]:
    """Count, at every arena block handed out, the distinct arena rows that a row object
    still alive references (a received model, a mean's input, a peer's own result).

    The arena reuses memory a block (training chunk) at a time, so it can only hold more
    than this; the peak of this count is what an allocator that reused every row the
    moment nothing read it would still need (the rows being written not included).
    Slow (a pass over every live row per block): a measurement, not a default.
    """
    import weakref

    executor = simulation.engine.executor
    mixer, arena = executor.mixer, executor.arena
    live: weakref.WeakSet[Any] = weakref.WeakSet()
    peak = {"live_rows": 0, "block_rows": 0, "live_at_block_peak": 0}
    make_rows, take = mixer.rows, arena.take

    def rows(*args: Any, **kwargs: Any) -> Any:
        made = make_rows(*args, **kwargs)
        live.update(made)
        return made

    def counted_take(*args: Any, **kwargs: Any) -> Any:
        block = take(*args, **kwargs)
        alive = len({row._key for row in list(live)})
        peak["live_rows"] = max(peak["live_rows"], alive)
        if arena.rows_in_use > peak["block_rows"]:
            peak["block_rows"], peak["live_at_block_peak"] = arena.rows_in_use, alive
        return block

    mixer.rows, arena.take = rows, counted_take
    return peak


def part_memory(
    n: int, rounds: int, dataset: str, threads: int, label: str = "memory", bandwidth: float | None = None,
    live_rows: bool = False,
) -> list[dict[str, Any]]:
    """Parameter rows per peer: (peak RSS - RSS before the build) / (N x d x 4 bytes).

    The dataset is loaded before the baseline is taken, so what is left is what the
    simulation holds for its peers: their parameter rows, and a little per-peer bookkeeping.
    Run in a fresh process (the default) so that the peak is this run's alone. With
    ``live_rows``, also the peak of the rows something still reads (``_count_live_rows``).
    """
    import gc

    from p2pfl.learning import load_dataset
    from sim.runner import build_simulation
    from sim.scenario import scenario_from_dict

    raw = scenario(n, rounds, dataset=dataset, threads=threads)
    if bandwidth is not None:  # e.g. 1e12: no uplink queueing, the rounds do not overlap
        raw["network"] = {"bandwidth": bandwidth}
    data = load_dataset(dataset, seed=raw["seed"])
    gc.collect()
    base = _rss_bytes()
    start = _clock()
    simulation = build_simulation(scenario_from_dict(raw), dataset=data)
    build_wall, build_cpu = _since(start)
    counted = _count_live_rows(simulation) if live_rows else None
    run_start = _clock()
    simulation.engine.run()  # the last round's means stay deferred, as in a run that evaluates a sample
    run_wall, run_cpu = _since(run_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    row_bytes = n * simulation.trainer.dim * 4
    rows = (peak - base) / row_bytes if base else float("nan")
    executor = simulation.engine.executor
    arena = executor.arena
    touched = sum(getattr(arena, "high_water", {}).values()) if hasattr(arena, "high_water") else float("nan")
    note = (
        f"peak RSS {peak / 2**30:.2f} GiB over a baseline of {base / 2**30:.2f} GiB (dataset loaded); "
        f"{rows:.2f} parameter rows per peer (d = {simulation.trainer.dim}); arena rows touched per peer "
        f"{touched / n:.2f}; build {build_wall:.1f}s; {executor.batches_run} training calls"
    )
    if bandwidth is not None:
        note += f"; uplinks {bandwidth:g} B/s"
    if counted is not None:
        note += (
            f"; rows still read, peak {counted['live_rows'] / n:.2f} per peer (when the arena's blocks "
            f"in use peaked at {counted['block_rows'] / n:.2f}: {counted['live_at_block_peak'] / n:.2f})"
        )
    return [
        _row(
            label, n, rounds, "simulator", build_wall + run_wall, build_cpu + run_cpu,
            per_round=run_wall / rounds, peak_rss_mib=peak / 2**20, rows_per_peer=rows, note=note,
        )
    ]


#: what the device part can run (``--device-variants``): the bare rounds on each device,
#: then the whole simulator on the default path, on the device path run on the CPU, on CUDA
DEVICE_VARIANTS = ("bare-cpu", "bare-cuda", "sim-cpu", "sim-device-path", "sim-cuda")


def part_device(
    n: int, rounds: int, dataset: str, threads: int, variants: tuple[str, ...] = DEVICE_VARIANTS
) -> list[dict[str, Any]]:
    """The batched rounds (train + mix, ``sim.device.DeviceRounds``) on the CPU and, where
    there is one, on CUDA: wall per round and peak device memory; the final models of
    both are compared on a sample of peers. ``variants`` picks which of
    ``DEVICE_VARIANTS`` run (CUDA ones only where there is CUDA): at 100,000 peers the
    CPU ones take minutes a round."""
    import torch

    from sim.device import DeviceRounds, peak_device_bytes
    from sim.runner import build_simulation
    from sim.scenario import scenario_from_dict
    from topologies import metropolis_hastings

    simulation = build_simulation(scenario_from_dict(scenario(n, rounds, dataset=dataset, threads=threads)))
    devices = [d for d in ("cpu", "cuda") if f"bare-{d}" in variants and (d == "cpu" or torch.cuda.is_available())]
    weights = metropolis_hastings(simulation.graph)
    start = simulation.trainer.init_params(simulation.scenario.seed)
    sample = sorted({0, n // 3, n // 2, n - 1})
    rows, finals = [], {}
    for device in devices:
        # each device starts from fresh samplers: the same batches in the same order
        fresh = build_simulation(scenario_from_dict(scenario(n, rounds, dataset=dataset, threads=threads)))
        rounds_on = DeviceRounds(simulation.trainer, fresh.engine.executor.samplers, weights, start, device=device)  # type: ignore[arg-type]
        del fresh
        rounds_on.run(1)  # warm-up: first touch, kernels, caches
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        begin = _clock()
        rounds_on.run(rounds)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = _since(begin)
        finals[device] = rounds_on.params(sample)
        peak = peak_device_bytes(rounds_on.device)
        note = f"{rounds} timed rounds after 1 warm-up; peak device memory {peak / 2**30:.2f} GiB"
        rows.append(_row("device", n, rounds, f"DeviceRounds on {device}", wall, cpu, note=note))
        del rounds_on
    if "cuda" in finals:
        rows[-1]["max_param_diff"] = f"{float((finals['cuda'] - finals['cpu']).abs().max()):.1e}"
    return rows + _device_simulator_rows(n, rounds, dataset, threads, sample, variants)


def _device_simulator_rows(
    n: int, rounds: int, dataset: str, threads: int, sample: list[int], wanted: tuple[str, ...] = DEVICE_VARIANTS
) -> list[dict[str, Any]]:
    """The whole simulator, one warm-up round then ``rounds`` timed, on each path asked
    for; model differences are against the first path run (the default one, if asked)."""
    import torch

    from sim.device import DeviceArena
    from sim.runner import build_simulation
    from sim.scenario import scenario_from_dict

    variants = [("simulator, default numpy/scipy path", "cpu", False, "sim-cpu"),
                ("simulator, device path on cpu", "cpu", True, "sim-device-path")]
    if torch.cuda.is_available():
        variants.append(("simulator on cuda", "cuda", False, "sim-cuda"))
    variants = [v for v in variants if v[3] in wanted]
    rows, reference = [], None
    for label, device, forced, _name in variants:
        raw = scenario(n, 1 + rounds, dataset=dataset, threads=threads)
        raw["sim"]["device"] = device
        simulation = build_simulation(scenario_from_dict(raw), device_path=forced)
        engine = simulation.engine
        _warm_up(simulation)
        engine.rounds = 1
        engine.run()  # warm-up round: first touch, kernels, caches
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        begin = _clock()
        engine.rounds = 1 + rounds
        _run_engine(simulation)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = _since(begin)
        finals = _final_params(simulation, sample).cpu()
        arena = engine.executor.arena
        note = f"{rounds} timed rounds after 1 warm-up, no evaluation"
        if device == "cuda":
            note += f"; peak device memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        if isinstance(arena, DeviceArena):
            peak = arena.peak_rows * simulation.trainer.dim * 4
            note += f"; device arena peak {arena.peak_rows / n:.2f} rows per peer ({peak / 2**30:.2f} GiB)"
        extra: dict[str, Any] = {}
        if reference is None:
            reference = finals
        else:
            extra["max_param_diff"] = float((finals - reference).abs().max())
            note += "; max_param_diff against the default path"
        rows.append(_row("device", n, rounds, label, wall, cpu, note=note, **extra))
        del simulation, engine, arena
    return rows


def _row(
    part: str, n: int, rounds: int, variant: str, wall: float, cpu: float, *,
    per_round: float | None = None, **extra: Any,
) -> dict[str, Any]:
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    row.update(
        part=part, n=n, rounds=rounds, variant=variant, wall_s=round(wall, 3), cpu_s=round(cpu, 3),
        wall_per_round_s=round(per_round if per_round is not None else wall / rounds, 4),
    )
    for key, value in extra.items():
        if key == "max_param_diff":
            row[key] = f"{value:.1e}"
        else:
            row[key] = round(value, 3) if isinstance(value, float) else value
    if not row["peak_rss_mib"]:
        row["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    return row


# ------------------------------------------------------------------------------ driver


def _run_in_process(task: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(task["threads"])
    try:
        kind = task.pop("part")
        parts: dict[str, Callable[..., list[dict[str, Any]]]] = {
            "ratio": part_ratio, "scale": part_scale, "reference": part_reference,
            "memory": part_memory, "big": part_memory, "device": part_device,
        }
        run = parts[kind]
        return run(**task)
    finally:
        torch.set_num_threads(threads)


def _worker(task: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(_run_in_process(task)), flush=True)


def _spawn(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one part in a fresh interpreter; its stdout's RESULT line is the answer."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"part {task} failed (exit {done.returncode}):\n{done.stdout[-2000:]}")


def _table(rows: list[dict[str, Any]]) -> str:
    shown = ["part", "n", "rounds", "variant", "wall_s", "cpu_s", "wall_per_round_s",
             "ratio_wall", "ratio_cpu", "peak_rss_mib", "max_param_diff"]
    cells = [[str(r[c]) for c in shown] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    notes = [f"- {r['part']} n={r['n']} {r['variant']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def _plot_rows(rows: list[dict[str, Any]], path: Path, plt: Any) -> None:
    """The parts other than ``ratio``: wall per round of every row, one bar each, with the
    row's memory beside it (parameter rows per peer where measured, else peak RSS)."""
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    labels = [f"{r['part']} N={int(r['n']):,}: {r['variant']}" for r in rows]
    walls = [float(r["wall_per_round_s"] or "nan") for r in rows]
    ax.barh(range(len(rows)), walls)
    for index, (row, wall) in enumerate(zip(rows, walls, strict=True)):
        memory = (f"{float(row['rows_per_peer']):.2f} rows/peer" if row.get("rows_per_peer") not in (None, "")
                  else f"{float(row['peak_rss_mib']) / 1024:.2f} GiB RSS" if row.get("peak_rss_mib") not in (None, "")
                  else "")
        ax.annotate(f" {wall:.3g} s  {memory}", (wall if wall == wall else 0.0, index), va="center")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlim(right=ax.get_xlim()[1] * 1.9)  # room for the annotations
    ax.set_xlabel("wall seconds per round")
    ax.set_title("D-PSGD, MNIST MLP, 4-regular")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = [r for r in rows if r["part"] == "ratio"]
    sizes = sorted({int(r["n"]) for r in ratio})
    ratio = [{**r, "n": int(r["n"])} for r in ratio]
    if not sizes:
        _plot_rows(rows, path, plt)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    for offset, variant in ((-width / 2, "bare batched compute"), (width / 2, "simulator")):
        # per peer and round, so that N = 1,000 and N = 10,000 share one scale
        values = [
            1e6 * float(r["wall_per_round_s"]) / n
            for n in sizes
            for r in ratio
            if r["n"] == n and r["variant"] == variant
        ]
        ax.bar([i + offset for i in range(len(sizes))], values, width, label=variant)
        if variant == "simulator":
            for i, n in enumerate(sizes):
                sim_row = next(r for r in ratio if r["n"] == n and r["variant"] == variant)
                ax.annotate(f"x{float(sim_row['ratio_wall']):.2f}", (i + offset, values[i]),
                            ha="center", va="bottom")
    ax.set_xticks(range(len(sizes)), [f"N={n:,}" for n in sizes])
    ax.set_ylabel("wall microseconds per peer and round")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the ratios above the legend
    ax.set_title("D-PSGD, MNIST MLP, 4-regular: simulator vs bare compute")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: the columns ``_plot`` reads from every row
PLOTTED = ("part", "n", "variant", "wall_per_round_s")


def _plot_csv(path: Path) -> int:
    """``--plot``: the PNG beside a results CSV of this script, from the CSV alone; the
    exit status (2, with one line, when the file is missing or is not such a CSV)."""
    from result_csv import read_result_rows, replot

    return replot(path, read_result_rows(path, PLOTTED, "a sim_scale results CSV"), _plot)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: digits, small N, few rounds")
    parser.add_argument("--parts", default="ratio,scale,reference", help="comma-separated subset")
    parser.add_argument("--sizes", default="1000,10000", help="N for the ratio part")
    parser.add_argument("--ratio-rounds", type=int, default=None, help="timed rounds per size (default 20; 8 at N >= 5,000)")
    parser.add_argument("--warm-up", type=int, default=5, help="untimed rounds before the ratio's timed ones")
    parser.add_argument("--segments", type=int, default=2, help="alternating timed segments per side")
    parser.add_argument("--scale-n", type=int, default=10_000)
    parser.add_argument("--scale-rounds", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-peers", type=int, default=100, help="peers sampled for evaluation")
    parser.add_argument("--eval-test", type=int, default=1000, help="test images sampled for evaluation")
    parser.add_argument("--reference-n", type=int, default=100)
    parser.add_argument("--reference-rounds", type=int, default=20)
    parser.add_argument("--memory-sizes", default="1000,10000", help="N for the memory part (rows per peer)")
    parser.add_argument("--memory-rounds", type=int, default=6)
    parser.add_argument("--memory-bandwidth", type=float, default=None,
                        help="uplink bytes/s of the memory part (default: the scenario's; 1e12: rounds do not overlap)")
    parser.add_argument("--memory-live-rows", action="store_true",
                        help="also count the rows something still reads (slow): a row-granular allocator's floor")
    parser.add_argument("--big-n", type=int, default=60_000, help="peers of the big part (peak RSS, wall per round)")
    parser.add_argument("--big-rounds", type=int, default=3)
    parser.add_argument("--big-bandwidth", type=float, default=None,
                        help="uplink bytes/s of the big part (default: the scenario's; 1e12: rounds do not overlap)")
    parser.add_argument("--device-sizes", default="10000,100000", help="N for the device part (CPU vs CUDA)")
    parser.add_argument("--device-rounds", type=int, default=5)
    parser.add_argument("--device-variants", default=",".join(DEVICE_VARIANTS),
                        help=f"what the device part runs, a subset of {','.join(DEVICE_VARIANTS)}")
    parser.add_argument("--dataset", default=None, help="default mnist (digits with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV path (PNG beside it)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the parts in this process (peak memory is then shared); --quick implies it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--plot", type=Path, metavar="CSV", help="only re-draw the PNG beside this results CSV")
    args = parser.parse_args(argv)
    if args.plot is not None:
        status = _plot_csv(args.plot)
        if status:
            raise SystemExit(status)
        return
    if args.worker:
        _worker(json.loads(args.worker))
        return
    if args.quick:
        args.in_process = True
        args.sizes, args.scale_n, args.scale_rounds = "60,120", 200, 6
        args.eval_every, args.eval_peers, args.eval_test = 3, 20, 200
        args.reference_n, args.reference_rounds = 16, 4
        args.ratio_rounds = args.ratio_rounds or 4
        args.memory_sizes, args.memory_rounds, args.big_n, args.big_rounds = "60", 3, 120, 2
        args.device_sizes, args.device_rounds = "60", 2
        args.warm_up = min(args.warm_up, 1)
        if args.out == DEFAULT_OUT:
            args.out = DEFAULT_OUT.with_name("sim_scale_quick.csv")
    dataset = args.dataset or ("digits" if args.quick else "mnist")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"ratio", "scale", "reference", "memory", "big", "device"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    variants = [v.strip() for v in args.device_variants.split(",") if v.strip()]
    if set(variants) - set(DEVICE_VARIANTS):
        parser.error(f"unknown device variants: {', '.join(sorted(set(variants) - set(DEVICE_VARIANTS)))}")
    require_dataset(dataset)  # here, not as a child's traceback
    common = {"dataset": dataset, "threads": args.threads}
    tasks: list[dict[str, Any]] = []
    if "ratio" in parts:
        for n in (int(s) for s in args.sizes.split(",")):
            rounds = args.ratio_rounds or (8 if n >= 5000 else 20)
            tasks.append({"part": "ratio", "n": n, "rounds": rounds, "warm_up": args.warm_up,
                          "segments": args.segments, **common})
    if "scale" in parts:
        tasks.append({"part": "scale", "n": args.scale_n, "rounds": args.scale_rounds,
                      "eval_every": args.eval_every, "eval_peers": args.eval_peers,
                      "eval_test": args.eval_test, **common})
    if "reference" in parts:
        tasks.append({"part": "reference", "n": args.reference_n, "rounds": args.reference_rounds, **common})
    if "memory" in parts:
        for n in (int(s) for s in args.memory_sizes.split(",")):
            tasks.append({"part": "memory", "n": n, "rounds": args.memory_rounds,
                          "bandwidth": args.memory_bandwidth, "live_rows": args.memory_live_rows, **common})
    if "big" in parts:
        tasks.append({"part": "big", "n": args.big_n, "rounds": args.big_rounds, "label": "big",
                      "bandwidth": args.big_bandwidth, **common})
    if "device" in parts:
        for n in (int(s) for s in args.device_sizes.split(",")):
            tasks.append({"part": "device", "n": n, "rounds": args.device_rounds,
                          "variants": tuple(variants), **common})

    print(f"# sim_scale on {platform.node()} ({os.cpu_count()} cores), python {platform.python_version()}, "
          f"dataset {dataset}, {args.threads} torch thread(s) per process", flush=True)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        label = f"{task['part']} n={task['n']} rounds={task['rounds']}"
        print(f"# running {label} ...", flush=True)
        started = time.perf_counter()
        rows += _run_in_process(dict(task)) if args.in_process else _spawn(dict(task))
        print(f"#   done in {time.perf_counter() - started:.0f}s", flush=True)
    print()
    print(_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        _plot(rows, args.out.with_suffix(".png"))
        print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    else:
        print(f"\nwrote {args.out} (no rows: nothing to plot)")


if __name__ == "__main__":
    from bench_cli import run

    run(main)
