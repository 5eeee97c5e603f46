"""``p2pfl compare``: the figure and the table over runs, seed groups and sweeps, checked
against numbers worked out by hand from small, hand-written run folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from sim.compare import compare_runs
from sim.rundata import RunDataError, read_entries, spread

COLUMNS = ["round", "virtual_time", "acc_mean", "acc_min", "acc_max", "bytes_total", "consensus_distance"]


def run_folder(path: Path, curve: list[tuple[int, float, int]], *, status: str | None = "completed") -> Path:
    """A run folder with rows (round, acc_mean, bytes_total); virtual time is round / 10."""
    path.mkdir(parents=True)
    with (path / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for round_, acc, sent in curve:
            writer.writerow({"round": round_, "virtual_time": round_ / 10, "acc_mean": acc,
                             "acc_min": acc - 0.1, "acc_max": acc + 0.1, "bytes_total": sent,
                             "consensus_distance": 1.0})
    if status is not None:
        (path / "summary.json").write_text(json.dumps({"status": status}))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    fast = run_folder(tmp_path / "fast", [(0, 0.1, 0), (5, 0.6, 1000), (10, 0.85, 2000), (15, 0.8, 3000)])
    slow = run_folder(tmp_path / "slow", [(0, 0.1, 0), (5, 0.3, 500), (10, 0.5, 1000), (15, 0.7, 1500)],
                      status="interrupted")
    return [fast, slow]


def test_compare_two_runs_writes_the_figure_and_the_right_table(tmp_path: Path, two_runs: list[Path]) -> None:
    table, written = compare_runs(two_runs, tmp_path / "out", target=0.6)
    assert [p.name for p in written] == ["compare.png", "compare.csv", "compare.md"]
    assert (tmp_path / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    rows = {row["run"]: row for row in read_csv(tmp_path / "out" / "compare.csv")}
    fast, slow = rows["fast"], rows["slow"]
    # fast: last row 0.8, best 0.85; first at >= 0.6 is round 5, 1000 bytes, 0.5 virtual s
    assert (float(fast["final_acc"]), float(fast["best_acc"])) == (0.8, 0.85)
    assert (fast["reached"], fast["rounds_to_target"], fast["bytes_to_target"]) == ("1/1", "5", "1000")
    assert float(fast["virtual_time_to_target"]) == 0.5
    assert fast["status"] == "completed" and fast["seeds"] == "1" and fast["final_acc_std"] == ""
    # slow: reaches 0.6 first at round 15 (0.7), after 1500 bytes; it was interrupted
    assert (slow["reached"], slow["rounds_to_target"], slow["bytes_to_target"]) == ("1/1", "15", "1500")
    assert slow["status"] == "interrupted" and float(slow["final_acc"]) == 0.7
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| fast | 1 | completed | 15 | 0.8 |" in markdown
    assert ">= 0.6" in markdown
    assert [row["run"] for row in table] == ["fast", "slow"]


def test_a_target_never_reached_is_left_empty(tmp_path: Path, two_runs: list[Path]) -> None:
    compare_runs(two_runs, tmp_path / "out", target=0.8)
    rows = {row["run"]: row for row in read_csv(tmp_path / "out" / "compare.csv")}
    assert rows["fast"]["rounds_to_target"] == "10"  # 0.85 at round 10
    assert (rows["slow"]["reached"], rows["slow"]["rounds_to_target"], rows["slow"]["bytes_to_target"]) == ("0/1", "", "")


def test_without_a_target_the_target_columns_are_left_out(tmp_path: Path, two_runs: list[Path]) -> None:
    compare_runs(two_runs, tmp_path / "out")
    header = read_csv(tmp_path / "out" / "compare.csv")[0].keys()
    assert "final_acc" in header and "bytes_to_target" not in header and "reached" not in header


def test_a_seed_group_is_one_entry_with_mean_and_std(tmp_path: Path) -> None:
    group = tmp_path / "group"
    run_folder(group / "seed-1", [(0, 0.1, 0), (5, 0.5, 100), (10, 0.6, 200)])
    run_folder(group / "seed-2", [(0, 0.1, 0), (5, 0.7, 110), (10, 0.8, 220)])
    run_folder(group / "seed-10", [(0, 0.1, 0), (5, 0.6, 120), (10, 0.7, 240)])
    [entry] = read_entries([group])
    assert entry.kind == "seeds" and [r.path.name for r in entry.runs] == ["seed-1", "seed-2", "seed-10"]
    compare_runs([group], tmp_path / "out", target=0.65)
    [row] = read_csv(tmp_path / "out" / "compare.csv")
    assert row["seeds"] == "3"
    assert float(row["final_acc"]) == pytest.approx(0.7)  # (0.6 + 0.8 + 0.7) / 3
    assert float(row["final_acc_std"]) == pytest.approx(0.1)  # sample std of 0.6, 0.7, 0.8
    # reached by seed-2 at round 5 (110 bytes) and seed-10 at round 10 (240 bytes); not seed-1
    assert row["reached"] == "2/3"
    assert float(row["rounds_to_target"]) == 7.5 and float(row["bytes_to_target"]) == 175


def test_a_sweep_folder_gives_one_entry_per_cell(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_folder(sweep / "cells" / "none__mean", [(0, 0.1, 0), (5, 0.9, 10)])
    run_folder(sweep / "cells" / "alie__median" / "seed-1", [(0, 0.1, 0), (5, 0.4, 10)])
    run_folder(sweep / "cells" / "alie__median" / "seed-2", [(0, 0.1, 0), (5, 0.6, 10)])
    entries = read_entries([sweep])
    assert [(e.label, e.kind, len(e.runs)) for e in entries] == [
        ("sweep/alie__median", "seeds", 2),
        ("sweep/none__mean", "run", 1),
    ]
    table, _ = compare_runs([sweep], tmp_path / "out")
    assert [round(row["final_acc"], 6) for row in table] == [0.5, 0.9]


def test_sweep_cells_of_a_seeds_axis_are_one_group(tmp_path: Path) -> None:
    sweep = tmp_path / "sw"
    run_folder(sweep / "cells" / "none__mean__s1", [(0, 0.1, 0), (5, 0.8, 10)])
    run_folder(sweep / "cells" / "none__mean__s2", [(0, 0.1, 0), (5, 0.6, 10)])
    run_folder(sweep / "cells" / "alie__median", [(0, 0.1, 0), (5, 0.5, 10)])
    entries = read_entries([sweep])
    assert [(e.label, e.kind, len(e.runs)) for e in entries] == [
        ("sw/alie__median", "run", 1),
        ("sw/none__mean", "seeds", 2),
    ]
    table, _ = compare_runs([sweep], tmp_path / "out")
    assert table[1]["final_acc"] == pytest.approx(0.7) and table[1]["seeds"] == 2


def test_same_names_in_different_places_are_told_apart(tmp_path: Path) -> None:
    one = run_folder(tmp_path / "a" / "run", [(0, 0.1, 0)])
    two = run_folder(tmp_path / "b" / "run", [(0, 0.2, 0)])
    assert [e.label for e in read_entries([one, two])] == [str(one), str(two)]


def test_spread_is_sample_std_and_a_t_interval() -> None:
    s = spread([1.0, 2.0, 3.0, math.nan])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert s.ci_high - s.mean == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2)
    single = spread([0.5])
    assert single.mean == 0.5 and math.isnan(single.std) and math.isnan(single.ci_low)


def test_cli_compare_writes_png_csv_and_markdown(tmp_path: Path, two_runs: list[Path]) -> None:
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", *map(str, two_runs), "--target", "0.6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| fast |" in result.output
    for name in ("compare.png", "compare.csv", "compare.md"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.parametrize(
    "args, message",
    [
        (["nowhere"], "nowhere: no such folder"),
        (["EMPTY"], "not a run folder (metrics.csv), a seed group"),
        (["RUN", "--target", "1.5"], "--target: expected an accuracy in (0, 1], got 1.5"),
    ],
)
def test_cli_compare_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "EMPTY").mkdir()
    run_folder(tmp_path / "RUN", [(0, 0.1, 0)])
    paths = [str(tmp_path / a) if a in ("nowhere", "EMPTY", "RUN") else a for a in args]
    result = CliRunner().invoke(app, ["compare", *paths, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "compare.png").exists()


def test_reading_a_non_run_raises(tmp_path: Path) -> None:
    with pytest.raises(RunDataError, match="no such folder"):
        read_entries([tmp_path / "missing"])
