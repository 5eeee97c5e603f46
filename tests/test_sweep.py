"""Resilience sweeps: a 2 x 2 grid end to end, through the CLI, and the sweep file's errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from sim.scenario import ScenarioError
from sim.sweep import load_sweep, plan_cells
from tests.sweep_kit import tiny_base

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "resilience"

BASE = tiny_base()

SWEEP = """
name = "grid"
base = "base.toml"
fractions = [0.34]
cell_plots = false

[[attacks]]
label = "none"
name = "none"

[[attacks]]
label = "label flip"
name = "label_flip"

[[defences]]
label = "mean"

[[defences]]
label = "median"
set = { "protocol.aggregator" = "median" }
"""


@pytest.fixture
def sweep_file(tmp_path: Path) -> Path:
    (tmp_path / "base.toml").write_text(BASE)
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    return path


def test_sweep_runs_a_2x2_grid_and_writes_results_and_heatmaps(
    sweep_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", str(sweep_file), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["attack"], r["defence"]) for r in rows] == [
        ("none", "mean"),
        ("none", "median"),
        ("label flip", "mean"),
        ("label flip", "median"),
    ]
    for row in rows:
        assert 0.0 <= float(row["honest_acc_mean"]) <= 1.0 and row["rounds"] == "2"
    flipped = [r for r in rows if r["attack"] == "label flip"]
    assert all(r["fraction"] == "0.34" and r["malicious_peers"] == "2" for r in flipped)
    assert all(r["honest_peers"] == "4" and r["attack_success_rate"] != "" for r in flipped)
    assert all(r["attack_success_rate"] == "" and r["honest_peers"] == "6" for r in rows[:2])
    for name in ("heatmap_honest_acc_mean.png", "heatmap_attack_success_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "cells" / "label-flip__median__f0.34" / "metrics.csv").exists()
    assert "honest accuracy / attack success rate" in result.output

    assert all(r["status"] == "ok" and r["seed"] == "4" for r in rows)
    with (out / "status.csv").open() as handle:  # wall times live here, not in results.csv
        assert [(r["status"], float(r["wall_s"]) >= 0) for r in csv.DictReader(handle)] == [
            ("ran", True)
        ] * 4

    # resuming reads the finished cells back: the same bytes, no cell run again
    first = (out / "results.csv").read_bytes()
    again = CliRunner().invoke(
        app, ["sweep", str(sweep_file), "--out", str(out), "--quiet", "--resume"]
    )
    assert again.exit_code == 0, again.output
    assert (out / "results.csv").read_bytes() == first
    with (out / "status.csv").open() as handle:
        assert {r["status"] for r in csv.DictReader(handle)} == {"resumed"}

    # a changed configuration is not mistaken for a finished cell: it runs again
    changed = CliRunner().invoke(
        app, ["sweep", str(sweep_file), "--out", str(out), "--quiet", "--resume", "-s", "seed=5"]
    )
    assert changed.exit_code == 0, changed.output
    with (out / "status.csv").open() as handle:
        assert {r["status"] for r in csv.DictReader(handle)} == {"ran"}


def test_sweep_cells_carry_the_defence_and_the_fraction(sweep_file: Path) -> None:
    sweep, base = load_sweep(sweep_file, ["rounds=3"])
    cells = plan_cells(sweep, base)
    assert [c.ident for c in cells] == [
        "none__mean",
        "none__median",
        "label-flip__mean__f0.34",
        "label-flip__median__f0.34",
    ]
    last = cells[-1].scenario
    assert last.rounds == 3 and last.protocol.aggregator == "median"
    assert last.attack.name == "label_flip" and last.attack.fraction == 0.34
    assert cells[0].scenario.attack.fraction is None


def test_sweep_errors_name_the_cell_and_the_key(sweep_file: Path) -> None:
    sweep_file.write_text(
        SWEEP.replace('"protocol.aggregator" = "median"', '"protocol.aggregatr" = "median"')
    )
    sweep, base = load_sweep(sweep_file)
    with pytest.raises(ScenarioError, match=r"cell none x median: protocol.*aggregatr"):
        plan_cells(sweep, base)
    sweep_file.write_text(SWEEP.replace("fractions = [0.34]", "fractions = [1.5]"))
    with pytest.raises(ScenarioError, match=r"fractions: .*\[0, 1\)"):
        load_sweep(sweep_file)


def test_reference_sweep_file_is_valid() -> None:
    sweep, base = load_sweep(EXAMPLES / "sweep.toml")
    cells = plan_cells(sweep, base)
    attacks = {c.attack for c in cells}
    defences = {c.defence for c in cells}
    assert len(attacks) == 6 and len(defences) == 8 and len(cells) == 48
    assert {c.scenario.protocol.name for c in cells} == {"dpsgd", "sybilwall", "bristle"}


def test_label_flip_seeds_sweep_file_is_valid() -> None:
    """The 3-seed label-flip study of BENCHMARKS.md: none + label flip x 12 defences."""
    sweep, base = load_sweep(EXAMPLES / "label_flip_seeds.toml")
    cells = plan_cells(sweep, base)
    assert {c.attack for c in cells} == {"none", "label flip"}
    assert len({c.defence for c in cells}) == 12 and len(cells) == 24


def test_seeds_subset_sweep_file_is_valid() -> None:
    """The 27-cell, 3-seed corner of the reference sweep that BENCHMARKS.md times."""
    sweep, base = load_sweep(EXAMPLES / "seeds_subset.toml")
    cells = plan_cells(sweep, base)
    assert len(cells) == 27 and {c.seed for c in cells} == {1, 2, 3}
    assert cells[0].ident == "none__mean__s1" and cells[1].scenario.seed == 2
