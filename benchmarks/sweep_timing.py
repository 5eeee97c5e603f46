"""The reference resilience sweep over 3 seeds, timed serially and with ``--jobs 2``.

    python benchmarks/sweep_timing.py                 # examples/resilience/sweep.toml, seeds 1-3: 144 cells each way
    python benchmarks/sweep_timing.py --subset        # its 3 x 3 corner (seeds_subset.toml): 27 cells each way
    python benchmarks/sweep_timing.py --pairs 2       # two pairs, the order alternated
    python benchmarks/sweep_timing.py --subset --first jobs   # --jobs 2 before serial

Each way is one ``p2pfl sweep SWEEP --seeds 1-3 --out DIR [--jobs 2] --quiet``, a fresh
process tree timed whole under the sampler of ``benchmarks/vs_flower.py`` (wall; CPU of
the driver, its forkserver and workers; peak RSS of the tree), with
``OMP_NUM_THREADS=1``. Then the two sweeps' ``results.csv`` and ``seeds.csv`` must be
byte-identical (their md5s are printed): running cells in processes changes nothing of
what a sweep computes. The 1-minute load average before and after each run is printed
too: ``--jobs 2`` gains only from an idle second core (see BENCHMARKS.md, "Parallel
sweeps", on how Linux shares CPU between sessions).

Written to ``--out`` (default ``benchmarks/results/sweep_timing``): ``timing.csv``, one
row per sweep. The sweep folders go to a temporary folder (printed), removed when every
sweep exited 0 with identical results, kept otherwise for a look.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from vs_flower import measure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE = ROOT / "examples" / "resilience" / "sweep.toml"
SUBSET = ROOT / "examples" / "resilience" / "seeds_subset.toml"
COMPARED = ("results.csv", "seeds.csv")


def p2pfl_command() -> list[str]:
    """The ``p2pfl`` of this interpreter's environment (the console script, or the module)."""
    script = Path(sys.executable).parent / "p2pfl"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from p2pfl.cli import main; main()"]


def sweep_command(sweep: Path, seeds: str, out: Path, jobs: int) -> list[str]:
    command = [*p2pfl_command(), "sweep", str(sweep), "--seeds", seeds, "--out", str(out), "--quiet"]
    return command + (["--jobs", str(jobs)] if jobs > 1 else [])


def digests(folder: Path) -> dict[str, str]:
    """md5 of each compared results file of a sweep folder ("missing" when absent)."""
    out = {}
    for name in COMPARED:
        path = folder / name
        out[name] = hashlib.md5(path.read_bytes()).hexdigest() if path.exists() else "missing"
    return out


def time_sweep(sweep: Path, seeds: str, jobs: int, folder: Path, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    load_before = os.getloadavg()[0]
    usage = measure(sweep_command(sweep, seeds, folder, jobs), env=env, log=folder.with_suffix(".log"), timeout=timeout)
    return {
        "jobs": jobs,
        "wall_s": round(usage.wall_s, 1),
        "cpu_s": round(usage.cpu_s, 1),
        "peak_rss_mb": round(usage.peak_rss_mb),
        "processes": usage.processes,
        "returncode": usage.returncode,
        "load_before": round(load_before, 1),
        "load_after": round(os.getloadavg()[0], 1),
        **{f"md5_{name}": digest for name, digest in digests(folder).items()},
        "folder": str(folder),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=None, help=f"sweep file (default {REFERENCE.relative_to(ROOT)})")
    parser.add_argument("--subset", action="store_true", help=f"time {SUBSET.relative_to(ROOT)} instead")
    parser.add_argument("--seeds", default="1-3", help="passed to p2pfl sweep --seeds")
    parser.add_argument("--jobs", type=int, default=2, help="the parallel run's --jobs")
    parser.add_argument("--pairs", type=int, default=1, help="serial/parallel pairs, order alternated")
    parser.add_argument("--first", choices=["serial", "jobs"], default="serial", help="which way pair 0 runs first")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per sweep before it is killed")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sweep_timing")
    args = parser.parse_args(argv)
    if args.sweep is not None and args.subset:
        parser.error("give --sweep or --subset, not both")
    sweep = SUBSET if args.subset else (args.sweep or REFERENCE)
    if not sweep.is_file():
        print(f"error: --sweep: no such sweep file {sweep}", file=sys.stderr)
        return 2
    if args.jobs < 2 or args.pairs < 1:
        parser.error("--jobs must be >= 2 and --pairs >= 1")
    work = Path(tempfile.mkdtemp(prefix="sweep_timing-"))
    print(f"{sweep} --seeds {args.seeds}: serial against --jobs {args.jobs}; folders in {work}; {os.cpu_count()} CPUs")
    rows: list[dict[str, Any]] = []
    for pair in range(args.pairs):
        order = [1, args.jobs] if (pair % 2 == 0) == (args.first == "serial") else [args.jobs, 1]
        for jobs in order:
            folder = work / f"pair{pair}-jobs{jobs}"
            row = {"pair": pair, **time_sweep(sweep, args.seeds, jobs, folder, args.timeout)}
            rows.append(row)
            print(
                f"  pair {pair} jobs {jobs}: wall {row['wall_s']:.0f} s, CPU {row['cpu_s']:.0f} s, peak {row['peak_rss_mb']} MiB, "
                f"exit {row['returncode']}, load {row['load_before']} -> {row['load_after']}, "
                + ", ".join(f"{name} {row[f'md5_{name}'][:8]}" for name in COMPARED)
            )
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "timing.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    status = 0
    for pair in range(args.pairs):
        serial, parallel = (next(r for r in rows if r["pair"] == pair and (r["jobs"] == 1) == s) for s in (True, False))
        same = all(serial[f"md5_{n}"] == parallel[f"md5_{n}"] != "missing" for n in COMPARED)
        ratio = serial["wall_s"] / parallel["wall_s"] if parallel["wall_s"] else float("nan")
        print(
            f"pair {pair}: serial {serial['wall_s']:.0f} s / --jobs {args.jobs} {parallel['wall_s']:.0f} s = {ratio:.2f}x wall; "
            f"CPU {serial['cpu_s']:.0f} s vs {parallel['cpu_s']:.0f} s; results {'identical' if same else 'DIFFERENT'}"
        )
        if not same or serial["returncode"] or parallel["returncode"]:
            status = 1
    print(f"written: {args.out / 'timing.csv'}")
    if status == 0:
        shutil.rmtree(work, ignore_errors=True)  # the figures are in timing.csv; the folders are large
    return status


if __name__ == "__main__":
    sys.exit(main())
