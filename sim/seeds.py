"""Seeds as an axis: one scenario run under several seeds, summarised with its spread.

``p2pfl sim scenario.toml --seeds 1,2,3`` (or :func:`sim.run_seeds`) claims one *group
folder* and runs each seed into ``seed-<n>/`` inside it, a complete run folder of its
own. Then, from what is on disk:

- ``seeds.csv``: per metric (final and best accuracy, bytes, virtual time...) the mean,
  the sample standard deviation and a 95% Student-t confidence interval of the mean,
  with min and max, across seeds;
- ``per_seed.csv``: the same metrics, one row per seed;
- ``curve.csv``: per evaluation round, mean accuracy across seeds with its std and CI;
- ``seeds.md``: both tables in Markdown, saying which spread is which;
- ``seeds.png``: accuracy against rounds, bytes and virtual time, the mean with a band
  of +- one std, each seed as a thin line;
- ``group.json``: the seeds, the overrides, and ``status`` (``interrupted`` after Ctrl-C:
  the statistics then cover the completed seeds, and ``per_seed.csv`` every seed that
  started, with its status).

Seeds run through an *executor*: a function from a list of :class:`SeedJob` to the
:class:`~sim.result.SimResult` of each. :func:`serial_executor` runs them one after the
other; :func:`cells_executor` runs them through :func:`sim.cells.run_cells` (``p2pfl sim
--seeds ... --jobs N``: a local process pool, or Ray tasks), possible because every job is
a plain, picklable value and :func:`run_seed_job` a module-level function. An executor may
yield a :class:`SeedFailure` for a seed that raised: the other seeds complete, the table is
over the completed ones, and ``group.json`` (``failed``) and ``seeds.md`` name the failed
seed, whose traceback is in its folder's ``error.txt``. Results are the same whichever way
the seeds ran (each seed is its own process-independent run; the files are written from disk
in seed order), except the wall-clock column ``wall_s``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from p2pfl import jsonsafe
from p2pfl.config import MAX_SEED
from sim.result import SimResult, require_pandas
from sim.rundata import (
    Entry,
    RunData,
    common_rounds,
    markdown_table,
    read_entries,
    spread,
    write_table_csv,
)
from sim.rundir import Provenance, RunFolderError, claim_run_dir
from sim.scenario import Scenario

__all__ = [
    "SEED_METRICS",
    "SeedExecutor",
    "SeedFailure",
    "SeedGroupResult",
    "SeedJob",
    "parse_seeds",
    "run_seed_group",
    "cells_executor",
    "run_seed_job",
    "serial_executor",
    "write_seed_report",
]

#: the metrics of a run compared across seeds: name -> what it is
SEED_METRICS = {
    "final_acc_mean": "mean peer accuracy at the last evaluation",
    "final_acc_min": "worst peer's accuracy at the last evaluation",
    "best_acc_mean": "best mean peer accuracy over the run",
    "final_consensus_distance": "mean distance of the models to their average, at the end",
    "bytes_total": "bytes sent by all peers",
    "virtual_time": "virtual seconds simulated",
    "rounds": "rounds completed at the last evaluation",
    "wall_s": "wall-clock seconds of the run",
}
SPREAD_NOTE = (
    "std: sample standard deviation across seeds (n - 1); ci95: 95% confidence interval "
    "of the mean (Student's t, n - 1 degrees of freedom)."
)
MAX_SEEDS = 1000


@dataclass(frozen=True)
class SeedJob:
    """One seed's run: the scenario (its seed set), its folder (already created), how it was asked for."""

    scenario: Scenario
    run_dir: Path
    provenance: Provenance
    show_progress: bool = False
    plots: bool = True  # the run folder's own PNGs (about a second each)
    tensorboard: bool = False  # event files in the run folder (sim.tracking)


def run_seed_job(job: SeedJob) -> SimResult:
    """Build and run one seed into its folder (the executors' unit of work)."""
    from sim.runner import build_simulation, record_run

    simulation = build_simulation(job.scenario)
    rows = record_run(
        simulation, job.run_dir, provenance=job.provenance, show_progress=job.show_progress, plots=job.plots,
        tensorboard=job.tensorboard, checkpoints=False,  # a seed is run again, never resumed
    )
    summary = json.loads((job.run_dir / "summary.json").read_text())
    return SimResult(rows, summary, job.run_dir, job.scenario)


@dataclass(frozen=True)
class SeedFailure:
    """A seed whose run raised: the others go on; the group lists it as failed."""

    seed: int
    error: str  # one line: "ExceptionType: message"
    detail: str = ""  # the traceback, written to the seed folder's error.txt


#: runs the jobs (in any order, any number at once) and yields each one's result (or failure)
SeedExecutor = Callable[[Sequence[SeedJob]], Iterable["SimResult | SeedFailure"]]


def serial_executor(jobs: Sequence[SeedJob]) -> Iterable[SimResult | SeedFailure]:
    """One seed after the other in this process; an exception ends the group (API default)."""
    for job in jobs:
        yield run_seed_job(job)


def cells_executor(
    jobs: int = 1, ray: str | None = None, on_failed: Callable[[SeedFailure], None] | None = None
) -> SeedExecutor:
    """An executor on :func:`sim.cells.run_cells`: ``jobs`` local processes (1: in this
    process), or Ray tasks (``ray``: ``local``, ``auto`` or an address). A seed that raises
    becomes a :class:`SeedFailure` (``on_failed`` sees it as it happens) and the others go on.

    Ray: each task writes its seed folder on the machine it runs on, so the group is complete
    only on a single-machine cluster (``local``, or ``auto`` on one node) or shared storage.
    Ray is checked here (``CellsError``), before anyone makes the group's folder.
    """
    from sim.cells import check_ray, run_cells

    if ray is not None:
        check_ray(ray)

    def execute(seed_jobs: Sequence[SeedJob]) -> Iterable[SimResult | SeedFailure]:
        def done(outcome: Any) -> None:
            if not outcome.ok and on_failed is not None:
                on_failed(_failure(seed_jobs[outcome.index], outcome.error, outcome.detail))

        outcomes = run_cells(run_seed_job, list(seed_jobs), jobs=jobs, ray=ray, on_done=done)
        for outcome in outcomes:  # task (seed) order, whatever finished first
            if outcome.ok and outcome.value is not None:
                yield outcome.value
            else:
                yield _failure(seed_jobs[outcome.index], outcome.error or "no result", outcome.detail)

    return execute


def _failure(job: SeedJob, error: str, detail: str) -> SeedFailure:
    return SeedFailure(int(job.scenario.seed), error, detail)


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` or ``"1-5"`` (or both: ``"1-3,7"``) -> distinct seeds, in order.

    The size of a range is checked before it is made: a typo such as ``1-100000000`` is
    refused in one line, not expanded. ``ValueError`` names what was wrong.
    """
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            first, last = (int(low), int(high)) if dash and low else (int(part), int(part))
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is not a seed (expected e.g. 1,2,3 or 1-5)") from None
        if not 0 <= first <= MAX_SEED or not 0 <= last <= MAX_SEED:
            raise ValueError(f"--seeds: {part!r}: a seed is an integer in [0, {MAX_SEED}]")
        if last < first:
            raise ValueError(f"--seeds: {part!r} is an empty range (expected low-high, e.g. 1-5)")
        if last - first >= MAX_SEEDS or len(seeds) + last - first >= MAX_SEEDS:
            raise ValueError(f"--seeds: more than {MAX_SEEDS} seeds")
        seeds.extend(seed for seed in range(first, last + 1) if seed not in seeds)
    if not seeds:
        raise ValueError(f"--seeds: no seed in {text!r} (expected e.g. 1,2,3 or 1-5)")
    return seeds


@dataclass
class SeedGroupResult:
    """The runs of a seed group, and its table across seeds (rows of ``seeds.csv``)."""

    runs: list[SimResult]
    table: list[dict[str, Any]]
    group_dir: Path
    failed: list[SeedFailure] = field(default_factory=list)  # seeds that raised (cells_executor)

    def to_pandas(self) -> Any:
        """``seeds.csv`` as a ``pandas.DataFrame`` indexed by metric (pandas is optional)."""
        pandas = require_pandas("SeedGroupResult.to_pandas()")
        return pandas.DataFrame(self.table).set_index("metric")


def group_dir_for(scenario: Scenario, seeds: Sequence[int], provenance: Provenance) -> Path:
    """A new group folder under ``sim.output_dir``: ``<name>-seeds1-2-3[-overrides]-<stamp>``."""
    tag = "seeds" + "-".join(str(s) for s in seeds[:6]) + ("-etc" if len(seeds) > 6 else "")
    return claim_run_dir(scenario.sim.output_dir, scenario.name, tag=tag, overrides=provenance.overrides)


def run_seed_group(
    scenario: Scenario,
    seeds: Sequence[int],
    group_dir: Path,
    *,
    provenance: Provenance | None = None,
    executor: SeedExecutor = serial_executor,
    show_progress: bool = False,
    plots: bool = True,
    tensorboard: bool = False,
) -> SeedGroupResult:
    """Run ``scenario`` once per seed into ``group_dir`` (existing, empty) and write the report
    (``plots=False``: no PNGs in the seeds' folders; ``seeds.png`` is always drawn).

    Seeds the executor reports as :class:`SeedFailure` are listed in ``group.json``
    (``failed``: seed -> error) and ``seeds.md``, their traceback in ``seed-<n>/error.txt``;
    the group's status is then ``failed`` and the table is over the completed seeds.
    On Ctrl-C the report is written over the seeds that exist (the running one marked
    interrupted) with the group's status ``interrupted``, then the interrupt goes on; a
    seed that fails (a scenario error) leaves the group ``failed`` the same way.
    """
    provenance = provenance or Provenance()
    jobs = []
    for seed in seeds:
        folder = group_dir / f"seed-{seed}"
        try:
            folder.mkdir(exist_ok=False)
        except FileExistsError:
            raise RunFolderError(f"{folder}: already exists; a seed group needs a fresh folder") from None
        jobs.append(
            SeedJob(
                scenario.model_copy(update={"seed": seed}),
                folder,
                provenance.with_override(f"seed={seed}"),
                show_progress,
                plots,
                tensorboard,
            )
        )
    meta = {
        "kind": "seed_group",
        "name": scenario.name,
        "seeds": list(seeds),
        "members": [job.run_dir.name for job in jobs],
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance.as_dict(),
    }
    _write_group_json(group_dir, {**meta, "status": "running"})
    results: list[SimResult] = []
    failures: list[SeedFailure] = []
    try:
        for item in executor(jobs):
            if isinstance(item, SeedFailure):
                failures.append(item)
                (group_dir / f"seed-{item.seed}" / "error.txt").write_text(item.detail or item.error + "\n")
            else:
                results.append(item)
    except BaseException as error:  # Ctrl-C, or a seed that cannot run: keep what exists
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        _write_group_json(group_dir, {**meta, "status": status, **_failed_field(failures)})
        write_seed_report(group_dir, title=scenario.name)
        raise
    status = "failed" if failures else "completed"
    _write_group_json(group_dir, {**meta, "status": status, **_failed_field(failures)})
    table = write_seed_report(group_dir, title=scenario.name)
    return SeedGroupResult(results, table, group_dir, failures)


def _failed_field(failures: Sequence[SeedFailure]) -> dict[str, Any]:
    ordered = sorted(failures, key=lambda f: f.seed)
    return {"failed": {str(f.seed): f.error for f in ordered}} if failures else {}


def _write_group_json(group_dir: Path, meta: dict[str, Any]) -> None:
    (group_dir / "group.json").write_text(jsonsafe.dumps(meta, indent=2) + "\n")


def run_metrics(run: RunData) -> dict[str, Any]:
    """The :data:`SEED_METRICS` of one run, from its rows and summary."""
    rows = run.rows
    last = rows[-1] if rows else {}
    nan = float("nan")
    return {
        "final_acc_mean": last.get("acc_mean", nan),
        "final_acc_min": last.get("acc_min", nan),
        "best_acc_mean": max((r["acc_mean"] for r in rows), default=nan),
        "final_consensus_distance": last.get("consensus_distance", nan),
        "bytes_total": last.get("bytes_total", nan),
        "virtual_time": last.get("virtual_time", nan),
        "rounds": last.get("round", nan),
        "wall_s": run.summary.get("wall_time_s", last.get("wall_time", nan)),
    }


SEEDS_COLUMNS = ["metric", "n", "mean", "std", "ci95_low", "ci95_high", "min", "max"]
PER_SEED_COLUMNS = ["seed", "status", *SEED_METRICS]
CURVE_COLUMNS = ["round", "n", "acc_mean", "acc_std", "acc_ci95_low", "acc_ci95_high", "bytes_total", "virtual_time"]


def seed_table(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Rows of ``seeds.csv``: one per metric, its spread across the runs."""
    per_run = [run_metrics(run) for run in runs]
    table = []
    for metric in SEED_METRICS:
        s = spread([m[metric] for m in per_run])
        table.append(
            {"metric": metric, "n": s.n, "mean": s.mean, "std": s.std, "ci95_low": s.ci_low,
             "ci95_high": s.ci_high, "min": s.low, "max": s.high}
        )
    return table


def seed_curve(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Rows of ``curve.csv``: at each round every run measured, accuracy across runs."""
    by_round = [{int(r["round"]): r for r in run.rows} for run in runs]
    curve = []
    for round_ in common_rounds(runs):
        rows = [rounds[round_] for rounds in by_round]
        acc = spread([r["acc_mean"] for r in rows])
        curve.append(
            {"round": round_, "n": acc.n, "acc_mean": acc.mean, "acc_std": acc.std,
             "acc_ci95_low": acc.ci_low, "acc_ci95_high": acc.ci_high,
             "bytes_total": spread([r["bytes_total"] for r in rows]).mean,
             "virtual_time": spread([r["virtual_time"] for r in rows]).mean}
        )
    return curve


def write_seed_report(group_dir: Path, *, title: str | None = None) -> list[dict[str, Any]]:
    """``seeds.csv``, ``per_seed.csv``, ``curve.csv``, ``seeds.md``, ``seeds.png`` from the
    seed folders on disk; returns the rows of ``seeds.csv``."""
    from sim.compare import plot_entries

    failed = _read_failed(group_dir)
    runs: list[RunData] = []
    if any(group_dir.glob("seed-*/metrics.csv")):  # none when every seed failed before a row
        [entry] = read_entries([group_dir])
        runs = [run for run in entry.runs if run.rows]
    # a seed stopped early would drag the mean toward its early rounds: the statistics
    # are over the completed seeds (over all only when none completed)
    completed = [run for run in runs if run.status == "completed"]
    summarised = completed or runs
    table = seed_table(summarised)
    per_seed = [
        {"seed": run.seed, "status": "failed" if str(run.seed) in failed else run.status, **run_metrics(run)}
        for run in runs
    ]
    listed = {str(row["seed"]) for row in per_seed}
    nan = float("nan")  # a seed that failed before its first row: listed, no metrics
    per_seed += [{"seed": int(s), "status": "failed", **dict.fromkeys(SEED_METRICS, nan)} for s in failed if s not in listed]
    per_seed.sort(key=lambda row: _seed_key(row["seed"]))
    curve = seed_curve(summarised)
    write_table_csv(SEEDS_COLUMNS, table, group_dir / "seeds.csv")
    write_table_csv(PER_SEED_COLUMNS, per_seed, group_dir / "per_seed.csv")
    write_table_csv(CURVE_COLUMNS, curve, group_dir / "curve.csv")
    heading = title or group_dir.name
    unfinished = [str(r["seed"]) for r in per_seed if r["status"] not in ("completed", "failed")]
    notes = [SPREAD_NOTE]
    if failed:
        notes.append(
            "Failed: " + "; ".join(f"seed {s} ({error})" for s, error in failed.items())
            + "; listed per seed (traceback in seed-<n>/error.txt), left out of the statistics."
        )
    if unfinished and completed:
        notes.append(f"Not completed (stopped: Ctrl-C or killed): seed {', '.join(unfinished)}; listed per seed, left out of the statistics.")
    elif unfinished:
        notes.append("No seed completed (stopped: Ctrl-C or killed): the statistics are over the rows so far.")
    markdown = (
        f"# {heading}: {len(summarised)} seeds\n\n"
        + markdown_table(SEEDS_COLUMNS, table)
        + "\n" + " ".join(notes) + "\n\n## Per seed\n\n"
        + markdown_table(PER_SEED_COLUMNS, per_seed)
    )
    (group_dir / "seeds.md").write_text(markdown)
    if summarised:
        plot_entries([Entry(heading, "seeds", summarised, group_dir)], group_dir / "seeds.png", title=heading, members=True)
    return table


def _read_failed(group_dir: Path) -> dict[str, str]:
    """``group.json``'s ``failed`` (seed -> error line), empty when none or no group.json."""
    try:
        meta = json.loads((group_dir / "group.json").read_text())
    except (OSError, ValueError):
        return {}
    failed = meta.get("failed") if isinstance(meta, dict) else None
    return {str(k): str(v) for k, v in failed.items()} if isinstance(failed, dict) else {}


def _seed_key(seed: Any) -> tuple[int, Any]:
    try:
        return (0, int(seed))
    except (TypeError, ValueError):
        return (1, str(seed))
