"""The notebook API: ``sim.run`` / ``sim.run_seeds`` and the result objects they return."""

from __future__ import annotations

import json
import statistics
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import sim
from sim.scenario import ScenarioError, load_scenario

TINY: dict[str, Any] = {
    "name": "api",
    "seed": 1,
    "rounds": 4,
    "data": {"dataset": "digits", "batch_size": 16},
    "model": {"name": "logreg", "lr": 0.5},
    "topology": {"kind": "ring", "n": 4},
    "protocol": {"name": "dpsgd", "local_steps": 2},
    "sim": {"eval_every": 2, "threads": 1},
}


def test_run_from_a_dict_returns_rows_summary_and_folder(tmp_path: Path) -> None:
    result = sim.run(TINY, overrides={"rounds": 6, "protocol.local_steps": 3}, out_dir=tmp_path / "run")
    assert isinstance(result, sim.SimResult)
    assert [row["round"] for row in result.rows] == [0, 2, 4, 6]
    assert result.final is result.rows[-1] and result.status == "completed"
    assert result.run_dir == tmp_path / "run"
    on_disk = json.loads((result.run_dir / "summary.json").read_text())
    assert on_disk == result.summary
    assert result.summary["overrides"] == ["rounds=6", "protocol.local_steps=3"]
    assert result.summary["final"]["acc_mean"] == result.rows[-1]["acc_mean"]
    assert result.scenario.rounds == 6 and result.scenario.protocol.local_steps == 3
    assert load_scenario(result.run_dir / "config.toml") == result.scenario
    assert TINY["rounds"] == 4  # the caller's dict is left alone


def test_run_from_a_file_with_string_overrides_goes_to_a_new_folder(tmp_path: Path) -> None:
    import tomli_w

    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps({**TINY, "sim": {**TINY["sim"], "output_dir": str(tmp_path / "runs")}}))
    first = sim.run(path, overrides=["rounds=2"], plots=False)
    second = sim.run(path, overrides=["rounds=2"], plots=False)
    assert first.run_dir != second.run_dir  # never overwritten
    assert first.run_dir is not None and first.run_dir.parent == tmp_path / "runs"
    assert first.summary["scenario_file"] == str(path)
    assert [r["acc_mean"] for r in first.rows] == [r["acc_mean"] for r in second.rows]


def test_run_without_saving_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = sim.run(sim.scenario_from_dict(TINY), save=False)
    assert result.run_dir is None and result.rows[-1]["round"] == 4
    assert result.summary["status"] == "completed"
    assert list(tmp_path.iterdir()) == []


def test_to_pandas_without_pandas_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    result = sim.SimResult(rows=[{"round": 0, "acc_mean": 0.1}], summary={}, run_dir=None)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs pandas, which p2pfl does not install: `pip install pandas`"):
        result.to_pandas()


def test_to_pandas_hands_the_rows_to_pandas(monkeypatch: pytest.MonkeyPatch) -> None:
    frames: list[Any] = []

    def data_frame(rows: Any) -> str:
        frames.append(rows)
        return "frame"

    fake = types.ModuleType("pandas")
    monkeypatch.setattr(fake, "DataFrame", data_frame, raising=False)  # a fresh module: no such attribute yet
    monkeypatch.setitem(sys.modules, "pandas", fake)
    rows = [{"round": 0, "acc_mean": 0.1}, {"round": 2, "acc_mean": 0.4}]
    assert sim.SimResult(rows=rows, summary={}, run_dir=None).to_pandas() == "frame"
    assert frames == [rows]


def test_to_pandas_with_real_pandas() -> None:
    pytest.importorskip("pandas")  # pandas is optional; where it is installed, check the frame
    frame = sim.SimResult(rows=[{"round": 0, "acc_mean": 0.1}], summary={}, run_dir=None).to_pandas()
    assert list(frame.columns) == ["round", "acc_mean"] and len(frame) == 1


def test_run_seeds_gives_a_table_across_seeds(tmp_path: Path) -> None:
    group = sim.run_seeds(TINY, [1, 2, 3], out_dir=tmp_path / "group", plots=False)
    assert isinstance(group, sim.SeedGroupResult)
    assert [r.scenario.seed for r in group.runs] == [1, 2, 3]
    assert [r.run_dir.name for r in group.runs if r.run_dir] == ["seed-1", "seed-2", "seed-3"]
    finals = [r.final["acc_mean"] for r in group.runs]
    row = next(r for r in group.table if r["metric"] == "final_acc_mean")
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(statistics.mean(finals))
    assert row["std"] == pytest.approx(statistics.stdev(finals))
    assert row["ci95_low"] < row["mean"] < row["ci95_high"]
    assert (group.group_dir / "seeds.csv").exists() and (group.group_dir / "curve.csv").exists()


def test_a_seed_executor_can_be_plugged_in(tmp_path: Path) -> None:
    from sim.seeds import run_seed_job

    seen: list[int] = []

    def reversed_executor(jobs):  # any order, as a pool would finish them
        seen.extend(job.scenario.seed for job in jobs)
        return [run_seed_job(job) for job in reversed(jobs)]

    group = sim.run_seeds(TINY, [4, 5], out_dir=tmp_path / "g", executor=reversed_executor, plots=False)
    assert seen == [4, 5]
    assert sorted(r.scenario.seed for r in group.runs) == [4, 5]
    assert next(r for r in group.table if r["metric"] == "rounds")["mean"] == 4


def test_an_interrupted_seed_group_keeps_what_exists(tmp_path: Path) -> None:
    from sim.seeds import run_seed_job

    def interrupted_after_first(jobs):
        yield run_seed_job(jobs[0])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sim.run_seeds(TINY, [1, 2, 3], out_dir=tmp_path / "g", executor=interrupted_after_first, plots=False)
    group = tmp_path / "g"
    assert json.loads((group / "group.json").read_text())["status"] == "interrupted"
    assert "| final_acc_mean | 1 |" in (group / "seeds.md").read_text()


def test_a_seed_stopped_early_is_listed_but_not_averaged(tmp_path: Path) -> None:
    from sim.seeds import write_seed_report

    group = sim.run_seeds(TINY, [1, 2], out_dir=tmp_path / "g", plots=False).group_dir
    summary_path = group / "seed-2" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "status": "interrupted"}))
    table = {row["metric"]: row for row in write_seed_report(group)}
    seed_1 = json.loads((group / "seed-1" / "summary.json").read_text())["final"]["acc_mean"]
    assert table["final_acc_mean"]["n"] == 1 and table["final_acc_mean"]["mean"] == seed_1
    markdown = (group / "seeds.md").read_text()
    assert "| 2 | interrupted |" in markdown and "left out of the statistics" in markdown


@pytest.mark.parametrize(
    "call, message",
    [
        # deliberately wrong: an int is no scenario, and run() must say so
        (lambda: sim.run(42), "scenario: expected a Scenario, a dict or a TOML file path, got int"),  # type: ignore[arg-type]
        (lambda: sim.run(TINY, overrides="rounds=2"), "overrides: expected a list of 'key=value' or a dict"),
        (lambda: sim.run({**TINY, "rounds": 0}), "rounds: Input should be greater than or equal to 1"),
        (lambda: sim.run("missing.toml"), "missing.toml: no such scenario file"),
        (lambda: sim.run_seeds(TINY, []), "seeds: expected at least one seed"),
    ],
)
def test_bad_input_is_a_scenario_error(call, message: str) -> None:
    with pytest.raises(ScenarioError) as error:
        call()
    assert message in str(error.value)


def test_out_dir_holding_a_run_is_refused(tmp_path: Path) -> None:
    from sim.rundir import RunFolderError

    first = sim.run(TINY, out_dir=tmp_path / "run", plots=False)
    with pytest.raises(RunFolderError, match="already holds a run"):
        sim.run(TINY, out_dir=tmp_path / "run")
    assert first.run_dir is not None and json.loads((first.run_dir / "summary.json").read_text())["status"] == "completed"


def test_tensorboard_without_the_package_says_which_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from p2pfl.cli import app
    from sim.tracking import TrackingUnavailable

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(TrackingUnavailable, match=r"pip install 'p2pfl-gossip\[tracking\]'"):
        sim.run(TINY, out_dir=tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    scenario = tmp_path / "s.toml"
    runs = (tmp_path / "runs").as_posix()
    scenario.write_text(f'rounds = 2\n[sim]\noutput_dir = "{runs}"\n')
    result = CliRunner().invoke(app, ["sim", str(scenario), "--tensorboard", "--quiet"])
    assert result.exit_code == 2 and "p2pfl-gossip[tracking]" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_tensorboard_event_files_hold_the_rows(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # the optional extra: checked where it is installed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = sim.run(TINY, out_dir=tmp_path / "run", tensorboard=True, plots=False)
    assert result.run_dir is not None
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    accuracy = [(s.step, s.value) for s in events.Scalars("acc_mean")]
    assert accuracy == [(r["round"], pytest.approx(r["acc_mean"], rel=1e-6)) for r in result.rows]
    assert "bytes_total" in events.Tags()["scalars"]
