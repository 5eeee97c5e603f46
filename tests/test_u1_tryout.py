"""What a careless or hostile user typed into ``p2pfl sim | sweep | node | topo | report |
compare``, and what each now gets: one line naming the key or the file and what was
expected, exit status 2, no traceback, nothing run and nothing lost.

Every case here was a traceback, a silent wrong run or a lost result before (issue
tryout u1): a folder given as the scenario, ``--set rounds`` without ``=``, ``rounds =
true`` run as one round, ``lr = inf`` trained into NaN, a negative seed failing inside
scikit-learn, ``sim.threads = 100000`` crashing torch, an unknown aggregator failing every
sweep cell, two sweep labels sharing one cell folder, a finished sweep silently re-run
without ``--resume``, a boxed usage panel for an unknown option.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app

TINY = """
name = "tiny"
seed = 1
rounds = 1
[data]
dataset = "digits"
[model]
name = "logreg"
lr = 0.1
[topology]
kind = "ring"
n = 3
[protocol]
name = "dpsgd"
local_steps = 1
[sim]
eval_every = 1
output_dir = "{runs}"
"""

SWEEP = """
name = "tiny-sweep"
base = "tiny.toml"
cell_plots = false
{extra}
[[attacks]]
label = "none"
name = "none"

[[defences]]
label = "mean"
{defences}
"""


def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(runs=(tmp_path / "runs").as_posix()))
    return path


def sweep_file(tmp_path: Path, extra: str = "", defences: str = "") -> Path:
    scenario(tmp_path)
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(extra=extra, defences=defences))
    return path


def refused(args: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with one line holding every ``expected`` piece."""
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for piece in expected:
        assert piece in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ files that cannot be read


def test_a_folder_a_binary_file_and_a_missing_file_are_one_line_naming_the_file(tmp_path: Path) -> None:
    refused(["sim", str(tmp_path)], str(tmp_path), "is a folder; expected a scenario TOML file")
    binary = tmp_path / "x.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    refused(["sim", str(binary)], str(binary), "not UTF-8")
    line = refused(["sim", str(tmp_path / "nope.toml")], "no such scenario file")
    assert line.count("nope.toml") == 1  # the path once, not "nope.toml: nope.toml: ..."
    refused(["sweep", str(tmp_path)], "is a folder; expected a sweep TOML file")
    refused(["node", "-c", str(tmp_path)], "is a folder; expected a config TOML file")


def test_an_unreadable_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pfl.config import ConfigError, read_toml

    path = scenario(tmp_path)

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)  # root reads any file: no chmod test
    with pytest.raises(ConfigError, match=r"tiny.toml: cannot read it \(Permission denied\)"):
        read_toml(path, "scenario")


def test_a_sweep_file_given_to_sim_and_a_scenario_given_to_sweep_say_which_command(tmp_path: Path) -> None:
    sweep = sweep_file(tmp_path)
    refused(["sim", str(sweep)], "a sweep file", f"p2pfl sweep {sweep}")
    refused(["sweep", str(scenario(tmp_path))], "a scenario file", "p2pfl sim")


# ------------------------------------------------------------------ --set and values


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rounds", "--set expects key=value, got 'rounds'"),
        ("=3", "--set has an empty key"),
        ("rounds.x=3", "'rounds' is not a table"),
        ("rounds=true", "rounds: Input should be a valid integer (got true)"),
        ("model.lr=false", "model.lr: Input should be a valid number (got false)"),
        ("model.lr=inf", "model.lr: Input should be a finite number"),
        ("network.bandwidth=nan", "network.bandwidth:"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("seed=4294967296", "seed: Input should be less than or equal to 4294967295"),
        ("sim.threads=100000", "sim.threads: Input should be less than or equal to 1024"),
        ("topology.n=100000000", "topology.n: Input should be less than or equal to 1000000"),
        ("protocol.aggregator=foo", "protocol.aggregator: unknown aggregator 'foo'"),
        ("protocol.aggregator_params.zz=1", "protocol.aggregator_params: aggregator 'mean' does not accept zz"),
        ("model.hidden=[0]", "model.hidden.0: Input should be greater than or equal to 1"),
        ("data.batch_size=1000000000", "data.batch_size: Input should be less than or equal to 65536"),
        ("data.relay_fraction=0.9", "data.relay_fraction=0.9 makes all 3 peers relays without data"),
        ("data.partition=by_source", "data: partition = 'by_source' needs a dataset that says which source"),
        ("attack.fraction=0.5", "attack: fraction is set but no attack is named"),
    ],
)
def test_a_bad_override_is_one_line_naming_the_key(tmp_path: Path, override: str, expected: str) -> None:
    path = scenario(tmp_path)
    refused(["sim", str(path), "--set", override, "--out", str(tmp_path / "out")], str(path), expected)
    assert not (tmp_path / "out").exists()  # refused before a folder was made


def test_a_robust_rule_no_neighbourhood_can_run_is_one_line(tmp_path: Path) -> None:
    """Krum with f = 1 needs 5 models a round; on a ring a peer has 3: it would keep its
    own model every round. Said before the run; clamp = true (shrink f) runs."""
    path = scenario(tmp_path)
    krum = ["--set", "protocol.aggregator=krum", "--set", "protocol.aggregator_params={f=1}"]
    refused(
        ["sim", str(path), *krum, "--out", str(tmp_path / "out")],
        "protocol.aggregator_params: krum with f = 1 needs n > 2f + 2",
        "dpsgd combines at most 3 models a round (peer 0 has 2 neighbours", "set clamp = true",
    )  # fmt: skip
    clamped = ["--set", "protocol.aggregator_params={f=1, clamp=true}"]
    result = CliRunner().invoke(
        app, ["sim", str(path), *krum[:2], *clamped, "--quiet", "--out", str(tmp_path / "ok")]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("attack", "expected"),
    [
        (["attack.count=3"], "attack.count=3 makes all 3 peers Byzantine; expected at least one honest peer"),
        (["attack.fraction=0.9"], "attack.fraction=0.9 makes all 3 peers Byzantine"),
        (["attack.fraction=0.3", "attack.seed=-1"], "attack.seed: Input should be greater than or equal to 0"),
    ],
)
def test_an_attack_that_leaves_no_honest_peer_is_refused(tmp_path: Path, attack: list[str], expected: str) -> None:
    sets = [part for item in ["attack.name=sign_flip", *attack] for part in ("--set", item)]
    refused(["sim", str(scenario(tmp_path)), *sets, "--out", str(tmp_path / "out")], expected)


def test_node_values_are_checked_alike(tmp_path: Path) -> None:
    for override, expected in (
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("threads=5000", "threads: Input should be less than or equal to 1024"),
        ("rounds=false", "rounds: Input should be a valid integer (got false)"),
        ("model.lr=inf", "model.lr: Input should be a finite number"),
    ):
        refused(["node", "--state-dir", str(tmp_path / "s"), "--set", override], expected)


def test_more_peers_than_the_training_set_can_feed_is_one_line_naming_the_keys(tmp_path: Path) -> None:
    """digits has 1,437 training images: 5,000 peers (or 16 peers x 500 shards) cannot each
    get one. Both drivers cut the data in ``build_commons``: the same line from both."""
    path = scenario(tmp_path)
    refused(["sim", str(path), "--set", "topology.n=5000"],
            "1437 samples cannot give 5000 peers", "topology.n", "data.partition = 'iid'")
    refused(["sim", str(path), "--set", "data.partition=shards", "--set", "data.shards_per_peer=600"],
            "cannot make 1800 non-empty shards", "data.shards_per_peer = 600")
    from p2pfl.config import ConfigError, DataConfig, DPSGDConfig, ModelConfig
    from p2pfl.peer import build_commons

    with pytest.raises(ConfigError, match="num_peers"):  # what a node's start-up reports
        build_commons(DataConfig(), ModelConfig(name="logreg"), DPSGDConfig(name="dpsgd"), seed=1, shares=5000)


@pytest.mark.parametrize(
    ("seeds", "expected"),
    [("-1", "a seed is an integer in [0, 4294967295]"), ("5-1", "'5-1' is an empty range"), ("x", "'x' is not a seed")],
)
def test_bad_seeds_are_refused_before_any_run(tmp_path: Path, seeds: str, expected: str) -> None:
    out = tmp_path / "group"
    refused(["sim", str(scenario(tmp_path)), "--seeds", seeds, "--out", str(out)], "--seeds", expected)
    assert not out.exists()
    refused(["sweep", str(sweep_file(tmp_path)), "--seeds", seeds, "--out", str(out)], "--seeds", expected)


def test_the_notebook_api_refuses_a_bad_seed_before_making_a_folder(tmp_path: Path) -> None:
    import sim
    from sim.scenario import ScenarioError

    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ScenarioError, match="is not a seed"):
            sim.run_seeds(str(scenario(tmp_path)), seeds=cast(list[int], [1, bad]), out_dir=tmp_path / "group")
    assert not (tmp_path / "group").exists()


# ------------------------------------------------------------------ output folders


def test_output_folders_that_cannot_be_made_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = scenario(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(["sim", str(path), "--out", str(a_file / "run")], str(a_file / "run"), "cannot create this folder")
    refused(["sim", str(path), "--set", f'sim.output_dir="{a_file.as_posix()}"'], str(a_file), "not a folder")
    refused(["sweep", str(sweep_file(tmp_path)), "--out", str(a_file)], str(a_file), "not a folder")
    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["sim", str(path), "--out", str(run), "--quiet"]).exit_code == 0
    assert list(run.glob("*.png")), "a PNG beside the run's metrics.csv"
    refused(["compare", str(run), "--out", str(a_file)], str(a_file), "not a folder")
    import sim.rundir

    locked, access = tmp_path / "locked", sim.rundir.os.access

    def no_write_there(where: object, mode: int, *args: object, **kwargs: object) -> bool:
        return False if Path(str(where)) == locked else access(where, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sim.rundir.os, "access", no_write_there)  # root writes anywhere: no chmod
    refused(["sim", str(path), "--out", str(locked)], str(locked), "cannot write in this folder")


def test_sim_refuses_an_out_folder_that_holds_a_sweep(tmp_path: Path) -> None:
    out = tmp_path / "sweep-out"
    out.mkdir()
    (out / "results.csv").write_text("attack,defence\n")
    refused(["sim", str(scenario(tmp_path)), "--out", str(out)], "already holds a run (results.csv)")


# ------------------------------------------------------------------ sweeps


def test_a_finished_sweep_is_not_run_again_without_resume(tmp_path: Path) -> None:
    sweep, out = sweep_file(tmp_path), tmp_path / "out"
    refused(["sweep", str(sweep), "--resume"], "--resume needs --out")
    result = CliRunner().invoke(app, ["sweep", str(sweep), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    before = (out / "cells" / "none__mean" / "metrics.csv").read_bytes()
    refused(["sweep", str(sweep), "--out", str(out), "--quiet"], "already holds a sweep", "--resume")
    result = CliRunner().invoke(app, ["sweep", str(sweep), "--out", str(out), "--quiet", "--resume"])
    assert result.exit_code == 0, result.output
    assert "none__mean,resumed" in (out / "status.csv").read_text()
    assert (out / "cells" / "none__mean" / "metrics.csv").read_bytes() == before


def test_sweep_labels_that_share_a_cell_folder_are_refused(tmp_path: Path) -> None:
    twin = '[[defences]]\nlabel = "Mean"\nset = { "protocol.aggregator" = "median" }'
    refused(["sweep", str(sweep_file(tmp_path, defences=twin)), "--out", str(tmp_path / "o")],
            "would share the folder cells/none__mean")
    assert not (tmp_path / "o").exists()


def test_a_bad_cell_is_refused_up_front_not_run_as_a_failed_cell(tmp_path: Path) -> None:
    bad = '[[defences]]\nlabel = "typo"\nset = { "protocol.aggregator" = "medain" }'
    refused(["sweep", str(sweep_file(tmp_path, defences=bad)), "--out", str(tmp_path / "o")],
            "cell none x typo: protocol.aggregator: unknown aggregator 'medain'")
    refused(["sweep", str(sweep_file(tmp_path, extra="seeds = [-1]")), "--out", str(tmp_path / "o")],
            "seeds.0: Input should be greater than or equal to 0")
    refused(["sweep", str(sweep_file(tmp_path)), "--set", "rounds"], "--set expects key=value")
    refused(["sweep", str(sweep_file(tmp_path, extra="fractions = [0.2, 0.2]"))], "fractions must be distinct")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ other commands


def test_report_topo_and_compare_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{cut short")
    refused(["report", str(run)], "summary.json: not a readable summary")
    refused(["topo", "regular", "-p", "k"], "--param: expects key=value, got 'k'")
    refused(["topo", "ring", "-n", "100000000"], "--n: at most 1000000 peers")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(["topo", "ring", "-n", "5", "--png", str(a_file / "g.png")], str(a_file), "not a folder")
    refused(["topo", "ring", "-n", "5", "--after", str(tmp_path / "after.png")], "--after", "--disrupt")
    assert not (tmp_path / "after.png").exists()
    # refused before any download is tried
    refused(["data", "fetch", "mnist", "--data-dir", str(a_file)], "--data-dir", str(a_file), "not a folder")


def test_a_command_line_mistake_is_one_line_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pfl.cli import _run_app

    for argv, expected in (
        (["sim", "x.toml", "--rounds", "3"], "No such option: --rounds"),
        (["sim", "x.toml", "--jobs", "0"], "Invalid value for '--jobs'"),
        (["sweep", "x.toml", "--jobs", "1000"], "less than or equal to 256"),
        (["sim"], "Missing argument 'scenario'; see: "),
        (["simm"], "No such command 'simm'"),
    ):
        monkeypatch.setattr(sys, "argv", ["p2pfl", *argv])
        assert _run_app() == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_the_custom_example_says_how_to_make_its_data(tmp_path: Path) -> None:
    import importlib.util

    source = Path(__file__).resolve().parents[1] / "examples" / "custom" / "data.py"
    spec = importlib.util.spec_from_file_location("u1_custom_data", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(FileNotFoundError, match="python examples/custom/make_npz.py"):
        module.load(seed=1, data_dir=str(tmp_path))


def test_an_interrupted_sweep_draws_its_finished_cells_beside_results_csv(tmp_path: Path) -> None:
    from sim.sweep import load_sweep, run_sweep

    median = '[[defences]]\nlabel = "median"\nset = { "protocol.aggregator" = "median" }'
    config, base = load_sweep(sweep_file(tmp_path, defences=median))
    out = tmp_path / "out"

    def ctrl_c(row: dict[str, object]) -> None:
        raise KeyboardInterrupt  # after the first cell is written

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, base, out_dir=out, show_progress=False, on_cell=ctrl_c)
    assert len((out / "results.csv").read_text().splitlines()) == 2  # header + the one cell
    assert (out / "heatmap_honest_acc_mean.png").read_bytes()[:4] == b"\x89PNG"


def test_a_very_long_scenario_name_still_gets_a_run_folder(tmp_path: Path) -> None:
    path = scenario(tmp_path)
    path.write_text(path.read_text().replace('name = "tiny"', f'name = "{"a" * 300}"'))
    result = CliRunner().invoke(app, ["sim", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "runs").iterdir()
    assert len(folder.name) < 150 and (folder / "metrics.csv").is_file()


def test_report_writes_the_tables_of_a_killed_seed_group(tmp_path: Path) -> None:
    group = tmp_path / "group"
    result = CliRunner().invoke(app, ["sim", str(scenario(tmp_path)), "--seeds", "1,2", "--out", str(group), "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("seeds.md", "seeds.csv", "per_seed.csv", "curve.csv", "seeds.png"):
        (group / name).unlink()  # as a SIGKILL leaves it: group.json and the seed folders
    result = CliRunner().invoke(app, ["report", str(group)])
    assert result.exit_code == 0, result.output
    assert "final_acc_mean | 2 |" in result.output
    assert (group / "seeds.csv").is_file() and (group / "seeds.png").read_bytes()[:4] == b"\x89PNG"


def test_report_draws_the_plots_of_a_killed_run_from_its_metrics(tmp_path: Path) -> None:
    """A SIGKILL leaves metrics.csv (written as measured) and summary.json saying
    "running", no plots: ``report`` draws them from the CSV."""
    import json

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["sim", str(scenario(tmp_path)), "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert "accuracy_vs_rounds.png" in pngs
    for png in run.glob("*.png"):
        png.unlink()
    (run / "summary.json").write_text(json.dumps({"name": "tiny", "status": "running"}))
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "drawn now from metrics.csv" in result.output
    assert sorted(p.name for p in run.glob("*.png")) == pngs
    assert (run / "accuracy_vs_rounds.png").read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_while_the_plots_are_drawn_says_the_run_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sim.runner

    def completed_then_ctrl_c(simulation: object, run_dir: Path, **kwargs: object) -> None:
        (run_dir / "summary.json").write_text('{"status": "completed"}')
        raise KeyboardInterrupt  # as it arrives in the plotting, after the last row

    monkeypatch.setattr(sim.runner, "record_run", completed_then_ctrl_c)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["sim", str(scenario(tmp_path)), "--out", str(out), "--quiet"])
    assert result.exit_code == 130, result.output
    assert "interrupted while drawing the plots: the run completed" in result.output


def test_an_unreachable_ray_cluster_is_refused_before_any_folder_is_made(tmp_path: Path) -> None:
    """``--ray HOST:PORT`` with nobody listening (or no Ray installed) is one line, and
    leaves no group or sweep folder that would block running again with the same ``--out``."""
    import socket

    with socket.socket() as probe:  # a port on this machine that nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    path = scenario(tmp_path)
    refused(["sim", str(path), "--seeds", "1,2", "--ray", address, "--out", str(tmp_path / "group")], "ray")
    assert not (tmp_path / "group").exists()
    sweep = sweep_file(tmp_path)
    refused(["sweep", str(sweep), "--ray", address, "--out", str(tmp_path / "sweep")], "ray")
    assert not (tmp_path / "sweep").exists()
