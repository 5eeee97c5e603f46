"""Against Flower: ``p2pfl sim`` and Flower 1.42 (on Ray) on the same FedAvg task, whole process.

    python benchmarks/vs_flower.py                          # N = 10, 100, 1000; 3 runs each side
    python benchmarks/vs_flower.py --sizes 10,100 --repeats 1
    python benchmarks/vs_flower.py --only ours --sizes 1000 # our side alone (no flwr needed)

The task (issue 17): FedAvg, the MNIST MLP (``model.name = "mlp"``), 4 rounds, full
participation, ``N`` clients each holding an IID share of the training set, one local
epoch of plain SGD (batch 32, lr 0.1), the server's model evaluated on the whole test set
before the first round and after the last. Both sides get the same ``N + 1`` shares
(ours: a star whose centre, peer 0, is the server; its share trains nothing), the same
start model, the same minibatches and the same number of steps (``ceil(share / 32)``, one
epoch); see ``benchmarks/vs_flower_app.py`` for the Flower app.

Each run is a fresh process, timed whole (interpreter start, imports, data, Ray start-up
and shutdown included), the two sides alternating (ours, Flower, ours, Flower, ...) so
that a change of load on the machine hits both alike. Per run: wall time, CPU time and
peak RSS of the whole process tree. CPU: the larger of ``wait4``'s figure (the child and
the descendants it reaped) and the sum over every process of the tree of its last
sampled CPU time (Ray's workers are not all reaped by the driver); peak RSS: the largest
sampled sum of the tree's resident sets (shared pages counted once per process, which
favours neither side much: ours is one process). Sampling every 0.1 s. Torch and
OpenMP run one thread per process (``OMP_NUM_THREADS=1``); Flower's Ray gets
``--flower-cpus`` CPUs (default: all) and one CPU per client, so it runs that many
clients at once where ours runs one process on one core: compare CPU time for the work
done, wall time for what a user waits. Ray starts its workers at nice 15: on a machine
busy with other work they wait longer than ours, so wall ratios measured under load are
not the quiet machine's (CPU time is unaffected).

Our side is ``p2pfl sim`` itself (``p2pfl.cli``, called in the child process) with one
addition: after the run, the child evaluates the server's model (peer 0), the model
FedAvg's accuracy is quoted for (``acc_mean`` in ``summary.json`` averages the clients'
local models too). It also reports ``rounds_closed_by_timer`` (must be 0: every round
closes on its last update, not on ``round_timeout``) and training jobs per batched call.

Written: ``runs.csv`` (one row per run), ``summary.csv`` (medians and Flower/ours ratios
per N) and ``vs_flower.png`` under ``--out`` (default ``benchmarks/results/vs_flower``).
Needs the optional extra ``flower`` (``pip install -e '.[flower]'``) for the Flower side.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_cli import require_dataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "vs_flower"
SAMPLE_EVERY = 0.1  # seconds between samples of the process tree
#: a round that ends on its timer would average only the updates that had arrived: far
#: above any round's virtual duration here (N = 1,000: about 33 virtual seconds a round)
ROUND_TIMEOUT = 1e6


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class Task:
    """One cell of the comparison: ``n`` clients, everything else shared by both sides."""

    n: int
    rounds: int = 4
    seed: int = 1
    batch_size: int = 32
    lr: float = 0.1
    dataset: str = "mnist"

    @property
    def shares(self) -> int:
        """Data shares: one per client and the server's (peer 0 of our star)."""
        return self.n + 1


def epoch_steps(train_size: int, shares: int, batch_size: int) -> int:
    """SGD steps of one local epoch over the largest of ``shares`` IID shares."""
    largest = math.ceil(train_size / shares)  # np.array_split: sizes differ by at most one
    return max(1, math.ceil(largest / batch_size))


def train_size(task: Task) -> int:
    from p2pfl.learning.datasets import load_dataset

    return len(load_dataset(task.dataset, seed=task.seed).y_train)


def scenario_text(task: Task, steps: int) -> str:
    """Our side's scenario: a star of ``n + 1`` peers running FedAvg with every client."""
    return f"""name = "vs-flower-n{task.n}"
seed = {task.seed}
rounds = {task.rounds}

[data]
dataset = "{task.dataset}"
partition = "iid"
batch_size = {task.batch_size}

[model]
name = "mlp"
lr = {task.lr}

[topology]
kind = "star"
n = {task.shares}

[protocol]
name = "fedavg"
server = 0
clients_per_round = {task.n}
local_steps = {steps}
round_timeout = {ROUND_TIMEOUT:g}

[sim]
eval_every = {task.rounds}
eval_peers = 1
threads = 1
"""


# --------------------------------------------------------------------------- the children


def child_ours(scenario: Path, out: Path, result: Path) -> None:
    """Run ``p2pfl sim scenario --out out``, then write the server's accuracy to ``result``."""
    from p2pfl import gcstartup

    gcstartup.starting()  # as the console entry point does (p2pfl.cli.main)
    import sim.runner as runner

    captured: list[Any] = []
    record_run = runner.record_run

    def recording(simulation: Any, *args: Any, **kwargs: Any) -> Any:
        captured.append(simulation)
        return record_run(simulation, *args, **kwargs)

    runner.record_run = recording  # the CLI looks it up when it runs
    from p2pfl.cli import app

    try:
        app(["sim", str(scenario), "--out", str(out), "--quiet"])
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    from p2pfl.learning.evaluate import evaluate
    from sim.mixing import plain

    simulation = captured[0]
    server = plain(simulation.engine.protocols[0].params)
    data = simulation.dataset
    accuracy = evaluate(simulation.trainer, server.unsqueeze(0), data.x_test, data.y_test).accuracy
    summary = json.loads((out / "summary.json").read_text())
    with (out / "metrics.csv").open() as handle:
        first = next(csv.DictReader(handle))  # round 0: every peer holds the start model
    result.write_text(
        json.dumps(
            {
                "acc_start": float(first["acc_mean"]),
                "acc_final": float(accuracy[0]),
                "acc_mean_peers": summary["final"]["acc_mean"],
                "rounds_closed_by_timer": summary["rounds_closed_by_timer"],
                "training_jobs": summary["training_jobs"],
                "training_calls": summary["training_batches"],
                "warnings": summary["warnings"],
            }
        )
    )


def child_flower(task: Task, steps: int, cpus: int, result: Path) -> None:
    """Run the Flower app of ``vs_flower_app`` in Flower's simulation runtime (Ray)."""
    import torch
    from flwr.simulation import run_simulation
    from vs_flower_app import FlowerTask, client_app, server_app

    torch.set_num_threads(1)
    flower_task = FlowerTask(
        n=task.n,
        rounds=task.rounds,
        seed=task.seed,
        steps=steps,
        batch_size=task.batch_size,
        lr=task.lr,
        dataset=task.dataset,
    )
    run_simulation(
        server_app=server_app(flower_task, result),
        client_app=client_app,
        num_supernodes=task.n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
        },
    )


# --------------------------------------------------------------------------- measuring


@dataclass
class Usage:
    """What one whole process tree cost."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    processes: int
    left_behind: int
    returncode: int


def measure(
    command: Sequence[str], *, env: dict[str, str], log: Path, timeout: float
) -> Usage:
    """Run ``command``; its tree's wall time, CPU time and peak RSS (see the module doc)."""
    import psutil

    seen: dict[int, tuple[float, float]] = {}  # pid -> (create time, last CPU seconds)
    peak = 0
    started = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        status, rusage = 0, None
        while True:
            rss = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            for p in tree:
                try:
                    with p.oneshot():
                        cpu = p.cpu_times()
                        rss += p.memory_info().rss
                        seen[p.pid] = (p.create_time(), cpu.user + cpu.system)
                except psutil.Error:
                    continue
            peak = max(peak, rss)
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout:
                _kill_tree(proc.pid, seen)
                pid, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(SAMPLE_EVERY)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    left = _reap_left_behind(proc.pid, seen)
    reaped_cpu = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
    sampled_cpu = sum(cpu for _, cpu in seen.values())
    child_peak = rusage.ru_maxrss * 1024 if rusage is not None else 0
    return Usage(
        wall_s=wall,
        cpu_s=max(reaped_cpu, sampled_cpu),
        peak_rss_mb=max(peak, child_peak) / 2**20,
        processes=len(seen),
        left_behind=left,
        returncode=proc.returncode,
    )


def _alive(pid: int, created: float) -> Any:
    import psutil

    try:
        p = psutil.Process(pid)
        return p if p.create_time() == created and p.is_running() else None
    except psutil.Error:
        return None


def _reap_left_behind(root: int, seen: dict[int, tuple[float, float]], grace: float = 15.0) -> int:
    """Processes of the tree still running after its root exited: waited for up to
    ``grace`` seconds (Ray stops its daemons asynchronously), then terminated by pid."""
    deadline = time.perf_counter() + grace
    while time.perf_counter() < deadline:
        left = [p for pid, (created, _) in seen.items() if pid != root and (p := _alive(pid, created))]
        if not left:
            return 0
        time.sleep(0.2)
    for p in left:
        p.kill()
    return len(left)


def _kill_tree(root: int, seen: dict[int, tuple[float, float]]) -> None:
    for pid, (created, _) in seen.items():
        p = _alive(pid, created)
        if p is not None:
            p.kill()


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    n: int
    side: str
    repeat: int
    usage: Usage
    result: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        r = self.result
        return {
            "n": self.n,
            "side": self.side,
            "repeat": self.repeat,
            **asdict(self.usage),
            "acc_start": r.get("acc_start", ""),
            "acc_final": r.get("acc_final", math.nan),
            "acc_mean_peers": r.get("acc_mean_peers", ""),
            "rounds_closed_by_timer": r.get("rounds_closed_by_timer", ""),
            "training_jobs": r.get("training_jobs", ""),
            "training_calls": r.get("training_calls", ""),
        }


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    # Ray's workers import the Flower app (benchmarks/vs_flower_app.py) by name
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)  # a private Ray instance, never someone else's cluster
    return env


def run_once(
    task: Task, side: str, steps: int, work: Path, *, repeat: int, cpus: int, timeout: float
) -> Run:
    """One whole process of ``side`` on ``task``, measured; its results read back."""
    cell = Path(tempfile.mkdtemp(prefix=f"{side}-n{task.n}-r{repeat}-", dir=work))
    result = cell / "result.json"
    script = str(Path(__file__).resolve())
    if side == "ours":
        scenario = cell / "scenario.toml"
        scenario.write_text(scenario_text(task, steps))
        command = [sys.executable, script, "child-ours", str(scenario), str(cell / "run"), str(result)]
    else:
        command = [sys.executable, script, "child-flower", json.dumps(asdict(task)), str(steps), str(cpus), str(result)]
    usage = measure(command, env=child_env(), log=cell / "output.log", timeout=timeout)
    run = Run(task.n, side, repeat, usage)
    if usage.returncode == 0 and result.exists():
        run.result = json.loads(result.read_text())
    else:
        tail = (cell / "output.log").read_text(errors="replace")[-2000:]
        print(f"  {side} n={task.n} failed (exit {usage.returncode}); log {cell / 'output.log'}:\n{tail}")
    return run


def check_ours(run: Run) -> list[str]:
    """What must hold of our side for the comparison to stand (batched FedAvg, no timers)."""
    problems = []
    share = run.result.get("rounds_closed_by_timer")
    if share:
        problems.append(f"n={run.n}: {share:.0%} of the round ends came from the round timer")
    for warning in run.result.get("warnings", []):
        problems.append(f"n={run.n}: {warning}")
    return problems


# --------------------------------------------------------------------------- summary


def _median(runs: list[Run], key: str) -> float:
    values = [float(r.row()[key]) for r in runs if r.usage.returncode == 0]
    return statistics.median(values) if values else math.nan


def summarize(runs: list[Run], sizes: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        ours = [r for r in runs if r.n == n and r.side == "ours"]
        flower = [r for r in runs if r.n == n and r.side == "flower"]
        row: dict[str, Any] = {"n": n, "runs_each": max(len(ours), len(flower))}
        for key in ("wall_s", "cpu_s", "peak_rss_mb", "acc_final"):
            row[f"ours_{key}"] = _median(ours, key)
            row[f"flower_{key}"] = _median(flower, key)
        for key in ("wall_s", "cpu_s", "peak_rss_mb"):
            o, f = row[f"ours_{key}"], row[f"flower_{key}"]
            row[f"ratio_{key}"] = f / o if o and not math.isnan(o) and not math.isnan(f) else math.nan
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("wall_s", "wall time, s"), ("cpu_s", "CPU time, s"), ("peak_rss_mb", "peak RSS, MiB"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = [f"N={row['n']}" for row in rows]
    xs = range(len(rows))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ours = [row[f"ours_{key}"] for row in rows]
        flower = [row[f"flower_{key}"] for row in rows]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="p2pfl sim")
        ax.bar([x + 0.2 for x in xs], flower, 0.4, label="Flower 1.42 (Ray)")
        for x, row in zip(xs, rows, strict=True):
            ratio = row[f"ratio_{key}"]
            if not math.isnan(ratio):
                top = max(v for v in (row[f"ours_{key}"], row[f"flower_{key}"]) if not math.isnan(v))
                ax.annotate(f"{ratio:.1f}x", (x, top), ha="center", va="bottom")
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 2.5)  # room for the ratios and the legend
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
    axes[0].legend()
    accs = ", ".join(f"N={r['n']}: {r['ours_acc_final']:.3f} vs {r['flower_acc_final']:.3f}" for r in rows)
    fig.suptitle(f"FedAvg, MNIST MLP, 4 rounds, full participation (medians; accuracy ours vs Flower: {accs})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'N':>5} {'wall ours':>9} {'flower':>8} {'x':>6}  {'CPU ours':>9} {'flower':>8} {'x':>6}  "
        f"{'MiB ours':>8} {'flower':>8} {'x':>5}  {'acc ours':>8} {'flower':>7}"
    )
    for r in rows:
        print(
            f"{r['n']:>5} {r['ours_wall_s']:>9.1f} {r['flower_wall_s']:>8.1f} {r['ratio_wall_s']:>6.1f}  "
            f"{r['ours_cpu_s']:>9.1f} {r['flower_cpu_s']:>8.1f} {r['ratio_cpu_s']:>6.1f}  "
            f"{r['ours_peak_rss_mb']:>8.0f} {r['flower_peak_rss_mb']:>8.0f} {r['ratio_peak_rss_mb']:>5.1f}  "
            f"{r['ours_acc_final']:>8.4f} {r['flower_acc_final']:>7.4f}"
        )


# --------------------------------------------------------------------------- main


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes: expected client counts like 10,100,1000, got {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "child-ours":
        child_ours(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return 0
    if argv and argv[0] == "child-flower":
        child_flower(Task(**json.loads(argv[1])), int(argv[2]), int(argv[3]), Path(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[10, 100, 1000], help="client counts N")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and N (alternating)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--only", choices=["ours", "flower"], help="run one side only")
    parser.add_argument("--flower-cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1 or args.flower_cpus < 1:
        parser.error("--repeats, --rounds and --flower-cpus must be >= 1")
    sides = [args.only] if args.only else ["ours", "flower"]
    if "flower" in sides:
        try:
            import flwr  # noqa: F401
        except ImportError:
            print("error: the Flower side needs flwr: pip install -e '.[flower]' (or --only ours)", file=sys.stderr)
            return 2
    require_dataset(args.dataset)  # here, not as a child's traceback
    size = train_size(Task(n=args.sizes[0], rounds=args.rounds, seed=args.seed, dataset=args.dataset))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vs_flower-"))
    runs: list[Run] = []
    problems: list[str] = []
    print(f"runs in {work}; {args.repeats} per side and N, alternating; torch 1 thread, Ray {args.flower_cpus} CPUs")
    for n in args.sizes:
        task = Task(n=n, rounds=args.rounds, seed=args.seed, dataset=args.dataset)
        steps = epoch_steps(size, task.shares, task.batch_size)
        for repeat in range(args.repeats):
            for side in sides:
                run = run_once(task, side, steps, work, repeat=repeat, cpus=args.flower_cpus, timeout=args.timeout)
                runs.append(run)
                if side == "ours":
                    problems += check_ours(run)
                row = run.row()
                print(
                    f"  N={n:<5} {side:<6} #{repeat}: wall {row['wall_s']:7.1f} s  CPU {row['cpu_s']:7.1f} s  "
                    f"peak {row['peak_rss_mb']:6.0f} MiB  acc {row['acc_final']:.4f}  ({steps} steps/round"
                    + (f", {row['training_jobs']} jobs in {row['training_calls']} calls" if side == "ours" else "")
                    + f", {row['processes']} processes)"
                )
    write_csv([r.row() for r in runs], args.out / "runs.csv")
    rows = summarize(runs, args.sizes)
    write_csv(rows, args.out / "summary.csv")
    print_table(rows)
    if not args.only:
        plot(rows, args.out / "vs_flower.png")
    for problem in problems:
        print(f"warning: {problem}")
    print(f"written: {args.out / 'runs.csv'}, {args.out / 'summary.csv'}" + ("" if args.only else f", {args.out / 'vs_flower.png'}"))
    return 0


if __name__ == "__main__":
    from bench_cli import run

    run(main)
