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

For scale, the *real work* of a round is measured in this process on the same
configuration, without network or node: the local training steps, one evaluation on the
test set the node evaluates on, and the mixing of its model with its neighbours'. A node
is lean when its CPU per round is a small multiple of it (issue 17: within 3x).

    python benchmarks/node_footprint.py                    # 5 peers, 300 rounds
    python benchmarks/node_footprint.py --peers 5 --rounds 300 --set model.hidden=[64]
    python benchmarks/node_footprint.py --lone-node   # checkpoints on the loop vs a thread
    python benchmarks/node_footprint.py --compare /tmp/before --pairs 3   # before/after

``--compare TREE`` runs the cluster alternately from another source tree (``before``: a
copy of the repository with the old code) and from this one (``after``), ``--pairs``
times, and prints each pair side by side with the real work sampled during both: one
command, same load, so that a change's effect is not confused with the machine's. It
ends with each pair's difference and a sign test of them: on this 2-core machine the
spread between runs of the same code is as large as a 10% change (issue 17: a 6-pair
median difference of -1 ms that an 8-pair rerun did not confirm).

``--compare TREE --mixed`` runs both trees *in one cluster*: in each run some peers start
from the other tree and the rest from this one (which peers alternates from run to run,
so that the bootstrap peer's extra work falls on each side equally), and a run's
difference is between peers that ran side by side, under the same load, exchanging the
same messages. Runs of the same code differ by up to 2 ms here, while the peers of one
run differ by ~0.1 ms: this measures a change of 2% where alternating whole runs cannot
(it needs the two trees to speak the same wire format).

    python benchmarks/node_footprint.py --rounds 400 --compare /tmp/before --mixed --pairs 6

``--before-python PYTHON`` runs the before side on another interpreter (the ``python`` of a
virtual environment with p2pfl's dependencies), from this tree unless ``--compare`` names
another: what a build of CPython costs the node, with the same code on both sides.

    python benchmarks/node_footprint.py --rounds 400 --before-python /tmp/venv/bin/python --mixed
"""

from __future__ import annotations

import argparse
import math
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


@dataclass
class Watch:
    """What is known of one peer process so far."""

    process: psutil.Process
    cpu_at: dict[int, float] = field(default_factory=dict)  # rounds done -> CPU seconds
    #: rounds done -> CPU seconds of each thread, by thread name (``/proc``)
    threads_at: dict[int, dict[str, float]] = field(default_factory=dict)
    rss_at_first_round: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    peak_rss: float = 0.0
    cpu_total: float = 0.0
    exit_code: int | None = None


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of ``pid``, summed by thread name
    (the kernel's 15-character ``comm``: ``p2pfl-trio``, ``p2pfl-train_0``, ...; the
    asyncio thread is the main one, named after the executable). Empty off Linux."""
    totals: dict[str, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return totals
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                text = stat.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        # fields[11], fields[12]: utime, stime (fields 14 and 15 of proc(5))
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        name = "main (asyncio)" if tid == str(pid) else name
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


@dataclass(frozen=True)
class Side:
    """What the peers of one side of a comparison run: a source tree's ``p2pfl`` package,
    on an interpreter (a virtual environment's ``python``, with the packages p2pfl needs)."""

    tree: Path
    python: str = sys.executable

    def describe(self, with_python: bool) -> str:
        """The tree, and with ``with_python`` the interpreter (when the two sides' differ)."""
        return f"{self.tree} on {self.python}" if with_python else str(self.tree)


class MixedCluster(Cluster):
    """The test cluster with each peer started from a side of its own: the peer runs that
    side's interpreter and tree's ``p2pfl`` package (``python -m`` puts the working
    directory first on the path, and ``PYTHONPATH`` names the tree for what the peer
    starts itself)."""

    def __init__(self, *args: Any, sides: dict[int, Side], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sides = sides

    def interpreter(self, i: int) -> str:
        return self.sides[i].python

    def popen_options(self, i: int) -> dict[str, Any]:
        tree = self.sides[i].tree
        return {"cwd": tree, "env": {"PYTHONPATH": str(tree)}}


def run(
    args: argparse.Namespace,
    real: RealWork | None = None,
    sides: dict[int, Side] | None = None,
) -> list[dict[str, float]]:
    """Run the cluster, watching every peer; with ``real``, sample the real work of a
    round in this process every ``REAL_EVERY`` seconds while the peers train (same load).
    ``sides``: the tree and interpreter each peer runs (``MixedCluster``); without, the
    peers run the installed ``p2pfl`` on this interpreter."""
    return _run_retrying(args, real, sides)


def _run_retrying(
    args: argparse.Namespace,
    real: RealWork | None,
    sides: dict[int, Side] | None = None,
    attempts: int = 3,
) -> list[dict[str, float]]:
    """``_run``, again with new ports when a peer found its port taken: the cluster picks
    free ports before the peers bind them, and on a shared machine another program may
    take one meanwhile (a lost run, not a measurement)."""
    for attempt in range(1, attempts + 1):
        try:
            return _run(args, real, sides)
        except SystemExit as exc:
            if "Address already in use" not in str(exc) or attempt == attempts:
                raise
            print(f"a peer's port was taken meanwhile: run {attempt} again", file=sys.stderr)
    raise AssertionError("unreachable")


def _run(
    args: argparse.Namespace, real: RealWork | None, sides: dict[int, Side] | None = None
) -> list[dict[str, float]]:
    next_real = 0.0
    with tempfile.TemporaryDirectory(prefix="p2pfl-footprint-") as tmp:
        root = Path(tmp)
        overrides = [
            f"rounds={args.rounds}",
            "min_round_interval=0",
            f"network.min_peers={args.peers - 1}",
            *args.set,
        ]
        extra = [arg for item in overrides for arg in ("--set", item)] + ["--quiet"]
        if sides is None:
            cluster = Cluster(root, Path(args.config), args.peers, extra_args=extra)
        else:
            cluster = MixedCluster(
                root, Path(args.config), args.peers, extra_args=extra, sides=sides
            )
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
                training = all(len(w.cpu_at) > 1 for w in watches.values())
                if real is not None and training and time.monotonic() >= next_real:
                    real.sample()
                    next_real = time.monotonic() + REAL_EVERY
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
            watch.threads_at[done] = thread_cpu_seconds(pid)
            if not watch.rss_at_first_round:
                watch.rss_at_first_round = watch.process.memory_info().rss
        except psutil.NoSuchProcess:
            pass


def summarize(i: int, watch: Watch, args: argparse.Namespace) -> dict[str, float]:
    seen = sorted(watch.cpu_at)
    first = min((r for r in seen if r >= args.warmup), default=seen[0])
    last = seen[-1]
    if last <= first:  # one reading: no CPU per round to take (it printed 0.00 ms before)
        print(
            f"error: --rounds {args.rounds}: peer {i} reported rounds done only "
            f"{len(seen)} time(s) ({', '.join(map(str, seen))}); a node writes status.json "
            f"at most once a second, so a run must last several seconds: use --rounds 200 "
            "or more",
            file=sys.stderr,
        )
        raise SystemExit(2)
    per_round = (watch.cpu_at[last] - watch.cpu_at[first]) / max(1, last - first)
    assert watch.finished is not None
    # by thread: up to the last reading with every thread of the first still alive (a
    # reading taken while the node shut down lacks the threads it had joined: their CPU
    # is in the process's total, but a thread's own figure would read 0)
    threads_first = watch.threads_at[first]
    alive = [r for r in seen if r > first and threads_first.keys() <= watch.threads_at[r].keys()]
    threads_until = alive[-1] if alive else first
    threads_last = watch.threads_at[threads_until]
    per_thread = (
        {
            name: 1000
            * (threads_last[name] - threads_first.get(name, 0.0))
            / (threads_until - first)
            for name in threads_last
        }
        if threads_until > first
        else {}
    )
    return {
        "threads": per_thread,  # type: ignore[dict-item]
        "peer": i,
        "rounds": last,
        "wall_s": watch.finished - watch.started,
        "start_cpu_s": watch.cpu_at[seen[0]],
        "cpu_per_round_ms": 1000 * per_round,
        "cpu_total_s": watch.cpu_total,
        "rss_round1_mb": watch.rss_at_first_round / MB,
        "peak_rss_mb": watch.peak_rss / MB,
    }


#: seconds between two samples of the real work while the cluster trains
REAL_EVERY = 0.5
#: samples of the real work taken right after each run (the peers gone, same process)
REAL_AFTER = 10


class RealWork:
    """One round's learning alone (train, evaluate, mix) on the benchmark's config, in
    this process, on one thread: ``sample`` runs a few rounds and keeps their CPU time.

    Sampled *while the cluster runs*, the figure is taken under the same load as the
    nodes' (on a shared 2-core machine the same round costs 1.5-2.5x more CPU at load
    average 20 than on a quiet one, so a figure taken before or after the run is not
    comparable with the nodes').

    One sample is 10 rounds (~20-30 ms of CPU) and noisy (the scheduler, caches, another
    session's burst), so the figure is the *median* of many: one every ``REAL_EVERY``
    seconds during the run (``samples``), and ``REAL_AFTER`` right after it (``after``:
    the other sessions' load only). Real work stays what a round must do whatever the
    transport -- train, evaluate, mix; encoding, signing, verifying and decoding models
    are protocol overhead, not counted."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from p2pfl.nodecli import load_node_config
        from p2pfl.peer import build_commons

        torch.set_num_threads(1)
        cfg = load_node_config(Path(args.config), [f"num_peers={args.peers}", *args.set])
        self.commons = build_commons(
            cfg.data, cfg.model, cfg.protocol, seed=cfg.seed, shares=cfg.num_peers
        )
        self.peer = self.commons.peer(0, 0)
        assert self.peer.sampler is not None
        x_test, y_test = self.commons.dataset.x_test, self.commons.dataset.y_test
        if cfg.eval_test_samples and cfg.eval_test_samples < len(y_test):
            x_test, y_test = x_test[: cfg.eval_test_samples], y_test[: cfg.eval_test_samples]
        self.x_test, self.y_test = x_test, y_test
        self.steps = getattr(cfg.protocol, "local_steps", 1)
        self.peers = args.peers
        self.weights = torch.full((args.peers,), 1.0 / args.peers)
        self.params = self._round(self.commons.start.clone())  # warm-up
        self.samples: list[float] = []  # during the run
        self.after: list[float] = []  # right after it

    def _round(self, params: Any) -> Any:
        import torch

        from p2pfl.learning import evaluate

        assert self.peer.sampler is not None
        trained, _ = self.commons.trainer.train_one(params, self.peer.sampler, self.steps)
        evaluate(self.commons.trainer, trained, self.x_test, self.y_test)
        stack = torch.stack([trained] * self.peers)  # its model and its neighbours'
        return self.weights @ stack

    def sample(self, rounds: int = 10, *, after: bool = False) -> float:
        """CPU milliseconds per round over ``rounds`` rounds (kept in ``samples``, or in
        ``after`` for a sample taken after the run)."""
        start = time.thread_time()
        for _ in range(rounds):
            self.params = self._round(self.params)
        value = 1000 * (time.thread_time() - start) / rounds
        (self.after if after else self.samples).append(value)
        return value

    def sample_after(self, count: int = REAL_AFTER) -> None:
        """``count`` samples right after the run, the peers gone."""
        for _ in range(count):
            self.sample(after=True)

    def median(self) -> float:
        """Median of the samples taken during the run."""
        return median(self.samples)

    def median_after(self) -> float:
        return median(self.after)

    def plain_torch_ms(self, rounds: int = 10, repeats: int = REAL_AFTER) -> float:
        """The same round written the way a torch tutorial would (the module, autograd,
        a hand-written SGD update, a plain forward on the test set, a weighted sum of the
        models), CPU ms per round, median of ``repeats``: an outside check that the real
        work above is not inflated by our own kernels' overhead."""
        import copy

        import torch
        import torch.nn.functional as F
        from torch.nn.utils import parameters_to_vector, vector_to_parameters

        assert self.peer.sampler is not None
        trainer, sampler = self.commons.trainer, self.peer.sampler
        net = copy.deepcopy(trainer.model)
        weights = list(net.parameters())
        lr = trainer.lr

        def one_round() -> None:
            for _ in range(self.steps):
                idx = torch.from_numpy(sampler.next_batch().astype("int64"))
                loss = F.cross_entropy(net(trainer.x[idx]), trainer.y[idx])
                for w in weights:
                    w.grad = None
                loss.backward()
                with torch.no_grad():
                    for w in weights:
                        assert w.grad is not None
                        w.sub_(w.grad, alpha=lr)
            with torch.no_grad():
                logits = net(self.x_test)
                F.cross_entropy(logits, self.y_test)
                (logits.argmax(1) == self.y_test).float().mean()
                flat = parameters_to_vector(weights)
                vector_to_parameters(self.weights @ torch.stack([flat] * self.peers), weights)

        one_round()  # warm-up
        values = []
        for _ in range(repeats):
            start = time.thread_time()
            for _ in range(rounds):
                one_round()
            values.append(1000 * (time.thread_time() - start) / rounds)
        return median(values)


def checkpoint_cost_ms(args: argparse.Namespace, rounds: int = 100) -> dict[str, float]:
    """What a round's checkpoint costs the event loop: written synchronously on it (as
    before issue 17) or handed to the writer thread (now); CPU and wall, milliseconds."""
    import torch

    from p2pfl.checkpoint import StateDir, save_checkpoint
    from p2pfl.nodecli import load_node_config
    from p2pfl.peer import build_commons

    torch.set_num_threads(1)
    cfg = load_node_config(Path(args.config), [f"num_peers={args.peers}", *args.set])
    commons = build_commons(cfg.data, cfg.model, cfg.protocol, seed=cfg.seed, shares=cfg.num_peers)
    peer = commons.peer(0, 0)
    assert peer.sampler is not None
    neighbours = [f"peer{i}" for i in range(1, args.peers)]
    protocol = commons.build_protocol(peer, peer_id="peer0", neighbours=neighbours)
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="p2pfl-checkpoint-cost-") as tmp:
        disk = StateDir(Path(tmp) / "writer")
        for how in ("sync", "writer"):
            cpu = wall = 0.0
            for r in range(rounds):
                protocol.params += 1e-3  # a new state every round, as training gives
                state = {
                    "protocol": protocol.state_dict(),
                    "sampler": peer.sampler.state_dict(),
                    "neighbours": neighbours,
                    "counters": {},
                    "rounds_done": r,
                    "known": {n: [] for n in neighbours},
                }
                cpu0, wall0 = time.thread_time(), time.perf_counter()
                if how == "sync":
                    save_checkpoint(Path(tmp) / "sync", state)
                else:
                    disk.save(state)
                cpu += time.thread_time() - cpu0
                wall += time.perf_counter() - wall0
                time.sleep(0.005)  # the rest of a round: the writer works meanwhile
            assert disk.writer.wait(60)
            result[f"{how}_cpu_ms"] = 1000 * cpu / rounds
            result[f"{how}_wall_ms"] = 1000 * wall / rounds
    return result


def lone_node_cpu_ms(args: argparse.Namespace, how: str, rounds: int = 200) -> float:
    """CPU per round of one node alone in this process (memory transport, no peers):
    training, evaluation, checkpoint and status only. ``how``: ``"loop"`` writes every
    checkpoint on the event loop (as before issue 17), ``"thread"`` hands it to the writer
    thread (now), ``"every10"`` does so every 10 rounds; ``"status"`` also writes
    status.json after every round (as before the lean round; now at most once a second)."""
    import asyncio

    import torch

    from p2pfl.identity import Identity
    from p2pfl.node import Node
    from p2pfl.nodecli import load_node_config
    from p2pfl.transport.memory import MemoryNetwork, MemoryTransport

    torch.set_num_threads(1)
    identity = Identity.generate(b"\x05" * 32)
    with tempfile.TemporaryDirectory(prefix="p2pfl-lone-node-") as tmp:
        sets = [
            f"rounds={rounds}",
            f"num_peers={args.peers}",
            "min_round_interval=0",
            "network.min_peers=0",
            "network.ping_interval=0",
            f"state_dir={tmp!r}".replace("'", '"'),
            f"checkpoint_every={10 if how == 'every10' else 1}",
            *args.set,
        ]
        cfg = load_node_config(Path(args.config), sets)
        node = Node(cfg, MemoryTransport(MemoryNetwork(seed=0), identity.peer_id), identity)
        if how == "loop":
            node.disk.save = node.disk.save_now  # type: ignore[method-assign,assignment]
        if how == "status":  # status.json after every round, as before (now: at most 1/s)
            node._round_status = lambda *, last: node._write_status()  # type: ignore[method-assign]
        start = time.process_time()
        asyncio.run(node.run())
        return 1000 * (time.process_time() - start) / rounds


def lone_node_report(args: argparse.Namespace, repeats: int = 4) -> None:
    runs: dict[str, list[float]] = {"loop": [], "status": [], "thread": [], "every10": []}
    for _ in range(repeats):  # alternating, so that a change of load hits all three
        for how, values in runs.items():
            values.append(lone_node_cpu_ms(args, how))
    labels = {
        "loop": "checkpoint on the event loop, every round (as before)",
        "status": "checkpoint in the writer thread, status.json after every round (as before)",
        "thread": "checkpoint in the writer thread, every round (default)",
        "every10": "checkpoint in the writer thread, checkpoint_every = 10",
    }
    print(f"one node alone, in process, 200 rounds x {repeats}, CPU per round (median; runs):")
    for how, values in runs.items():
        median = sorted(values)[len(values) // 2]
        print(f"- {labels[how]}: {median:.2f} ms ({', '.join(f'{v:.2f}' for v in values)})")


def median(values: list[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


@dataclass
class Measured:
    """One run of the cluster in ``--compare``: the peers' medians and the real work."""

    which: str
    cpu: float  # CPU / round, median of the peers, ms
    threads: dict[str, float]  # the same by thread name
    real: RealWork  # sampled during and right after the run
    load: tuple[float, float]  # 1-minute load average at its start and its end


def pair_verdict(runs: list[Measured], unit: str = "pair") -> str:
    """Each pair's after-minus-before CPU per round, their median, and a two-sided sign
    test: how often after was lower, and how likely that count is if the change did
    nothing (on this shared machine the spread between runs of the same code can be as
    large as a change's effect, and a difference of medians alone has misled us)."""
    befores = [r.cpu for r in runs if r.which == "before"]
    afters = [r.cpu for r in runs if r.which == "after"]
    diffs = [a - b for a, b in zip(afters, befores, strict=False)]
    if not diffs:
        return ""
    lower = sum(d < 0 for d in diffs)
    n = sum(d != 0 for d in diffs)
    tail = min(lower, n - lower)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(tail + 1)) / 2**n) if n else 1.0
    return (
        f"\nafter - before, {unit} by {unit} (ms per round): {', '.join(f'{d:+.2f}' for d in diffs)}; "
        f"median {median(diffs):+.2f}; after lower in {lower} of {len(diffs)} {unit}s "
        f"(sign test, two-sided: p = {p:.2f})"
    )


@dataclass
class Table:
    """The runs of a comparison as they come (one line each, printed at once), and their
    summary: both sides' medians and the sign test of their differences."""

    unit: str  # "pair" (alternating runs) or "run" (both trees in each run)
    runs: list[Measured] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    threads_seen: list[str] = field(default_factory=list)

    def add(
        self,
        number: int,
        which: str,
        rows: list[dict[str, float]],
        real: RealWork,
        loads: tuple[float, float],
        *,
        label: str | None = None,
    ) -> None:
        """One side of one run: ``rows`` are its peers' figures."""
        threads: dict[str, float] = {}
        by_peer: list[dict[str, float]] = [row["threads"] for row in rows]  # type: ignore[misc]
        for name in sorted({n for peer in by_peer for n in peer}):
            # a peer without a figure for the thread (none taken, see summarize) is left out
            threads[name] = median([peer[name] for peer in by_peer if name in peer])
            if name not in self.threads_seen:
                self.threads_seen.append(name)
        done = Measured(
            which, median([row["cpu_per_round_ms"] for row in rows]), threads, real, loads
        )
        self.runs.append(done)
        self.lines.append(
            f"| {number} | {label or which} | {loads[0]:.1f}-{loads[1]:.1f} | {done.cpu:.2f} "
            f"| {real.median():.2f} / {real.median_after():.2f} "
            f"| {done.cpu / real.median():.2f}x | "
            + ", ".join(f"{name} {value:.2f}" for name, value in threads.items())
            + " |"
        )
        print(self.lines[-1], flush=True)

    def summary(self) -> None:
        """The runs' table again, each side's medians and ratios, and the sign test."""
        runs, threads_seen = self.runs, self.threads_seen
        header = (
            f"| {self.unit} | which | load 1 min | CPU / round ms | real work ms (during / after) "
            "| ratio | by thread ms |"
        )
        print(
            "\n"
            + header
            + "\n| ---: | --- | ---: | ---: | ---: | ---: | --- |\n"
            + "\n".join(self.lines)
        )
        reals = list({id(r.real): r.real for r in runs}.values())
        during = median([v for real in reals for v in real.samples])
        after = median([v for real in reals for v in real.after])
        count_during = sum(len(real.samples) for real in reals)
        count_after = sum(len(real.after) for real in reals)
        print(
            "\nmedians over the runs (ms per round). Ratios: the median of the runs' own (a "
            "run's CPU over the real work sampled during it: the same load, the figure to "
            "trust when the load changes between runs), and the side's median CPU over the "
            "real work pooled over all runs, during them and right after them:"
        )
        print(
            "| | CPU / round | ratio (runs' own) | ratio (pooled, during) | ratio (pooled, after) | "
            + " | ".join(threads_seen)
            + " |"
        )
        print("| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(threads_seen))
        for which in ("before", "after"):
            side = [r for r in runs if r.which == which]
            cpu = median([r.cpu for r in side])
            own = median([r.cpu / r.real.median() for r in side])
            per_thread = [
                median([r.threads[name] for r in side if name in r.threads])
                for name in threads_seen
            ]
            print(
                f"| {which} | {cpu:.2f} | {own:.2f}x | {cpu / during:.2f}x | {cpu / after:.2f}x | "
                + " | ".join(f"{v:.2f}" for v in per_thread)
                + " |"
            )
        print(pair_verdict(runs, self.unit))
        loads = [x for r in runs for x in r.load]
        print(
            f"\nreal work pooled over all {len(reals)} runs (the same code in this process, so one "
            f"figure for both sides): {during:.2f} ms during the runs (median of {count_during} "
            f"samples), {after:.2f} ms right after them (median of {count_after}); load average "
            f"{min(loads):.1f}-{max(loads):.1f} over the command"
        )


def _before_side(args: argparse.Namespace) -> Side:
    """The side to compare this one with: ``--compare``'s tree (else this one) on
    ``--before-python`` (else this interpreter), each checked."""
    before = Path(args.compare).resolve() if args.compare else ROOT
    if not (before / "p2pfl" / "__init__.py").is_file():
        print(
            f"--compare: {before} has no p2pfl/__init__.py (expected a source tree)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    python = args.before_python or sys.executable
    if python != sys.executable:
        check = [python, "-c", "import libp2p, torch, trio"]
        try:
            ok = subprocess.run(check, capture_output=True, timeout=120).returncode == 0
        except OSError:
            ok = False
        if not ok:
            print(
                f"--before-python: {python} cannot import libp2p, torch and trio "
                "(expected the python of an environment with p2pfl's dependencies)",
                file=sys.stderr,
            )
            raise SystemExit(2)
    side = Side(before, python)
    if side == Side(ROOT):  # the two sides could not be told apart
        print(
            f"--compare/--before-python: both name this tree ({ROOT}) on this interpreter "
            f"({sys.executable}): nothing to compare",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return side


def _heading(args: argparse.Namespace, how: str) -> Side:
    """Print the command and what a comparison runs; the other side (checked)."""
    before = _before_side(args)
    named = before.python != sys.executable  # the interpreters differ: name both
    print(f"$ python {shlex.join(['benchmarks/node_footprint.py', *sys.argv[1:]])}")
    print(
        f"{args.peers} peers on 127.0.0.1 over libp2p, {Path(args.config).name} "
        f"{' '.join(args.set)}, {args.rounds} rounds a run; before = {before.describe(named)}, "
        f"after = {Side(ROOT).describe(named)}; {how}\n"
    )
    return before


def compare_report(args: argparse.Namespace) -> None:
    """``--compare``: before (another tree) and after (this one), alternating, one table.

    The ratios at the end are pooled: each side's median CPU per round over the real
    work's median over *every* sample of every run (both sides run the same real work in
    this process, so one figure serves both), taken during the runs and right after
    them; a run's own ratio leans on its ~20 samples alone."""
    before = _heading(
        args,
        "CPU / round: median of the peers; real work: median of the samples taken in this "
        f"process during each run (every {REAL_EVERY} s) and right after it ({REAL_AFTER})",
    )
    table = Table("pair")
    for pair in range(1, args.pairs + 1):
        order = ("before", "after") if pair % 2 else ("after", "before")
        for which in order:
            load = os.getloadavg()[0]
            real = RealWork(args)
            # this tree named as a side too, as in --mixed: not whichever p2pfl is installed
            side = before if which == "before" else Side(ROOT)
            rows = run(args, real, dict.fromkeys(range(args.peers), side))
            real.sample_after()
            table.add(pair, which, rows, real, (load, os.getloadavg()[0]))
    table.summary()


def mixed_report(args: argparse.Namespace) -> None:
    """``--mixed``: both sides in every run, peers split between them."""
    before = _heading(
        args,
        "in each run the peers of one parity start from one side, the others from the other "
        "(swapped from run to run); CPU / round: median of that side's peers; real work: "
        f"sampled in this process during each run (every {REAL_EVERY} s) and right after it",
    )
    table = Table("run")
    for number in range(1, args.pairs + 1):
        before_parity = number % 2
        after = Side(ROOT)
        sides = {i: before if i % 2 == before_parity else after for i in range(args.peers)}
        load = os.getloadavg()[0]
        real = RealWork(args)
        rows = run(args, real, sides)
        real.sample_after()
        loads = (load, os.getloadavg()[0])
        for which in ("before", "after"):
            side = [
                row for row in rows if (sides[int(row["peer"])] == before) == (which == "before")
            ]
            peers = ",".join(str(int(row["peer"])) for row in side)
            table.add(number, which, side, real, loads, label=f"{which} ({peers})")
    table.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "examples/node/node.toml"))
    parser.add_argument("--peers", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=2, help="rounds left out of CPU/round")
    parser.add_argument("--set", action="append", default=[], help="config override, key=value")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--lone-node",
        action="store_true",
        help="only compare where a lone in-process node writes its checkpoints (no cluster)",
    )
    parser.add_argument(
        "--compare",
        metavar="TREE",
        help="also run the cluster from this source tree (before), alternating with this one",
    )
    parser.add_argument(
        "--before-python",
        metavar="PYTHON",
        help="run the before side on this interpreter (another build or virtual environment "
        "with p2pfl's dependencies); without --compare, from this tree",
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="with --compare or --before-python: both sides in every run, the peers split "
        "between them",
    )
    parser.add_argument(
        "--pairs", type=int, default=3, help="before/after pairs (--compare; runs with --mixed)"
    )
    args = parser.parse_args()
    if args.mixed and not (args.compare or args.before_python):
        parser.error("--mixed needs --compare TREE or --before-python PYTHON")
    if args.compare or args.before_python:
        (mixed_report if args.mixed else compare_report)(args)
        return
    if args.lone_node:
        print(f"$ python {shlex.join(['benchmarks/node_footprint.py', *sys.argv[1:]])}")
        print(f"load average {os.getloadavg()[0]:.1f}")
        lone_node_report(args)
        return

    load_before = os.getloadavg()[0]
    during = RealWork(args)
    rows = run(args, during)
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
            f"| {row['cpu_per_round_ms']:.1f} | {row['cpu_total_s']:.2f} "
            f"| {row['rss_round1_mb']:.0f} | {row['peak_rss_mb']:.0f} |"
        )
    print("\nCPU / round ms by thread (from /proc, same rounds):")
    names = sorted({name for row in rows for name in row["threads"]})  # type: ignore[attr-defined]
    for name in names:
        values = [row["threads"].get(name) for row in rows]  # type: ignore[attr-defined]
        print(f"- {name}: {', '.join('-' if v is None else f'{v:.1f}' for v in values)}")
    during.sample_after()
    per_round = median([row["cpu_per_round_ms"] for row in rows])
    real, real_after = during.median(), during.median_after()
    print(
        f"\nreal work of a round (training, evaluation, mixing; in process, 1 thread): "
        f"{real:.2f} ms CPU sampled during the run (median of {len(during.samples)} samples "
        f"of 10 rounds, same load as the nodes); {real_after:.2f} ms right after it "
        f"(median of {len(during.after)})"
    )
    print(
        f"the node's median CPU per round ({per_round:.2f} ms) is {per_round / real:.2f}x "
        f"the real work during the run, {per_round / real_after:.2f}x the real work after it"
    )
    plain = during.plain_torch_ms()
    print(
        f"the same round as a plain torch loop (module, autograd), right after the run: "
        f"{plain:.2f} ms ({real_after / plain:.2f}x of it is the real work measured above)"
    )
    cost = checkpoint_cost_ms(args)
    print(
        "a checkpoint's cost to the event loop (in process): written on it "
        f"{cost['sync_cpu_ms']:.2f} ms CPU / {cost['sync_wall_ms']:.2f} ms wall; handed to "
        f"the writer thread {cost['writer_cpu_ms']:.2f} ms CPU / {cost['writer_wall_ms']:.2f} ms wall"
    )
    worst = max(row["peak_rss_mb"] for row in rows)
    print(
        f"\nlargest peak RSS {worst:.0f} MB (target < 500 MB): {'ok' if worst < 500 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
