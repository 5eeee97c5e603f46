"""Every committed results CSV has a plot beside it, and the scripts re-draw a plot from a CSV.

The project's rule is "a PNG plot beside every results CSV". The first test holds the
committed tree to it: each CSV under ``benchmarks/results`` that git tracks has a PNG of the
same name beside it, or one named in ``PLOTTED_BY`` (a PNG that draws the same figures,
e.g. ``fuzz.png`` the protocols of ``fuzz_summary.csv``). The others run each script's
plot-from-CSV mode on a tiny CSV in a temporary folder: a PNG appears, the CSV is left as it
was, and a CSV of the wrong kind is a one-line error with exit status 2, not a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: CSVs drawn by a PNG of another name in their folder (path under benchmarks/results -> PNG)
PLOTTED_BY = {
    "fuzz_summary.csv": "fuzz.png",  # the per-protocol sums of fuzz.csv, as bars
    "modest_summary.csv": "modest.png",  # rounds/bytes where the curves cross the target
    "modest_quick_summary.csv": "modest_quick.png",
    "compression/curves.csv": "compression.png",  # its curves, mean over seeds
    "compression/runs.csv": "compression.png",  # bytes to target: where the curves cross it
    "vs_flower/runs.csv": "vs_flower.png",  # summary.csv's medians are of these runs
    "vs_flower/summary.csv": "vs_flower.png",
    "vs_flower_quiet/runs.csv": "vs_flower.png",
    "vs_flower_quiet/summary.csv": "vs_flower.png",
    "papers/modest_fl.csv": "modest_fl_runs.png",  # the table of modest_fl_runs.csv, as bars
    "papers/mnist/modest_fl.csv": "modest_fl_runs.png",
    "papers/sybilwall/results.csv": "heatmap_honest_acc_mean.png",  # p2pfl sweep's heatmaps
    "papers/sybilwall/seeds.csv": "heatmap_honest_acc_mean.png",
    "papers/sybilwall/status.csv": "heatmap_honest_acc_mean.png",  # the run log of those cells
}


def _tracked_csvs() -> list[str]:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    listed = subprocess.run([git, "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                            timeout=30, check=False)  # fmt: skip
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    return sorted(line for line in listed.stdout.splitlines() if line.endswith(".csv"))


def test_every_tracked_results_csv_has_a_png_beside_it():
    csvs = _tracked_csvs()
    assert csvs, "git tracks no CSV under benchmarks/results"
    lacking = []
    for name in csvs:
        path = ROOT / name
        relative = path.relative_to(RESULTS).as_posix()
        png = (
            path.with_suffix(".png")
            if relative not in PLOTTED_BY
            else path.parent / PLOTTED_BY[relative]
        )
        if not png.is_file() or not png.read_bytes().startswith(PNG_MAGIC):
            lacking.append(f"{name} (expected {png.relative_to(ROOT)})")
    assert not lacking, "results CSVs with no plot beside them:\n" + "\n".join(lacking)


def _load(path: Path, name: str) -> ModuleType:
    """A benchmark script as a module, with its folder and benchmarks/ importable meanwhile."""
    added = [str(path.parent), str(BENCHMARKS)]
    sys.path[:0] = added
    try:
        return __import__(name)
    finally:
        for entry in added:
            sys.path.remove(entry)


def _write(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def _drawn(csv_path: Path, before: bytes) -> None:
    png = csv_path.with_suffix(".png")
    assert png.is_file() and png.read_bytes().startswith(PNG_MAGIC)
    assert png.stat().st_size > 10_000  # a figure with axes and text, not an empty canvas
    assert csv_path.read_bytes() == before  # the CSV is read, never rewritten


def _refused(status: int, capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "\n" not in error and "Traceback" not in error
    assert not list(folder.glob("wrong*.png"))


def test_sweep_timing_plot_from_csv(tmp_path, capsys):
    sweep_timing = _load(BENCHMARKS / "sweep_timing.py", "sweep_timing")
    csv_path = _write(
        tmp_path / "timing.csv",
        """
pair,jobs,wall_s,cpu_s,peak_rss_mb,processes,returncode,load_before,load_after,md5_results.csv,md5_seeds.csv,folder
0,1,66.9,63.7,1386,1,0,0.7,1.0,aa,bb,/tmp/x/pair0-jobs1
0,2,34.8,67.1,2659,6,0,1.0,2.1,aa,bb,/tmp/x/pair0-jobs2
1,2,35.0,66.0,2600,6,0,0.9,1.5,aa,bb,/tmp/x/pair1-jobs2
1,1,65.0,64.0,1390,1,0,1.5,1.1,aa,bb,/tmp/x/pair1-jobs1
""",
    )
    before = csv_path.read_bytes()
    assert sweep_timing.main(["--plot", str(csv_path)]) == 0
    _drawn(csv_path, before)
    wrong = _write(tmp_path / "wrong.csv", "pair,wall_s\n0,1.0")
    _refused(sweep_timing.main(["--plot", str(wrong)]), capsys, tmp_path)
    _refused(sweep_timing.main(["--plot", str(tmp_path / "wrong-absent.csv")]), capsys, tmp_path)


def test_sim_scale_plot_from_csv(tmp_path, capsys):
    sim_scale = _load(BENCHMARKS / "sim_scale.py", "sim_scale")
    header = ",".join(sim_scale.COLUMNS)
    ratio = _write(
        tmp_path / "ratio.csv",
        f"""
{header}
ratio,1000,20,bare batched compute,2.0,2.0,0.1,,,300,,,,
ratio,1000,20,simulator,2.4,2.4,0.12,1.2,1.2,310,,0.0,,
""",
    )
    big = _write(
        tmp_path / "big.csv",
        f"""
{header}
big,60000,3,simulator,110.4,110.0,34.4,,,17456.2,,,peak RSS 17 GiB,2.91
""",
    )
    for csv_path in (ratio, big):  # the two layouts of _plot: ratio bars, and one bar per row
        before = csv_path.read_bytes()
        sim_scale.main(["--plot", str(csv_path)])
        _drawn(csv_path, before)
    wrong = _write(tmp_path / "wrong.csv", "part,n\nbig,3")
    with pytest.raises(SystemExit) as exited:
        sim_scale.main(["--plot", str(wrong)])
    assert isinstance(exited.value.code, int), exited.value.code
    _refused(exited.value.code, capsys, tmp_path)


def test_modest_fl_plot_from_runs_csv(tmp_path, capsys):
    modest_fl = _load(BENCHMARKS / "papers" / "modest_fl.py", "modest_fl")
    rows = [
        "protocol,label,partition,seed,reading,target,reached,round,virtual_time_s,bytes_total,"
        "bytes_per_peer_max,final_acc,wall_s"
    ]
    for seed in (1, 2):
        rows += [
            f"dpsgd,D-PSGD,iid,{seed},all peers,0.8,True,{18 + seed},0.7,{28_000_000 + seed},700000,0.81,0.9",
            f"dpsgd,D-PSGD,iid,{seed},freshest model,0.8,True,{18 + seed},0.7,{28_000_000 + seed},700000,0.81,0.9",
            f"fedavg,FedAvg,iid,{seed},all peers,0.8,True,24,1.3,4800000,2450000,0.84,0.9",
            f"fedavg,FedAvg,iid,{seed},freshest model,0.8,True,18,0.9,3600000,1860000,0.89,0.9",
            f"modest-a1,MoDeST,iid,{seed},all peers,0.8,{seed == 1},60,3.0,9800000,560000,0.79,0.9",
            f"modest-a1,MoDeST,iid,{seed},freshest model,0.8,False,60,3.0,9800000,560000,0.7,0.9",
        ]
    csv_path = _write(tmp_path / "modest_fl_runs.csv", "\n".join(rows))
    before = csv_path.read_bytes()
    assert modest_fl.main(["--plot", str(csv_path)]) == 0
    _drawn(csv_path, before)
    # --plot needs neither torch nor the simulator: a fresh interpreter draws without loading them
    code = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS / 'papers')!r}); import modest_fl; "
        f"status = modest_fl.main(['--plot', {str(csv_path)!r}]); "
        "loaded = sorted({'torch', 'sim', 'p2pfl', 'modest'} & set(sys.modules)); "
        "sys.exit(status or (f'loaded {loaded}' if loaded else 0))"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert fresh.returncode == 0, fresh.stderr
    summary = _write(
        tmp_path / "wrong.csv",
        "partition,protocol,label,reading,reached\niid,dpsgd,D,all peers,3/3",
    )
    _refused(modest_fl.main(["--plot", str(summary)]), capsys, tmp_path)


def test_bristle_plot_from_sweep_results_csv(tmp_path, capsys):
    bristle = _load(BENCHMARKS / "papers" / "bristle.py", "bristle")
    header = (
        "attack,defence,fraction,malicious_share,seed,honest_acc_mean,honest_acc_min,attack_success_rate,"
        "attack_success_max,malicious_peers,honest_peers,rounds,status,cell"
    )
    rows = [header]
    for seed in (1, 2):
        rows += [
            f"label flip,Bristle,0.25,0.25,{seed},0.6{seed},0.4{seed},0.02,0.05,5,15,30,ok,lf__bristle__s{seed}",
            f"label flip,median,0.25,0.25,{seed},0.3{seed},0.2{seed},0.09,0.15,5,15,30,ok,lf__median__s{seed}",
        ]
    rows.append("label flip,Krum,0.25,0.25,1,,,,,5,15,30,failed,lf__krum__s1")
    byzantine = _write(tmp_path / "byz.csv", "\n".join(rows))
    clean = _write(
        tmp_path / "none.csv",
        f"""
{header}
none,Bristle,,0,1,0.85,0.61,,,0,20,30,ok,none__bristle__s1
none,median,,0,1,0.70,0.50,,,0,20,30,ok,none__median__s1
""",
    )
    for csv_path in (byzantine, clean):  # with attack success (two panels), and without
        before = csv_path.read_bytes()
        assert bristle.main([str(csv_path)]) == 0
        _drawn(csv_path, before)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copyfile(clean, sweep / "results.csv")
    copied = tmp_path / "copied" / "bristle_none.csv"
    assert bristle.main(["--sweep", str(sweep), str(copied)]) == 0
    assert copied.read_bytes() == clean.read_bytes() and copied.with_suffix(".png").is_file()
    wrong = _write(tmp_path / "wrong.csv", "attack,defence\nnone,mean")
    _refused(bristle.main([str(wrong)]), capsys, tmp_path)
    _refused(
        bristle.main(["--sweep", str(tmp_path / "wrong-absent"), str(wrong)]), capsys, tmp_path
    )
