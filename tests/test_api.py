"""The public API a notebook user imports: ``p2pfl`` and ``sim`` export their main names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import p2pfl
import sim


def test_every_exported_name_resolves() -> None:
    for module in (p2pfl, sim):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = p2pfl.nope  # type: ignore[attr-defined]  # deliberately wrong: an unknown name


def test_importing_the_packages_loads_no_torch_or_libp2p() -> None:
    """``import p2pfl`` / ``import sim`` stay cheap: names load on first use."""
    code = "import sys, p2pfl, sim; print(sorted(m for m in ('torch', 'libp2p') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_scenario_from_a_dict_runs_and_returns_rows() -> None:
    """The README's "Python API" example, smaller: rows per evaluation, accuracy rising."""
    from sim import build_simulation, run_simulation, scenario_from_dict

    scenario = scenario_from_dict(
        {
            "seed": 1,
            "rounds": 10,
            "topology": {"kind": "ring", "n": 6},
            "model": {"name": "logreg", "lr": 0.5},
            "protocol": {"name": "dpsgd", "local_steps": 5},
            "sim": {"eval_every": 5},
        }
    )
    rows = run_simulation(build_simulation(scenario), show_progress=False)
    assert [row["round"] for row in rows] == [0, 5, 10]
    assert rows[-1]["acc_mean"] > rows[0]["acc_mean"] + 0.3


def test_all_lists_exactly_the_exported_names() -> None:
    assert set(p2pfl.__all__) == {*p2pfl._EXPORTS, "__version__"}
    assert set(sim.__all__) == set(sim._EXPORTS)
