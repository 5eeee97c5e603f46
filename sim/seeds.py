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
other; a parallel one (processes, Ray tasks) can be passed instead, as every job is a
plain, picklable value and :func:`run_seed_job` a module-level function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from p2pfl import jsonsafe
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
    "SeedGroupResult",
    "SeedJob",
    "parse_seeds",
    "run_seed_group",
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
        tensorboard=job.tensorboard,
    )
    summary = json.loads((job.run_dir / "summary.json").read_text())
    return SimResult(rows, summary, job.run_dir, job.scenario)


#: runs the jobs (in any order, any number at once) and yields each one's result
SeedExecutor = Callable[[Sequence[SeedJob]], Iterable[SimResult]]


def serial_executor(jobs: Sequence[SeedJob]) -> Iterable[SimResult]:
    for job in jobs:
        yield run_seed_job(job)


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` or ``"1-5"`` (or both: ``"1-3,7"``) -> distinct seeds, in order."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            chunk = list(range(int(low), int(high) + 1)) if dash and low else [int(part)]
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is not a seed (expected e.g. 1,2,3 or 1-5)") from None
        if len(seeds) + len(chunk) > MAX_SEEDS:
            raise ValueError(f"--seeds: more than {MAX_SEEDS} seeds")
        seeds.extend(s for s in chunk if s not in seeds)
    if not seeds:
        raise ValueError(f"--seeds: no seed in {text!r} (expected e.g. 1,2,3 or 1-5)")
    return seeds


@dataclass
class SeedGroupResult:
    """The runs of a seed group, and its table across seeds (rows of ``seeds.csv``)."""

    runs: list[SimResult]
    table: list[dict[str, Any]]
    group_dir: Path

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
    try:
        results.extend(executor(jobs))
    except BaseException as error:  # Ctrl-C, or a seed that cannot run: keep what exists
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        _write_group_json(group_dir, {**meta, "status": status})
        write_seed_report(group_dir, title=scenario.name)
        raise
    _write_group_json(group_dir, {**meta, "status": "completed"})
    table = write_seed_report(group_dir, title=scenario.name)
    return SeedGroupResult(results, table, group_dir)


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

    [entry] = read_entries([group_dir])
    runs = [run for run in entry.runs if run.rows]
    # a seed stopped early would drag the mean toward its early rounds: the statistics
    # are over the completed seeds (over all only when none completed)
    completed = [run for run in runs if run.status == "completed"]
    summarised = completed or runs
    table = seed_table(summarised)
    per_seed = [{"seed": run.seed, "status": run.status, **run_metrics(run)} for run in runs]
    curve = seed_curve(summarised)
    write_table_csv(SEEDS_COLUMNS, table, group_dir / "seeds.csv")
    write_table_csv(PER_SEED_COLUMNS, per_seed, group_dir / "per_seed.csv")
    write_table_csv(CURVE_COLUMNS, curve, group_dir / "curve.csv")
    heading = title or group_dir.name
    unfinished = [str(r["seed"]) for r in per_seed if r["status"] != "completed"]
    notes = [SPREAD_NOTE]
    if unfinished and completed:
        notes.append(f"Not completed (Ctrl-C): seed {', '.join(unfinished)}; listed per seed, left out of the statistics.")
    elif unfinished:
        notes.append("No seed completed (Ctrl-C): the statistics are over the rows so far.")
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
