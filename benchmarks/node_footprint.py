"""A real node's footprint: peak resident memory and CPU time per round, over libp2p.

Starts a cluster of node processes on 127.0.0.1 (``tests/cluster.py``: ``p2pfl node``
processes, peer 0 the bootstrap, complete graph by peer exchange: with 5 peers each has
4 neighbours) on the shipped example config (digits, MLP, D-PSGD), and watches every
process from outside:

- CPU time (user + system) is sampled with psutil as each peer's ``status.json`` reports
  its rounds; *CPU per round* is the steady-state figure, from the end of round
  ``--warmup`` to the last round (start-up -- importing torch, loading the data,
  discovery -- is reported apart as *start CPU*);
- peak RSS is the kernel's high-water mark of the process (``ru_maxrss`` from
  ``wait4`` when it exits), i.e. everything the node ever held at once.

Each process runs torch on one thread (``OMP_NUM_THREADS=1``), as a phone-class device
would. The target is a node under 500 MB.

    python benchmarks/node_footprint.py                    # 5 peers, 30 rounds
    python benchmarks/node_footprint.py --peers 5 --rounds 60 --set model.hidden=[64]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster  # noqa: E402

MB = 1_000_000


@dataclass
class Watch:
    """What is known of one peer process so far."""

    process: psutil.Process
    cpu_at: dict[int, float] = field(default_factory=dict)  # rounds done -> CPU seconds
    rss_at_first_round: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    peak_rss: float = 0.0
    cpu_total: float = 0.0
    exit_code: int | None = None


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="p2pfl-footprint-") as tmp:
        root = Path(tmp)
        overrides = [
            f"rounds={args.rounds}",
            "min_round_interval=0",
            f"network.min_peers={args.peers - 1}",
            *args.set,
        ]
        extra = [arg for item in overrides for arg in ("--set", item)] + ["--quiet"]
        cluster = Cluster(root, Path(args.config), args.peers, extra_args=extra)
        watches: dict[int, Watch] = {}
        try:
            cluster.start_all()
            watches = {i: Watch(psutil.Process(p.pid)) for i, p in cluster.processes.items()}
            deadline = time.monotonic() + args.timeout
            while any(w.exit_code is None for w in watches.values()):
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out after {args.timeout}s:\n{cluster.log_tail(0)}")
                for i, watch in watches.items():
                    if watch.exit_code is None:
                        poll(cluster, i, watch)
                time.sleep(0.05)
        finally:
            cluster.close()
    return [summarize(i, w, args) for i, w in sorted(watches.items())]


def poll(cluster: Cluster, i: int, watch: Watch) -> None:
    pid = watch.process.pid
    reaped, status, usage = os.wait4(pid, os.WNOHANG)
    if reaped:  # the kernel's own totals for the whole life of the process
        watch.exit_code = os.waitstatus_to_exitcode(status)
        cluster.processes[i].returncode = watch.exit_code
        watch.finished = time.monotonic()
        watch.peak_rss = usage.ru_maxrss * 1024  # KiB on Linux
        watch.cpu_total = usage.ru_utime + usage.ru_stime
        if watch.exit_code != 0:
            raise SystemExit(f"peer {i} exited with {watch.exit_code}:\n{cluster.log_tail(i)}")
        return
    done = cluster.rounds_done(i)
    if done and done not in watch.cpu_at:
        try:
            watch.cpu_at[done] = cpu_seconds(watch.process)
            if not watch.rss_at_first_round:
                watch.rss_at_first_round = watch.process.memory_info().rss
        except psutil.NoSuchProcess:
            pass


def summarize(i: int, watch: Watch, args: argparse.Namespace) -> dict[str, float]:
    seen = sorted(watch.cpu_at)
    first = min((r for r in seen if r >= args.warmup), default=seen[0])
    last = seen[-1]
    per_round = (watch.cpu_at[last] - watch.cpu_at[first]) / max(1, last - first)
    assert watch.finished is not None
    return {
        "peer": i,
        "rounds": last,
        "wall_s": watch.finished - watch.started,
        "start_cpu_s": watch.cpu_at[seen[0]],
        "cpu_per_round_ms": 1000 * per_round,
        "cpu_total_s": watch.cpu_total,
        "rss_round1_mb": watch.rss_at_first_round / MB,
        "peak_rss_mb": watch.peak_rss / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples/node/node.toml"))
    parser.add_argument("--peers", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2, help="rounds left out of CPU/round")
    parser.add_argument("--set", action="append", default=[], help="config override, key=value")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rows = run(args)
    print(f"$ python {shlex.join(['benchmarks/node_footprint.py', *sys.argv[1:]])}")
    print(
        f"{args.peers} peers ({args.peers - 1} neighbours each) on 127.0.0.1 over libp2p, "
        f"{Path(args.config).name} {' '.join(args.set)}, {args.rounds} rounds; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(
        "| peer | rounds | wall s | start CPU s | CPU / round ms | total CPU s "
        "| RSS after round 1 MB | peak RSS MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['peer']} | {row['rounds']} | {row['wall_s']:.1f} | {row['start_cpu_s']:.2f} "
            f"| {row['cpu_per_round_ms']:.0f} | {row['cpu_total_s']:.2f} "
            f"| {row['rss_round1_mb']:.0f} | {row['peak_rss_mb']:.0f} |"
        )
    worst = max(row["peak_rss_mb"] for row in rows)
    print(
        f"\nlargest peak RSS {worst:.0f} MB (target < 500 MB): {'ok' if worst < 500 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
