"""The virtual-time simulator: run a scenario over thousands of peers in one process.

From a notebook, a scenario is a dict (the TOML file's tables) and a run is a list of
per-evaluation rows::

    from sim import scenario_from_dict, build_simulation, run_simulation

    scenario = scenario_from_dict({"rounds": 10, "topology": {"kind": "ring", "n": 8},
                                   "protocol": {"name": "dpsgd"}})
    rows = run_simulation(build_simulation(scenario), show_progress=False)
    rows[-1]["acc_mean"]

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
    "run_simulation": "sim.runner",
    "summarize": "sim.runner",
    "write_run": "sim.runner",
}

__all__ = [
    "Scenario",
    "ScenarioError",
    "Simulation",
    "build_simulation",
    "load_scenario",
    "run_simulation",
    "scenario_from_dict",
    "summarize",
    "write_run",
]

if TYPE_CHECKING:
    from sim.runner import Simulation, build_simulation, run_simulation, summarize, write_run
    from sim.scenario import Scenario, ScenarioError, load_scenario, scenario_from_dict


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
