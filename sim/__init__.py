"""The virtual-time simulator: run a scenario over thousands of peers in one process.

From a notebook, one call runs a scenario (a dict of the TOML file's tables, a TOML
file, or a ``Scenario``) and returns a result object::

    import sim

    result = sim.run({"rounds": 10, "topology": {"kind": "ring", "n": 8},
                      "protocol": {"name": "dpsgd"}}, overrides={"seed": 2}, out_dir="runs/try")
    result.rows[-1]["acc_mean"], result.summary["status"], result.run_dir
    result.to_pandas()                      # a DataFrame, if pandas is installed

    group = sim.run_seeds("examples/dpsgd_digits_ring.toml", seeds=[1, 2, 3])
    group.table                             # per metric: mean, std, 95% CI across seeds
    sim.resume("examples/dpsgd_digits_ring.toml", out_dir="runs/killed")  # from its checkpoint

    sim.compare_runs([result.run_dir, group.group_dir], out_dir=Path("runs/cmp"), target=0.8)

The lower-level steps stay available: ``build_simulation(scenario_from_dict(raw))`` then
``run_simulation(...)`` (a list of row dicts, nothing written) and ``write_run``.

Names load on first use, so ``import sim`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from topologies.lazy import lazy_exports

_EXPORTS = {
    "Scenario": "sim.scenario",
    "ScenarioError": "sim.scenario",
    "load_scenario": "sim.scenario",
    "scenario_from_dict": "sim.scenario",
    "Simulation": "sim.runner",
    "build_simulation": "sim.runner",
    "record_run": "sim.runner",
    "run_simulation": "sim.runner",
    "summarize": "sim.runner",
    "write_run": "sim.runner",
    "SimResult": "sim.result",
    "SeedGroupResult": "sim.seeds",
    "run": "sim.api",
    "resume": "sim.api",
    "run_seeds": "sim.api",
    "compare_runs": "sim.compare",
}

__all__ = [
    "Scenario",
    "ScenarioError",
    "SeedGroupResult",
    "SimResult",
    "Simulation",
    "build_simulation",
    "compare_runs",
    "load_scenario",
    "record_run",
    "resume",
    "run",
    "run_seeds",
    "run_simulation",
    "scenario_from_dict",
    "summarize",
    "write_run",
]

if TYPE_CHECKING:
    from sim.api import resume, run, run_seeds
    from sim.compare import compare_runs
    from sim.result import SimResult
    from sim.runner import (
        Simulation,
        build_simulation,
        record_run,
        run_simulation,
        summarize,
        write_run,
    )
    from sim.scenario import Scenario, ScenarioError, load_scenario, scenario_from_dict
    from sim.seeds import SeedGroupResult


if not TYPE_CHECKING:  # a type checker reads the imports above (and so catches a typo)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
