"""What a single run's checkpoint costs (``sim.checkpoint``): write time, size, read time.

    OMP_NUM_THREADS=1 python benchmarks/sim_checkpoint.py --sizes 1000 10000

For each N: the benchmark scenario of ``benchmarks/sim_scale.py`` (D-PSGD, MNIST MLP
784-32-10, random 4-regular graph, one local batch a round) runs ``--rounds`` rounds; at
round ``--at`` the whole run is written as ``--resume`` reads it (the checkpoint file in a
temporary folder), timed in wall and CPU seconds, next to the mean wall time of a round
of the same run. Then the checkpoint is read back into a fresh build (``--resume``'s
path: verify, build, restore) and both runs go on to ``--rounds``: the resumed run's
parameters must equal the uninterrupted run's bit for bit. Each N in its own process.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_cli import require_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def fingerprint(simulation: Any, plain: Any) -> tuple[str, list[dict[str, Any]]]:
    """Every peer's parameters, hashed, and the rows without their wall time."""
    digest = hashlib.sha256()
    for protocol in simulation.engine.protocols:
        digest.update(plain(protocol.params).numpy().tobytes())
    return digest.hexdigest(), [{k: v for k, v in r.items() if k != "wall_time"} for r in simulation.rows]


def measure(n: int, rounds: int, at: int, dataset: str) -> dict[str, Any]:
    from sim_scale import scenario

    from sim.checkpoint import RunProgress, read_checkpoint, write_checkpoint
    from sim.mixing import plain
    from sim.runner import build_simulation, run_simulation
    from sim.scenario import scenario_from_dict

    raw = scenario(n, rounds, dataset=dataset, eval_every=rounds, eval_peers=min(n, 100), eval_test=1000)
    raw["sim"]["checkpoint_every"] = 0.0
    config = scenario_from_dict(raw)
    simulation = build_simulation(config)
    result: dict[str, Any] = {"n": n, "rounds": rounds, "at": at}
    folder = Path(tempfile.mkdtemp(prefix="k4-checkpoint-"))
    path = folder / "checkpoint.bin"

    def on_checkpoint(sim: Any, round_: int, state: RunProgress) -> None:
        if round_ == at:
            wall, cpu = time.perf_counter(), time.process_time()
            result["bytes"] = write_checkpoint(path, sim, state, round_=round_)
            result["write_wall_s"] = time.perf_counter() - wall
            result["write_cpu_s"] = time.process_time() - cpu

    started = time.perf_counter()
    run_simulation(simulation, show_progress=False, on_checkpoint=on_checkpoint)
    result["round_wall_s"] = (time.perf_counter() - started - result["write_wall_s"]) / rounds
    reference = fingerprint(simulation, plain)
    del simulation
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    resumed, state = read_checkpoint(path, config, lambda: build_simulation(config))
    result["read_wall_s"] = time.perf_counter() - wall
    result["read_cpu_s"] = time.process_time() - cpu
    run_simulation(resumed, show_progress=False, state=state)
    result["resumed_equal"] = fingerprint(resumed, plain) == reference
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path.unlink(missing_ok=True)
    folder.rmdir()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--at", type=int, default=4, help="the round the checkpoint is written at")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(measure(args.one, args.rounds, args.at, args.dataset)))
        return
    require_dataset(args.dataset)  # here, not as a child's traceback
    for n in args.sizes:
        command = [sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds),
                   "--at", str(args.at), "--dataset", args.dataset]
        out = subprocess.run(command, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"N={r['n']:>6}: checkpoint {r['bytes'] / 1e6:8.1f} MB, write {r['write_wall_s']:.2f} s wall "
            f"({r['write_cpu_s']:.2f} s CPU), read {r['read_wall_s']:.2f} s wall, round {r['round_wall_s']:.2f} s; "
            f"write = {r['write_wall_s'] / r['round_wall_s']:.2f} rounds; resumed equal: {r['resumed_equal']}; "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    from bench_cli import run

    run(main)
