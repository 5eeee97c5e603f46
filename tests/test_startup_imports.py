"""Start-up stays cheap: heavy modules load only when a command or a run uses them.

Each check runs a fresh interpreter and reads its ``sys.modules``, since one test
process has long since imported everything. The names are checked to load once they
are used, so a renamed or misspelt module cannot make a check pass by itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: what ``import p2pfl.cli`` (``p2pfl --help``, argument parsing) must not load
NOT_FOR_THE_CLI = (
    "torch", "numpy", "scipy", "networkx", "matplotlib", "sklearn", "pandas",
    "libp2p", "trio", "rich.progress", "rich.table", "sim.runner", "p2pfl.node",
)

#: what building, running and writing a simulation without plots must not load
NOT_FOR_A_RUN_WITHOUT_PLOTS = ("matplotlib", "scipy.spatial", "rich.progress", "libp2p", "trio")


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _stages(code: str) -> list[set[str]]:
    """Run ``code`` in a fresh interpreter; each line it prints is a JSON list of modules."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "", "HOME": str(Path.home())},
    ).stdout
    return [set(json.loads(line)) for line in out.splitlines() if line.startswith("[")]


def test_importing_the_cli_loads_no_heavy_module() -> None:
    (loaded,) = _stages("import json, sys\nimport p2pfl.cli\nprint(json.dumps(sorted(sys.modules)))\n")
    assert "typer" in loaded  # the check sees what the CLI really loads
    assert sorted(m for m in loaded if _under(m, *NOT_FOR_THE_CLI)) == []


def test_a_run_without_plots_loads_neither_matplotlib_nor_scipy_spatial(tmp_path: Path) -> None:
    code = f"""
import json, sys
from pathlib import Path
from sim.runner import build_simulation, run_simulation, write_run
from sim.scenario import scenario_from_dict

raw = {{
    "name": "startup", "seed": 1, "rounds": 1,
    "data": {{"dataset": "digits", "partition": "iid", "batch_size": 16}},
    "model": {{"name": "mlp", "hidden": [16]}},
    "topology": {{"kind": "ring", "n": 4}},
    "protocol": {{"name": "dpsgd", "local_steps": 1}},
}}
simulation = build_simulation(scenario_from_dict(raw))
run_simulation(simulation, show_progress=False)
write_run(simulation, Path({str(tmp_path / "bare")!r}), plots=False)
print(json.dumps(sorted(sys.modules)))
write_run(simulation, Path({str(tmp_path / "plotted")!r}))
import networkx as nx
from topologies.positions import NX_LAYOUT_LIMIT, layout
layout(nx.cycle_graph(NX_LAYOUT_LIMIT + 1), iterations=1)  # the own force layout
print(json.dumps(sorted(sys.modules)))
"""
    bare, plotted = _stages(code)
    assert "torch" in bare and "sim.engine" in bare  # the run did happen in this interpreter
    assert sorted(m for m in bare if _under(m, *NOT_FOR_A_RUN_WITHOUT_PLOTS)) == []
    # once plots are written and a graph laid out, the lazy modules do load
    assert {"matplotlib", "scipy.spatial"} <= plotted
    assert (tmp_path / "plotted" / "accuracy_vs_rounds.png").is_file()
    assert not (tmp_path / "bare" / "accuracy_vs_rounds.png").exists()
