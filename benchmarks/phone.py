"""Phone-class nodes: a digits run of ``p2pfl node`` processes inside 1 CPU and 512 MB.

Each confined node runs in a cgroup of its own (a phone each) with a memory limit (no
swap) and a CPU quota: cgroup v2 where the unified hierarchy has the memory and cpu
controllers, v1 (``memory`` and ``cpu`` hierarchies) otherwise. The cgroups are made as
children of this process's own, so whatever limits this process already lives under
still hold, and are removed at the end, also on failure. Needs root.

The cluster is ``--peers`` processes on 127.0.0.1 (``tests/cluster.py``: peer 0 is the
bootstrap, the others find each other by peer exchange) on ``examples/node/phone.toml``
(docs/phone.md). ``--confine all`` puts every node in a cgroup, ``--confine one`` only
peer 1 (a phone among laptops). Reported per node:

- the cgroup's peak memory (``memory.max_usage_in_bytes`` in v1, ``memory.peak`` in v2,
  or the largest ``memory.current`` sampled) -- what the limit is checked against: the
  process's memory plus the page cache it brought in (libraries, data, checkpoints);
- the process's peak RSS (``ru_maxrss`` from ``wait4``);
- OOM kills in the cgroup, and how long the quota throttled it;
- both peaks against the 300 MB goal of issue 18, at the end of the output;
- CPU per round (user + system, from the end of round ``--warmup`` to the last round
  the node reported), start-up CPU apart.

Writes ``phone.csv`` (one row per node), ``phone_timeline.csv`` (memory, CPU and rounds
sampled every ``--sample`` seconds) and ``phone.png`` (memory over time, with the limit
and the 300 MB goal) into ``--out``.

The digits split is computed (and cached in the data directory) by this process before
the nodes start: the first computation imports scikit-learn, which no node then does.

    sudo python benchmarks/phone.py                          # 3 phones, 20 rounds
    sudo python benchmarks/phone.py --confine one --peers 5 --set min_round_interval=0
    sudo python benchmarks/phone.py --eager-libp2p           # without the lazy py-libp2p
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster  # noqa: E402

MB = 1_000_000
MiB = 1 << 20
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: the goal of issue 18 for a phone-class node's peak memory
GOAL_BYTES = 300 * MB


class CgroupError(RuntimeError):
    """A cgroup could not be made, limited, joined or read."""


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``300000000``: bytes (K, M, G are powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise SystemExit(f"--memory: expected a size such as 512M or 1G, got {text!r}") from None


def _own_path(controller: str) -> str:
    """This process's cgroup path in ``controller``'s v1 hierarchy ("" for v2's)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(",") or (controller == "" and names == ""):
            return path.lstrip("/")
    raise CgroupError(f"this process is in no {controller or 'unified'} cgroup")


def cgroup_version() -> int | None:
    """2 where the unified hierarchy has memory and cpu, 1 where v1 has both, else None."""
    for unified in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        controllers = unified / "cgroup.controllers"
        if controllers.is_file() and {"memory", "cpu"} <= set(controllers.read_text().split()):
            return 2
    if (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").is_file() and (
        CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us"
    ).is_file():
        return 1
    return None


def cgroup_unavailable() -> str | None:
    """Why limits cannot be set here (one line), or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create cgroups"
    if cgroup_version() is None:
        return "no cgroup with the memory and cpu controllers (neither v2 nor v1) under /sys/fs/cgroup"
    try:  # e.g. v2 inside a container whose own cgroup may not delegate controllers
        Cgroup.create(f"p2pfl-phone-probe-{os.getpid()}", 64 * MiB, 1.0).remove(timeout=5)
    except (CgroupError, OSError) as error:
        return f"cannot make a limited cgroup here: {error}"
    return None


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as error:
        raise CgroupError(f"cannot write {value!r} to {path}: {error.strerror}") from error


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """A ``key value`` per line file (memory.events, cpu.stat, memory.oom_control)."""
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                values[key] = int(value)
    except OSError:
        pass
    return values


@dataclass
class Cgroup:
    """One confined group: a memory limit without swap and a CPU quota."""

    name: str
    version: int
    dirs: list[Path]  # v2: the one directory; v1: memory's, then cpu's

    @classmethod
    def create(cls, name: str, memory: int, cpus: float) -> Cgroup:
        version = cgroup_version()
        if version is None:
            raise CgroupError("no usable cgroup hierarchy")
        period = 100_000
        quota = max(1000, int(cpus * period))
        if version == 2:
            base = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").is_file() else CGROUP_ROOT / "unified"
            parent = base / _own_path("")
            try:
                enabled = set((parent / "cgroup.subtree_control").read_text().split())
            except OSError as error:
                raise CgroupError(f"cannot read {parent}/cgroup.subtree_control: {error}") from error
            if not {"memory", "cpu"} <= enabled:
                _write(parent / "cgroup.subtree_control", "+memory +cpu")
            group = cls(name, 2, [parent / name])
            group._mkdirs()
            _write(group.dirs[0] / "memory.max", str(memory))
            if (group.dirs[0] / "memory.swap.max").exists():
                _write(group.dirs[0] / "memory.swap.max", "0")
            _write(group.dirs[0] / "cpu.max", f"{quota} {period}")
            return group
        memory_dir = CGROUP_ROOT / "memory" / _own_path("memory") / name
        cpu_dir = CGROUP_ROOT / "cpu" / _own_path("cpu") / name
        group = cls(name, 1, [memory_dir, cpu_dir])
        group._mkdirs()
        _write(memory_dir / "memory.limit_in_bytes", str(memory))
        if (memory_dir / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no swap
            _write(memory_dir / "memory.memsw.limit_in_bytes", str(memory))
        _write(cpu_dir / "cpu.cfs_period_us", str(period))
        _write(cpu_dir / "cpu.cfs_quota_us", str(quota))
        return group

    def _mkdirs(self) -> None:
        for directory in self.dirs:
            try:
                directory.mkdir()
            except OSError as error:
                self.remove(timeout=0)
                raise CgroupError(f"cannot create {directory}: {error.strerror}") from error

    def join(self) -> None:
        """Move the calling process in (a child calls it between fork and exec, so that
        everything it allocates afterwards is charged here)."""
        pid = str(os.getpid())
        for directory in self.dirs:
            (directory / "cgroup.procs").write_text(pid)

    @property
    def memory_dir(self) -> Path:
        return self.dirs[0]

    @property
    def cpu_dir(self) -> Path:
        return self.dirs[-1]

    def memory_now(self) -> int | None:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return _read_int(self.memory_dir / name)

    def memory_peak(self) -> int | None:
        """The kernel's high-water mark, where it keeps one."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return _read_int(self.memory_dir / name)

    def oom_kills(self) -> int:
        if self.version == 2:
            return _read_keyed(self.memory_dir / "memory.events").get("oom_kill", 0)
        return _read_keyed(self.memory_dir / "memory.oom_control").get("oom_kill", 0)

    def limit_hits(self) -> int:
        """How often usage met the limit (v1's ``memory.failcnt``; v2's ``max`` events)."""
        if self.version == 2:
            return _read_keyed(self.memory_dir / "memory.events").get("max", 0)
        return _read_int(self.memory_dir / "memory.failcnt") or 0

    def throttled_seconds(self) -> float:
        stat = _read_keyed(self.cpu_dir / "cpu.stat")
        if self.version == 2:
            return stat.get("throttled_usec", 0) / 1e6
        return stat.get("throttled_time", 0) / 1e9

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the group once its processes are gone (bounded wait)."""
        deadline = time.monotonic() + timeout
        for directory in reversed(self.dirs):
            while directory.exists():
                try:
                    directory.rmdir()
                except OSError:
                    if time.monotonic() >= deadline:
                        print(f"warning: could not remove {directory}", file=sys.stderr)
                        break
                    time.sleep(0.1)


class PhoneCluster(Cluster):
    """``tests/cluster.py``'s cluster, with chosen peers started inside their cgroup."""

    def __init__(self, *args: object, groups: dict[int, Cgroup], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.groups = groups

    def popen_options(self, i: int) -> dict[str, Any]:
        group = self.groups.get(i)
        return {"cwd": ROOT, "preexec_fn": group.join if group is not None else None}


@dataclass
class NodeReport:
    """What was seen of one node."""

    peer: int
    confined: bool
    pid: int
    started: float = field(default_factory=time.monotonic)
    cpu_at: dict[int, float] = field(default_factory=dict)  # rounds done -> CPU seconds
    exit_code: int | None = None
    wall_s: float = 0.0
    cpu_total_s: float = 0.0
    peak_rss: int = 0
    cgroup_peak: int | None = None
    sampled_peak: int = 0  # the largest cgroup usage (or RSS, unconfined) sampled
    oom_kills: int = 0
    limit_hits: int = 0
    throttled_s: float = 0.0
    accuracy: float | None = None

    @property
    def rounds(self) -> int:
        return max(self.cpu_at, default=0)

    def cpu_per_round_ms(self, warmup: int) -> float:
        seen = sorted(self.cpu_at)
        if len(seen) < 2:
            return float("nan")
        first = min((r for r in seen if r >= warmup), default=seen[0])
        last = seen[-1]
        if last == first:
            first = seen[0]
        return 1000 * (self.cpu_at[last] - self.cpu_at[first]) / max(1, last - first)

    @property
    def start_cpu_s(self) -> float:
        seen = sorted(self.cpu_at)
        return self.cpu_at[seen[0]] if seen else float("nan")

    @property
    def peak(self) -> int:
        """The peak the limit is checked against: the cgroup's, else the process's."""
        if self.cgroup_peak is not None:
            return self.cgroup_peak
        return max(self.sampled_peak, self.peak_rss)


@dataclass
class PhoneRun:
    nodes: list[NodeReport]
    timeline: list[dict[str, float]]
    version: int | None
    memory: int
    cpus: float
    command: str


def prepare_digits(seed: int) -> None:
    """Cache the digits split (``p2pfl.learning.datasets``) so that no node imports
    scikit-learn for it. In a child process: the nodes are forked from this one (to join
    their cgroup before exec), and a fork's peak RSS starts at its parent's."""
    code = f"from p2pfl.learning import load_dataset; load_dataset('digits', seed={int(seed)})"
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        check=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def run_phone(
    *,
    peers: int = 3,
    rounds: int = 20,
    memory: int = 512 * MiB,
    cpus: float = 1.0,
    confine: str = "all",
    config: Path = ROOT / "examples" / "node" / "phone.toml",
    sets: list[str] | None = None,
    timeout: float = 600.0,
    sample: float = 0.25,
    command: str = "",
    cold_data: bool = False,
) -> PhoneRun:
    """Run the cluster with the chosen nodes confined; raises ``CgroupError`` if the
    cgroups cannot be made. Every node process and cgroup is gone when it returns."""
    if peers < 2:
        raise ValueError("peers must be at least 2")
    from p2pfl.nodecli import load_node_config

    overrides = [f"rounds={rounds}", f"network.min_peers={peers - 1}", *(sets or [])]
    cfg = load_node_config(config, [f"num_peers={peers}", *overrides])
    if cfg.data.dataset == "digits" and not cold_data:
        prepare_digits(cfg.seed)
    confined = list(range(peers)) if confine == "all" else [1]
    tag = f"p2pfl-phone-{os.getpid()}"
    groups: dict[int, Cgroup] = {}
    timeline: list[dict[str, float]] = []
    try:
        for i in confined:
            groups[i] = Cgroup.create(f"{tag}-{i}", memory, cpus)
        with tempfile.TemporaryDirectory(prefix="p2pfl-phone-") as tmp:
            saved_dir = os.environ.get("P2PFL_DATA_DIR")
            if cold_data:  # an empty data directory: each node computes the digits split
                os.environ["P2PFL_DATA_DIR"] = str(Path(tmp) / "data")
            extra = [arg for item in overrides for arg in ("--set", item)] + ["--quiet"]
            cluster = PhoneCluster(Path(tmp), config, peers, extra_args=extra, groups=groups)
            reports: dict[int, NodeReport] = {}
            try:
                cluster.start_all()
                began = time.monotonic()
                reports = {
                    i: NodeReport(i, i in groups, process.pid)
                    for i, process in cluster.processes.items()
                }
                deadline = began + timeout
                while any(r.exit_code is None for r in reports.values()):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"timed out after {timeout}s:\n{cluster.log_tail(0)}")
                    for i, report in reports.items():
                        if report.exit_code is None:
                            _poll(cluster, report, groups.get(i), timeline, began)
                    time.sleep(sample)
                for i, report in reports.items():
                    status = cluster.status(i) or {}
                    report.accuracy = status.get("accuracy")
            finally:
                cluster.close()
                if cold_data:
                    if saved_dir is None:
                        os.environ.pop("P2PFL_DATA_DIR", None)
                    else:
                        os.environ["P2PFL_DATA_DIR"] = saved_dir
    finally:
        for group in groups.values():
            group.remove()
    version = next(iter(groups.values())).version if groups else None
    return PhoneRun(
        [reports[i] for i in sorted(reports)], timeline, version, memory, cpus, command
    )


def _poll(
    cluster: Cluster,
    report: NodeReport,
    group: Cgroup | None,
    timeline: list[dict[str, float]],
    began: float,
) -> None:
    """One look at a running node: its rounds, CPU and memory; on exit, the totals."""
    reaped, status, usage = os.wait4(report.pid, os.WNOHANG)
    if reaped:
        report.exit_code = os.waitstatus_to_exitcode(status)
        cluster.processes[report.peer].returncode = report.exit_code
        report.wall_s = time.monotonic() - report.started
        # KiB on Linux. Linux carries the forking process's high-water mark into the child
        # across exec: from a large parent (a test run) this reads high; this script's
        # own process is small, so here it is the node's
        report.peak_rss = usage.ru_maxrss * 1024
        report.cpu_total_s = usage.ru_utime + usage.ru_stime
        done = cluster.rounds_done(report.peer)  # the final status.json
        if done and done not in report.cpu_at:
            report.cpu_at[done] = report.cpu_total_s
        if group is not None:
            report.cgroup_peak = group.memory_peak()
            report.oom_kills = group.oom_kills()
            report.limit_hits = group.limit_hits()
            report.throttled_s = group.throttled_seconds()
        return
    try:
        process = psutil.Process(report.pid)
        times = process.cpu_times()
        cpu = times.user + times.system
        rss = process.memory_info().rss
    except psutil.NoSuchProcess:
        return
    done = cluster.rounds_done(report.peer)
    if done and done not in report.cpu_at:
        report.cpu_at[done] = cpu
    used = group.memory_now() if group is not None else None
    report.sampled_peak = max(report.sampled_peak, used if used is not None else rss)
    timeline.append(
        {
            "t_s": round(time.monotonic() - began, 3),
            "peer": report.peer,
            "confined": int(group is not None),
            "rounds": done,
            "rss_mb": round(rss / MB, 1),
            "cgroup_mb": round(used / MB, 1) if used is not None else "",  # type: ignore[dict-item]
            "cpu_s": round(cpu, 3),
        }
    )


def summary_rows(run: PhoneRun, warmup: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for node in run.nodes:
        rows.append(
            {
                "peer": node.peer,
                "confined": node.confined,
                "exit_code": node.exit_code,
                "rounds": node.rounds,
                "accuracy": "" if node.accuracy is None else round(node.accuracy, 4),
                "wall_s": round(node.wall_s, 1),
                "start_cpu_s": round(node.start_cpu_s, 2),
                "cpu_per_round_ms": round(node.cpu_per_round_ms(warmup), 1),
                "cpu_total_s": round(node.cpu_total_s, 2),
                "peak_rss_mb": round(node.peak_rss / MB, 1),
                "cgroup_peak_mb": "" if node.cgroup_peak is None else round(node.cgroup_peak / MB, 1),
                "oom_kills": node.oom_kills,
                "limit_hits": node.limit_hits,
                "throttled_s": round(node.throttled_s, 2),
            }
        )
    return rows


def write_outputs(run: PhoneRun, rows: list[dict[str, object]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary, series = out / "phone.csv", out / "phone_timeline.csv"
    with summary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with series.open("w", newline="") as handle:
        fields = ["t_s", "peer", "confined", "rounds", "rss_mb", "cgroup_mb", "cpu_s"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(run.timeline)
    return [summary, series, plot(run, out / "phone.png")]


def plot(run: PhoneRun, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for node in run.nodes:
        points = [row for row in run.timeline if row["peer"] == node.peer]
        times = [row["t_s"] for row in points]
        ax.plot(times, [row["rss_mb"] for row in points], label=f"peer {node.peer} RSS")
        if node.confined:
            ax.plot(
                times,
                [row["cgroup_mb"] for row in points],
                linestyle="--",
                label=f"peer {node.peer} cgroup",
            )
    ax.axhline(run.memory / MB, color="red", linewidth=1, label=f"limit {run.memory / MiB:.0f} MiB")
    ax.axhline(GOAL_BYTES / MB, color="grey", linestyle=":", label="goal 300 MB")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("MB (10^6 bytes)")
    ax.set_ylim(0, run.memory / MB * 1.1)
    ax.set_title(f"phone-class nodes: {run.cpus:g} CPU, {run.memory / MiB:.0f} MiB each")
    ax.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "node" / "phone.toml"))
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--memory", default="512M", help="memory limit per confined node")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPU quota per confined node")
    parser.add_argument("--confine", choices=("all", "one"), default="all")
    parser.add_argument("--warmup", type=int, default=2, help="rounds left out of CPU/round")
    parser.add_argument("--set", action="append", default=[], help="config override, key=value")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--sample", type=float, default=0.25, help="seconds between samples")
    parser.add_argument("--out", default=str(ROOT / "runs" / "phone"))
    parser.add_argument(
        "--cold-data",
        action="store_true",
        help="nodes start on an empty data directory (each computes the digits split, "
        "importing scikit-learn: the footprint before the split was cached)",
    )
    parser.add_argument(
        "--eager-libp2p",
        action="store_true",
        help="nodes import py-libp2p's whole feature set as it comes (P2PFL_EAGER_LIBP2P=1; "
        "p2pfl/transport/_slim_imports.py): the footprint without the lazy modules",
    )
    parser.add_argument(
        "--optimize",
        type=int,
        choices=(0, 1, 2),
        default=2,
        help="PYTHONOPTIMIZE for the nodes: 2 (the phone profile, docs/phone.md) leaves "
        "out docstrings, ~5 MiB of a node; 0 runs them as Python runs by default",
    )
    args = parser.parse_args()
    reason = cgroup_unavailable()
    if reason is not None:
        print(f"phone.py: {reason}", file=sys.stderr)
        raise SystemExit(2)
    if args.peers < 2 or args.rounds < 1 or args.cpus <= 0:
        print("phone.py: --peers must be at least 2, --rounds at least 1, --cpus positive",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    if args.eager_libp2p:  # the nodes inherit this process's environment
        os.environ["P2PFL_EAGER_LIBP2P"] = "1"
    if args.optimize:
        os.environ["PYTHONOPTIMIZE"] = str(args.optimize)
        # as on a device, where the first run caches the optimised bytecode (.opt-N.pyc):
        # without that every start compiles torch's modules again (~2 s of CPU)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        os.environ.pop("PYTHONOPTIMIZE", None)
    command = "python " + shlex.join(["benchmarks/phone.py", *sys.argv[1:]])
    load = os.getloadavg()[0]
    try:
        run = run_phone(
            peers=args.peers,
            rounds=args.rounds,
            memory=parse_size(args.memory),
            cpus=args.cpus,
            confine=args.confine,
            config=Path(args.config),
            sets=args.set,
            timeout=args.timeout,
            sample=args.sample,
            command=command,
            cold_data=args.cold_data,
        )
    except CgroupError as error:
        print(f"phone.py: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    rows = summary_rows(run, args.warmup)
    written = write_outputs(run, rows, Path(args.out))
    print(f"$ {command}")
    print(
        f"{args.peers} nodes on 127.0.0.1, {Path(args.config).name} {' '.join(args.set)}, "
        f"{args.rounds} rounds; cgroup v{run.version}, {run.cpus:g} CPU and "
        f"{run.memory / MiB:.0f} MiB per confined node; load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " ---: |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    inside = [n for n in run.nodes if n.confined]
    ok = all(n.exit_code == 0 and n.oom_kills == 0 and n.peak < run.memory for n in inside)
    worst = max(n.peak for n in inside)
    measures = {"process peak RSS (ru_maxrss)": max(n.peak_rss for n in inside)}
    charged = [n.cgroup_peak for n in inside if n.cgroup_peak is not None]
    if charged:
        measures["cgroup memory peak"] = max(charged)
    print(
        f"\nlargest peak of a confined node {worst / MB:.0f} MB (limit {run.memory / MiB:.0f} MiB"
        f" = {run.memory / MB:.0f} MB, goal {GOAL_BYTES / MB:.0f} MB): "
        f"{'completed inside the limit' if ok else 'FAILED'}"
    )
    # two measures of one node: what its cgroup was charged (its own pages, and the page
    # cache it brought in first) and its resident set (ru_maxrss: also library pages
    # another process brought in); the 300 MB goal is met by one, both or neither
    for name, value in measures.items():
        verdict = "under" if value < GOAL_BYTES else "ABOVE"
        print(f"largest {name}: {value / MB:.1f} MB, {verdict} the {GOAL_BYTES / MB:.0f} MB goal")
    print("written: " + ", ".join(str(p) for p in written))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
