"""The notebook API: one call runs a scenario and gives back a result object.

::

    import sim

    result = sim.run("examples/dpsgd_digits_ring.toml", overrides={"rounds": 10}, out_dir="runs/try")
    result.final["acc_mean"], result.run_dir, result.summary["status"]
    df = result.to_pandas()               # only if pandas is installed

    group = sim.run_seeds({"rounds": 10, "topology": {"kind": "ring", "n": 8}}, seeds=[1, 2, 3])
    group.table                           # mean, std and 95% CI across seeds per metric

A scenario is given as a :class:`~sim.scenario.Scenario`, a dict (the TOML file's
tables) or the path of a TOML file. Overrides are ``"key=value"`` strings as on the
command line, or a dict of dotted keys to values; either way they are recorded in the
run folder. The run folder is written as ``p2pfl sim`` writes it (rows flushed as they
are measured; Ctrl-C leaves it marked interrupted) unless ``save=False``.
"""

from __future__ import annotations

import json
import operator
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from p2pfl.config import MAX_SEED
from sim.result import SimResult
from sim.rundir import Provenance, prepare_out_dir
from sim.scenario import Scenario, ScenarioError, load_scenario, scenario_from_dict
from sim.seeds import SeedExecutor, SeedGroupResult, group_dir_for, run_seed_group, serial_executor

__all__ = ["Overrides", "ScenarioLike", "resolve_scenario", "resume", "run", "run_seeds"]

ScenarioLike = Scenario | Mapping[str, Any] | str | Path
Overrides = Sequence[str] | Mapping[str, Any] | None


def _toml_literal(value: Any) -> str:
    """``value`` as an inline TOML value (tables inline, as ``--set`` reads them)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _override_strings(overrides: Overrides) -> list[str]:
    """Overrides as ``key=value`` strings (the form recorded in the run folder)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ScenarioError(f"overrides: expected a list of 'key=value' or a dict, got the string {overrides!r}")
    if isinstance(overrides, Mapping):
        items = []
        for key, value in overrides.items():
            try:  # the value as a TOML literal, read back by the same parser as --set
                literal = _toml_literal(value)
                tomllib.loads(f"v = {literal}")
            except (TypeError, ValueError, tomllib.TOMLDecodeError):
                raise ScenarioError(
                    f"overrides: {key}: {value!r} cannot be written as a TOML value"
                ) from None
            items.append(f"{key}={literal}")
        return items
    return [str(item) for item in overrides]


def resolve_scenario(scenario: ScenarioLike, overrides: Overrides = None) -> tuple[Scenario, Provenance]:
    """The validated scenario with ``overrides`` applied, and how it was asked for."""
    from p2pfl.config import apply_overrides

    items = _override_strings(overrides)
    if isinstance(scenario, (str, Path)):
        return load_scenario(scenario, items), Provenance(str(scenario), tuple(items))
    if isinstance(scenario, Scenario):
        raw: dict[str, Any] = scenario.model_dump(mode="json", exclude_none=True)
    elif isinstance(scenario, Mapping):
        raw = tomllib.loads(tomli_w.dumps(dict(scenario)))  # a deep copy, TOML-typed
    else:
        raise ScenarioError(
            f"scenario: expected a Scenario, a dict or a TOML file path, got {type(scenario).__name__}"
        )
    return scenario_from_dict(apply_overrides(raw, items)), Provenance(None, tuple(items))


def run(
    scenario: ScenarioLike,
    *,
    overrides: Overrides = None,
    out_dir: str | Path | None = None,
    save: bool = True,
    plots: bool = True,
    tensorboard: bool = False,
    show_progress: bool = False,
) -> SimResult:
    """Run one scenario; the run folder is ``out_dir`` (new or empty) or, by default, a new
    folder under the scenario's ``sim.output_dir``. ``save=False`` writes nothing;
    ``plots=False`` leaves the PNGs out (about a second saved per run); ``tensorboard``
    adds TensorBoard event files (needs the optional ``tensorboard`` package)."""
    from sim.runner import build_simulation, default_run_dir, record_run, run_simulation, summarize

    resolved, provenance = resolve_scenario(scenario, overrides)
    if tensorboard:
        if not save:
            raise ScenarioError("tensorboard: the event files go into the run folder; it needs save=True")
        from sim.tracking import require_tensorboard

        require_tensorboard()  # before anything runs or is written
    simulation = build_simulation(resolved)
    if not save:
        rows = run_simulation(simulation, show_progress=show_progress)
        summary = {**summarize(simulation), "status": "completed", "seed": resolved.seed, **provenance.as_dict()}
        return SimResult(rows, summary, None, resolved)
    run_dir = prepare_out_dir(out_dir) if out_dir is not None else default_run_dir(resolved, provenance)
    rows = record_run(
        simulation, run_dir, provenance=provenance, show_progress=show_progress, plots=plots,
        tensorboard=tensorboard,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    return SimResult(rows, summary, run_dir, resolved)


def resume(
    scenario: ScenarioLike,
    out_dir: str | Path,
    *,
    overrides: Overrides = None,
    plots: bool = True,
    show_progress: bool = False,
) -> SimResult:
    """Continue the killed run in ``out_dir`` from its checkpoint, as ``p2pfl sim
    --resume`` does: same scenario and overrides as the run was started with (else
    ``sim.checkpoint.CheckpointError``); the result is that of the run never stopped."""
    from sim.runner import resume_run

    resolved, provenance = resolve_scenario(scenario, overrides)
    run_dir = Path(out_dir)
    simulation = resume_run(resolved, run_dir, provenance=provenance, show_progress=show_progress, plots=plots)
    summary = json.loads((run_dir / "summary.json").read_text())
    return SimResult(simulation.rows, summary, run_dir, resolved)


def run_seeds(
    scenario: ScenarioLike,
    seeds: Sequence[int],
    *,
    overrides: Overrides = None,
    out_dir: str | Path | None = None,
    executor: SeedExecutor = serial_executor,
    plots: bool = True,
    show_progress: bool = False,
) -> SeedGroupResult:
    """Run one scenario under each seed into a group folder (see :mod:`sim.seeds`);
    ``plots=False`` leaves the PNGs out of the seeds' own folders."""
    if not seeds:
        raise ScenarioError("seeds: expected at least one seed")
    for seed in seeds:  # checked before a group folder is made, not as failed seeds after
        try:
            value = None if isinstance(seed, bool) else operator.index(seed)  # numpy ints too
        except TypeError:
            value = None
        if value is None or not 0 <= value <= MAX_SEED:
            raise ScenarioError(f"seeds: {seed!r} is not a seed; expected an integer in [0, {MAX_SEED}]")
    resolved, provenance = resolve_scenario(scenario, overrides)
    group_dir = prepare_out_dir(out_dir) if out_dir is not None else group_dir_for(resolved, seeds, provenance)
    return run_seed_group(
        resolved, [int(s) for s in seeds], group_dir, provenance=provenance, executor=executor,
        show_progress=show_progress, plots=plots,
    )
