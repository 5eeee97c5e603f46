"""The reference resilience sweep over 3 seeds, timed serially and with ``--jobs 2``.

    python benchmarks/sweep_timing.py                 # examples/resilience/sweep.toml, seeds 1-3: 144 cells each way
    python benchmarks/sweep_timing.py --subset        # its 3 x 3 corner (seeds_subset.toml): 27 cells each way
    python benchmarks/sweep_timing.py --pairs 2       # two pairs, the order alternated
    python benchmarks/sweep_timing.py --subset --first jobs   # --jobs 2 before serial
    python benchmarks/sweep_timing.py --plot benchmarks/results/sweep_timing/timing.csv  # re-draw its PNG only

Each way is one ``p2pfl sweep SWEEP --seeds 1-3 --out DIR [--jobs 2] --quiet``, a fresh
process tree timed whole under the sampler of ``benchmarks/vs_flower.py`` (wall; CPU of
the driver, its forkserver and workers; peak RSS of the tree), with
``OMP_NUM_THREADS=1``. Then the two sweeps' ``results.csv`` and ``seeds.csv`` must be
byte-identical (their md5s are printed): running cells in processes changes nothing of
what a sweep computes. The 1-minute load average before and after each run is printed
too: ``--jobs 2`` gains only from an idle second core (see BENCHMARKS.md, "Parallel
sweeps", on how Linux shares CPU between sessions).

Written to ``--out`` (default ``benchmarks/results/sweep_timing``): ``timing.csv``, one
row per sweep, and ``timing.png`` beside it (wall, CPU and peak RSS of each pair, serial
against ``--jobs``). ``--plot CSV`` re-draws the PNG beside an existing timing CSV and runs
nothing. The sweep folders go to a temporary folder (printed), removed when every
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

from result_csv import read_result_rows, replot
from vs_flower import measure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE = ROOT / "examples" / "resilience" / "sweep.toml"
SUBSET = ROOT / "examples" / "resilience" / "seeds_subset.toml"
COMPARED = ("results.csv", "seeds.csv")
PLOTTED = ("pair", "jobs", "wall_s", "cpu_s", "peak_rss_mb")  # the columns the PNG needs


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


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Wall, CPU and peak RSS of each pair, serial beside ``--jobs``: the three things a
    reader weighs (the speed-up, what it costs in CPU, and in memory), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({int(r["pair"]) for r in rows})
    jobs = sorted({int(r["jobs"]) for r in rows})
    panels = (("wall_s", "wall seconds"), ("cpu_s", "CPU seconds (whole process tree)"), ("peak_rss_mb", "peak RSS (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    width = 0.8 / len(jobs)
    for ax, (column, label) in zip(axes, panels, strict=True):
        for slot, job in enumerate(jobs):
            xs, values = [], []
            for index, pair in enumerate(pairs):
                row = next((r for r in rows if int(r["pair"]) == pair and int(r["jobs"]) == job), None)
                if row is not None:
                    xs.append(index + (slot - (len(jobs) - 1) / 2) * width)
                    values.append(float(row[column]))
            bars = ax.bar(xs, values, width, label="serial" if job == 1 else f"--jobs {job}")
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(pairs)), [_pair_label(rows, pair) for pair in pairs], fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the bar labels and the legend
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper center", ncol=len(jobs))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pair_label(rows: list[dict[str, Any]], pair: int) -> str:
    """``pair N``, which way ran first, the serial/parallel wall ratio and the load average."""
    mine = [r for r in rows if int(r["pair"]) == pair]
    first = "serial" if int(mine[0]["jobs"]) == 1 else f"--jobs {mine[0]['jobs']}"
    label = f"pair {pair}, {first} first"
    serial = next((r for r in mine if int(r["jobs"]) == 1), None)
    parallel = next((r for r in mine if int(r["jobs"]) > 1), None)
    if serial is not None and parallel is not None and float(parallel["wall_s"]) > 0:
        label += f"\nserial / parallel wall x{float(serial['wall_s']) / float(parallel['wall_s']):.2f}"
    loads = [("serial" if int(r["jobs"]) == 1 else f"--jobs {r['jobs']}") + f" {r['load_before']}"
             for r in sorted(mine, key=lambda r: int(r["jobs"])) if r.get("load_before") not in (None, "")]
    if loads:
        label += f"\nload avg before: {', '.join(loads)}"
    return label


def plot_csv(path: Path) -> int:
    """Re-draw the PNG beside a timing CSV (``--plot``): nothing runs; 2 on a bad file."""
    rows = read_result_rows(path, PLOTTED, "a sweep_timing timing.csv")
    return replot(
        path, rows, lambda rows, png: plot(rows, png, _title(rows, f"{path.parent.name}/{path.name}"))
    )


def _title(rows: list[dict[str, Any]], name: str) -> str:
    same = all(
        len({r.get(f"md5_{n}") for r in rows if int(r["pair"]) == pair}) == 1
        for pair in {int(r["pair"]) for r in rows} for n in COMPARED
    )
    verdict = "results identical" if same else "results DIFFER"
    return f"p2pfl sweep, serial vs in parallel ({name}: {verdict})"


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
    parser.add_argument("--plot", type=Path, metavar="CSV", help="only re-draw the PNG beside this timing CSV")
    args = parser.parse_args(argv)
    if args.plot is not None:
        return plot_csv(args.plot)
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
    plot(rows, args.out / "timing.png", _title(rows, f"{args.out.name}/timing.csv"))
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
    print(f"written: {args.out / 'timing.csv'}, {args.out / 'timing.png'}")
    if status == 0:
        shutil.rmtree(work, ignore_errors=True)  # the figures are in timing.csv; the folders are large
    return status


if __name__ == "__main__":
    sys.exit(main())
