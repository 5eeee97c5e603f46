"""The ``p2pfl`` command line: ``sim``, ``sweep``, ``node``, ``relay``, ``topo``, ``data``, ``report``.

Errors a user can fix (a bad scenario, a missing dataset) are printed as one line and
exit with status 2; a traceback means a bug. A node that stopped on an error of its own
(an exception in a protocol timer, its training or an effect) exits with status 1.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from p2pfl import gcstartup

app = typer.Typer(
    help="Fully decentralized peer-to-peer learning: simulator, real node, tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: fetch them into the data directory.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


#: local worker processes at most: each loads torch and a dataset (~0.3-0.5 GB), so more is
#: a typo (``--jobs 1000`` started a thousand of them); a cluster is ``--ray``'s job
MAX_JOBS = 256


def _fail(message: str) -> None:
    from rich.markup import escape  # a message may quote "[ray]" or a TOML table name

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)  # one line, exit status 2: bad input


def _about(path: Path, error: Exception) -> str:
    """``error`` as one line that names ``path`` once: the messages of a file that could not
    be read name it already ("x.toml: no such scenario file"), a key's do not."""
    message = str(error)
    return message if message.startswith(f"{path}:") else f"{path}: {message}"


def setup_logging(verbose: bool) -> None:
    # force=True: libp2p installs a root handler through module-level logging calls.
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


@app.command()
def sim(
    scenario: Annotated[Path, typer.Argument(help="scenario TOML file (see examples/)")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="override a key: --set protocol.local_steps=2"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run folder, new or empty (default: a new runs/<name>-...)")
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(help="run once per seed (1,2,3 or 1-5): a group folder, tables across seeds"),
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, max=MAX_JOBS, help="with --seeds: seeds at once, in local processes")
    ] = 1,
    ray: Annotated[
        str | None,
        typer.Option(
            help="with --seeds: run seeds as Ray tasks: local (a private instance of --jobs CPUs), "
            "auto or an address; each task writes its seed folder where it runs, so use one machine "
            "(or shared storage); needs the ray extra"
        ),
    ] = None,
    tensorboard: Annotated[
        bool, typer.Option(help="also write TensorBoard event files (needs the optional tensorboard package, extra 'tracking')")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log every evaluation")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue the killed or interrupted run in --out from its last checkpoint "
            "(same scenario and --set; see sim.checkpoint_every)"
        ),
    ] = False,
) -> None:
    """Run a simulation scenario and write its run folder (metrics.csv, summary.json, plots).

    Rows reach metrics.csv as they are measured; Ctrl-C writes the folder with the rows so
    far, marked "interrupted" in summary.json, and exits with status 130. A run writes a
    checkpoint every sim.checkpoint_every seconds; --resume continues it from there.
    """
    setup_logging(verbose)
    from p2pfl.config import ConfigError
    from p2pfl.learning import DatasetUnavailable
    from sim.rundir import Provenance, RunFolderError, prepare_out_dir
    from sim.runner import build_simulation, default_run_dir, record_run
    from sim.scenario import load_scenario

    provenance = Provenance(str(scenario), tuple(set_ or []))
    progress = not quiet and sys.stderr.isatty()
    from sim.tracking import TrackingUnavailable, require_tensorboard

    gcstartup.imported()
    try:
        if tensorboard:
            require_tensorboard()
        config = load_scenario(scenario, set_ or [])
        if resume and seeds is not None:
            _fail("--resume continues one run; it does not apply to --seeds")
        if seeds is not None:
            _sim_seeds(config, seeds, out, provenance, progress, tensorboard, jobs, ray)
            return
        if jobs > 1 or ray is not None:
            _fail("--jobs and --ray run the seeds of --seeds in parallel; add --seeds 1,2,3")
        if resume:
            _sim_resume(config, out, provenance, progress, tensorboard)
            return
        simulation = build_simulation(config)
        run_dir = prepare_out_dir(out) if out is not None else default_run_dir(config, provenance)
    except RunFolderError as error:  # names the folder, not the scenario
        _fail(str(error))
        return
    except (ConfigError, DatasetUnavailable, TrackingUnavailable) as error:
        _fail(_about(scenario, error))
        return
    except KeyboardInterrupt:  # before the first round (or in --seeds, which kept its folder)
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    gcstartup.started()
    try:
        record_run(
            simulation, run_dir, provenance=provenance, show_progress=progress, tensorboard=tensorboard
        )
    except KeyboardInterrupt:
        if _status_of(run_dir) == "completed":  # Ctrl-C came while the plots were drawn
            print(f"interrupted while drawing the plots: the run completed, its {len(simulation.rows)} rows "
                  f"are in {run_dir}/metrics.csv", file=sys.stderr)
        else:
            print(f"interrupted: {len(simulation.rows)} rows so far in {run_dir}", file=sys.stderr)
        raise typer.Exit(130) from None
    from rich.table import Table

    last = simulation.rows[-1]
    table = Table(title=f"{config.name}: {config.protocol.name}, {simulation.engine.n} peers")
    for column in ("round", "mean acc", "min acc", "max acc", "MB sent", "virtual s", "wall s"):
        table.add_column(column, justify="right")
    for row in simulation.rows:
        table.add_row(
            str(row["round"]),
            f"{row['acc_mean']:.4f}",
            f"{row['acc_min']:.4f}",
            f"{row['acc_max']:.4f}",
            f"{row['bytes_total'] / 1e6:.1f}",
            f"{row['virtual_time']:.2f}",
            f"{row['wall_time']:.1f}",
        )
    Console().print(table)
    print(
        f"final mean accuracy {last['acc_mean']:.4f} after {last['round']} rounds; results in {run_dir}"
    )
    if "malicious_peers" in last:  # an [attack] ran: accuracy is over honest peers only
        success = last.get("attack_success_rate")
        print(
            f"accuracy over honest peers only ({last['malicious_peers']} malicious left out)"
            + ("" if success is None else f"; attack success rate {success:.4f}")
        )


def _sim_resume(config: Any, out: Path | None, provenance: Any, progress: bool, tensorboard: bool) -> None:
    """``p2pfl sim --resume``: the run in ``out`` continued from its checkpoint."""
    from sim.checkpoint import CheckpointError
    from sim.runner import resume_run

    if out is None:
        _fail("--resume needs --out: the folder of the run to continue")
        return
    if tensorboard:
        _fail("--resume does not continue TensorBoard event files; leave out --tensorboard")
    gcstartup.started()
    try:
        simulation = resume_run(config, out, provenance=provenance, show_progress=progress)
    except CheckpointError as error:
        _fail(str(error))
        return
    except KeyboardInterrupt:
        print(f"interrupted: rows so far in {out}; --resume continues from the last checkpoint", file=sys.stderr)
        raise typer.Exit(130) from None
    last = simulation.rows[-1]
    print(f"final mean accuracy {last['acc_mean']:.4f} after {last['round']} rounds; results in {out}")


def _status_of(run_dir: Path) -> object:
    """``status`` of a run folder's summary.json (None when it cannot be read)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _sim_seeds(
    config: Any, seeds: str, out: Path | None, provenance: Any, progress: bool, tensorboard: bool,
    jobs: int = 1, ray: str | None = None,
) -> None:
    """``p2pfl sim --seeds``: one run folder per seed in a group folder, then the tables.
    Seeds run through ``sim.cells`` (serially, ``--jobs`` processes or Ray): a seed that
    fails is one line on stderr, the others complete, and the exit status is then 1."""
    from sim.cells import CellsError
    from sim.rundir import prepare_out_dir
    from sim.seeds import SeedFailure, cells_executor, group_dir_for, parse_seeds, run_seed_group

    def failed(failure: SeedFailure) -> None:
        print(f"error: seed {failure.seed} failed: {failure.error}", file=sys.stderr)

    try:
        chosen = parse_seeds(seeds)
        executor = cells_executor(jobs, ray, on_failed=failed)  # Ray checked: before the folder
    except (ValueError, CellsError) as error:
        _fail(str(error))
        return
    group_dir = prepare_out_dir(out) if out is not None else group_dir_for(config, chosen, provenance)
    gcstartup.started()
    try:
        result = run_seed_group(
            config, chosen, group_dir, provenance=provenance,
            show_progress=progress and jobs == 1 and ray is None,  # one bar, not one per worker
            tensorboard=tensorboard, executor=executor,
        )
    except CellsError as error:
        _fail(str(error))
        return
    except KeyboardInterrupt:
        print(f"interrupted: the seeds so far are in {group_dir} (seeds.md)", file=sys.stderr)
        raise typer.Exit(130) from None
    print((group_dir / "seeds.md").read_text())
    print(f"{len(result.runs)} seeds; results in {group_dir} (seeds.csv, seeds.md, seeds.png)")
    if result.failed:
        seeds_failed = ", ".join(str(f.seed) for f in result.failed)
        print(f"error: seed(s) {seeds_failed} failed (traceback in {group_dir}/seed-<n>/error.txt)", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="sweep TOML file (see examples/resilience/)")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="override a key of the base scenario: --set rounds=5"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="sweep folder (default: runs/<name>-...)")] = None,
    resume: Annotated[bool, typer.Option(help="reuse the finished cells found in --out")] = False,
    seeds: Annotated[
        str | None,
        typer.Option(help="every cell once per seed (1,2,3 or 1-5); tables give mean±std"),
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, max=MAX_JOBS, help="cells at once, in local processes")
    ] = 1,
    ray: Annotated[
        str | None,
        typer.Option(
            help="run cells as Ray tasks: auto (the running cluster), an address, or local "
            "(a private instance of --jobs CPUs); needs the ray extra"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Run attacks x defences x fractions (x seeds) of a base scenario; write results.csv and heatmaps.

    A cell that fails is reported (status.csv, errors/) and the others go on; the exit
    status is then 1. Ctrl-C keeps the finished cells: run again with --resume.
    """
    setup_logging(False)
    from p2pfl.config import ConfigError
    from p2pfl.learning import DatasetUnavailable
    from sim.cells import CellsError
    from sim.rundir import RunFolderError
    from sim.sweep import load_sweep, parse_seed_list, results_table, run_sweep

    gcstartup.imported()
    try:
        config, base = load_sweep(sweep_file, set_ or [])
        if seeds is not None:
            config = config.model_copy(update={"seeds": parse_seed_list(seeds)})
        gcstartup.started()
        folder, rows = run_sweep(
            config,
            base,
            out_dir=out,
            resume=resume,
            jobs=jobs,
            ray=ray,
            show_progress=not quiet,
            console=console,
        )
    except RunFolderError as error:  # names the folder, not the sweep file
        _fail(str(error))
        return
    except (ConfigError, DatasetUnavailable, CellsError) as error:
        _fail(_about(sweep_file, error))
        return
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; run again with --resume", file=sys.stderr)
        raise typer.Exit(130) from None
    Console().print(results_table(rows, config.name))
    failed = [row["cell"] for row in rows if row["status"] == "failed"]
    print(f"{len(rows)} cells; results in {folder}/results.csv")
    if failed:
        print(
            f"error: {len(failed)} cell(s) failed: {', '.join(failed)} "
            f"(errors in {folder}/errors/; --resume runs them again)",
            file=sys.stderr,
        )
        raise typer.Exit(1)


@app.command()
def topo(
    kind: Annotated[
        str, typer.Argument(help="graph kind: ring, torus, regular, barabasi_albert, ...")
    ],
    n: Annotated[int, typer.Option("--n", "-n", help="number of peers")] = 16,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="generator parameter key=value, e.g. -p m=2"),
    ] = None,
    seed: int = 0,
    png: Annotated[Path | None, typer.Option(help="draw the graph to this PNG")] = None,
    disrupt: Annotated[
        str | None,
        typer.Option(
            help="a disruption, kind:key=value,...: e.g. region_outage:center=0.5,0.5,radius=0.25 "
            "or crash:count=5,strategy=degree; --png then draws the graph before it"
        ),
    ] = None,
    after: Annotated[
        Path | None, typer.Option(help="with --disrupt: draw the graph after it to this PNG")
    ] = None,
) -> None:
    """Print a graph's statistics (degree, components, spectral gap) and optionally draw it."""
    from p2pfl.config import ConfigError, parse_override
    from sim.rundir import RunFolderError, ensure_folder
    from sim.scenario import MAX_PEERS
    from topologies import build_graph, draw_graph, graph_stats
    from topologies.errors import TopologyError

    if n > MAX_PEERS:  # building it would take minutes and gigabytes before any error
        _fail(f"--n: at most {MAX_PEERS} peers, got {n}")
    if after is not None and disrupt is None:  # it would be silently left undrawn
        _fail("--after draws the graph after --disrupt; add --disrupt kind:key=value,...")
    params = {}
    try:
        for item in param or []:
            path, value = parse_override(item)
            params[".".join(path)] = value
        for drawing in (png, after):
            if drawing is not None:  # a folder that cannot be made: said before the work
                ensure_folder(drawing.parent)
        graph = build_graph(kind, n, seed=seed, **params)
    except ConfigError as error:
        _fail(f"--param: {error}".replace("--set ", ""))
        return
    except (TopologyError, RunFolderError) as error:
        _fail(str(error))
        return
    from rich.table import Table

    stats = graph_stats(graph)
    table = Table(title=f"{kind} graph, n={graph.number_of_nodes()}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if disrupt is not None:
        from sim.disruptions import DisruptionError, preview_disruption

        try:
            print(preview_disruption(graph, disrupt, seed=seed, before=png, after=after))
        except DisruptionError as error:
            _fail(str(error))
        for drawing in (png, after):
            if drawing is not None:
                print(f"drawn to {drawing}")
    elif png is not None:
        draw_graph(graph, png, title=f"{kind} (n={graph.number_of_nodes()})")
        print(f"drawn to {png}")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="mnist or fashion_mnist")],
    data_dir: Annotated[
        Path | None, typer.Option(help="default: $P2PFL_DATA_DIR or ~/.cache/p2pfl/data")
    ] = None,
) -> None:
    """Put a dataset's standard files into the data directory, checksum-verified."""
    setup_logging(True)
    from p2pfl.learning import default_data_dir, fetch_dataset
    from sim.rundir import RunFolderError, ensure_folder

    try:  # a folder that cannot hold the files: said before anything is downloaded
        ensure_folder(Path(data_dir or default_data_dir()))
    except RunFolderError as error:
        _fail(f"--data-dir: {error}")
    try:
        path = fetch_dataset(name, data_dir or default_data_dir())
    except (ValueError, RuntimeError, OSError) as error:
        _fail(str(error))
        return
    print(f"{name} ready in {path}")


@app.command()
def node(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="node TOML file")] = None,
    listen: Annotated[
        list[str] | None, typer.Option(help="multiaddr to listen on (repeatable)")
    ] = None,
    bootstrap: Annotated[
        list[str] | None, typer.Option(help="multiaddr of a peer to dial first (repeatable)")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="Ed25519 identity key (created if missing)")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="checkpoints and status.json")] = None,
    peer_index: Annotated[
        int | None, typer.Option(help="which data share this node trains on")
    ] = None,
    num_peers: Annotated[int | None, typer.Option(help="number of data shares")] = None,
    attack: Annotated[
        str | None,
        typer.Option(
            help="run as an attacker (test networks only): an attack name, e.g. sign_flip; "
            "its parameters with --set attack.params.scale=5"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override a key: --set rounds=20")
    ] = None,
    tensorboard: Annotated[
        bool,
        typer.Option(
            help="also write each round's measurements as TensorBoard event files into "
            "<state_dir>/tensorboard (needs the optional tensorboard package, extra 'tracking')"
        ),
    ] = False,
    run: Annotated[
        str | None,
        typer.Option(
            help="the run's name: find its other peers in the DHT (network.run, network.dht)"
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose/--quiet", "-v/-q", help="a status line per round")
    ] = True,
) -> None:
    """Run a real peer: discover peers, train, exchange models over libp2p, checkpoint every round."""
    setup_logging(verbose)
    from p2pfl.config import ConfigError
    from p2pfl.jsonsafe import dumps
    from p2pfl.learning import DatasetUnavailable
    from p2pfl.nodecli import StopRequested, load_node_config, run_node
    from p2pfl.transport.base import TransportError

    flags = {
        "network.listen": listen,
        "network.bootstrap": bootstrap,
        "key_file": str(key_file) if key_file else None,
        "state_dir": str(state_dir) if state_dir else None,
        "peer_index": peer_index,
        "num_peers": num_peers,
        "attack.name": attack,
        "tensorboard": True if tensorboard else None,  # unset: the TOML file's value
        "network.run": run,
        "network.dht": True if run else None,
    }
    try:
        node_config = load_node_config(
            config, set_ or [], {k: v for k, v in flags.items() if v is not None}
        )
        status = run_node(node_config)
    except (ConfigError, DatasetUnavailable) as error:  # incl. a bad topology file
        _fail(str(error))
        return
    except TransportError as error:  # the listen port was taken after the check
        _fail(f"network.listen: {error}")
        return
    except StopRequested as stop:  # before the node ran: nothing to save
        print(f"stopped by {stop} before the node started", file=sys.stderr)
        _NODE_DONE.append(True)
        return
    _NODE_DONE.append(True)
    print(dumps({k: status[k] for k in ("peer_id", "round", "rounds_done", "accuracy")}))
    if status.get("failure"):  # stopped on an error (logged), or found too few peers
        print(f"error: node failed: {status['failure']}", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="a run folder written by `p2pfl sim`, or a seed group (--seeds)")
    ],
) -> None:
    """Print a run folder's summary (a seed group's table across seeds)."""
    seeds_table = run_dir / "seeds.md"
    if (run_dir / "group.json").is_file() and not seeds_table.exists():
        # a seed group killed before its tables were written: write them now from the
        # seed folders on disk (the rows so far), so that nothing measured is lost
        from sim.rundata import RunDataError
        from sim.seeds import write_seed_report

        try:
            write_seed_report(run_dir)
        except (RunDataError, OSError) as error:
            _fail(f"{run_dir}: a seed group whose tables cannot be written ({error})")
        print(f"{run_dir}: the group stopped before its tables; written now from its seed folders", file=sys.stderr)
    if seeds_table.exists():
        print(seeds_table.read_text())
        return
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        _fail(f"{run_dir}: no summary.json (is this a run folder?)")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:  # cut short, or not ours
        _fail(f"{summary_path}: not a readable summary ({error})")
        return
    if isinstance(summary, dict) and summary.get("status") == "running":
        _plot_stopped_run(run_dir, summary)
    from p2pfl.jsonsafe import dumps  # an old summary's NaN printed as null

    print(dumps(summary, indent=2))


def _plot_stopped_run(run_dir: Path, summary: dict[str, Any]) -> None:
    """A run still marked ``running``: killed (SIGKILL, a lost machine) before it wrote its
    plots, or still going. Its rows are in ``metrics.csv`` (written as measured): draw the
    plots from them, so that the CSV has its PNGs beside it (disruption marks excepted: they
    live only in the finished run)."""
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file() or (run_dir / "accuracy_vs_rounds.png").exists():
        return
    from sim.plots import plot_run
    from sim.rundata import read_metrics

    try:
        rows = read_metrics(metrics)
        drawn = plot_run(rows, run_dir, title=str(summary.get("name") or run_dir.name))
    except (OSError, ValueError, KeyError, TypeError) as error:  # a CSV cut mid-line, not ours
        print(f"{run_dir}: marked running; its metrics.csv cannot be plotted ({error!r})", file=sys.stderr)
        return
    if drawn:
        print(f"{run_dir}: marked running (killed, or still going): plots of its {len(rows)} rows "
              "drawn now from metrics.csv", file=sys.stderr)


@app.command()
def compare(
    folders: Annotated[
        list[Path], typer.Argument(help="run folders, seed groups (--seeds) or sweep folders")
    ],
    target: Annotated[
        float | None,
        typer.Option(help="target mean accuracy: rounds, bytes and virtual time to reach it"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: a new runs/compare-<time>)")
    ] = None,
) -> None:
    """Overlay runs in one figure and one table: compare.png, compare.csv, compare.md."""
    from sim.compare import compare_runs
    from sim.rundata import RunDataError, read_entries
    from sim.rundir import RunFolderError, claim_run_dir, ensure_folder

    if target is not None and not 0 < target <= 1:
        _fail(f"--target: expected an accuracy in (0, 1], got {target:g}")
    try:
        read_entries(folders)  # every folder checked before anything is written
        if out is not None:
            ensure_folder(out)  # a file in the way: one line naming it, not "[Errno 17]"
        folder = out if out is not None else claim_run_dir("runs", "compare", tag="")
        _, written = compare_runs(folders, folder, target=target)
    except (RunDataError, RunFolderError, OSError) as error:
        _fail(str(error))
        return
    print((folder / "compare.md").read_text())
    print("written: " + ", ".join(str(path) for path in written))


@app.command()
def relay(
    listen: Annotated[
        list[str] | None,
        typer.Option(help="multiaddr to listen on (repeatable; default /ip4/0.0.0.0/tcp/4001)"),
    ] = None,
    key_file: Annotated[
        Path, typer.Option(help="Ed25519 identity key (created if missing): a stable address")
    ] = Path("relay.key"),
    max_reservations: Annotated[int, typer.Option(min=1, help="peers behind NAT it holds a slot for")] = 64,
    max_circuits: Annotated[int, typer.Option(min=1, help="relayed connections at once")] = 64,
    circuit_bytes: Annotated[
        int, typer.Option(min=1 << 20, help="bytes one relayed connection may carry")
    ] = 256 << 20,
    circuit_seconds: Annotated[
        int, typer.Option(min=10, help="seconds one relayed connection may last")
    ] = 3600,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", "-v/-q")] = True,
) -> None:
    """Run a relay on a public box for nodes behind home routers; prints its addresses.

    It is their bootstrap peer, a DHT node and a circuit relay; it trains nothing.
    """
    setup_logging(verbose)
    from p2pfl.config import ConfigError
    from p2pfl.nodecli import run_relay
    from p2pfl.transport.base import TransportError

    def ready(addrs: list[str]) -> None:
        print("relay listening; give nodes one of these as network.bootstrap:", file=sys.stderr)
        for addr in addrs:
            print(addr, flush=True)

    try:
        run_relay(
            listen or ["/ip4/0.0.0.0/tcp/4001"],
            key_file,
            limits={
                "max_reservations": max_reservations,
                "max_circuits": max_circuits,
                "circuit_bytes": circuit_bytes,
                "circuit_seconds": circuit_seconds,
            },
            ready=ready,
        )
    except ConfigError as error:
        _fail(str(error))
    except TransportError as error:
        _fail(f"--listen: {error}")


#: set by ``node`` once its node has stopped: the process may end without finalization
_NODE_DONE: list[bool] = []


def main() -> None:  # pragma: no cover - console entry point
    gcstartup.starting()  # no full garbage collection while torch & co. are imported
    code = _run_app()
    code = code if isinstance(code, int) else (0 if code is None else 1)
    if _NODE_DONE:  # everything is on disk and printed: skip the interpreter's
        _exit_now(code)  # teardown of torch and libp2p (0.5-2 s), so that a
    sys.exit(code)  # signalled node is gone within a second or two


def _run_app() -> object:  # pragma: no cover - console entry point
    """The app, its exit status returned; a mistake on the command line (an unknown
    option, a missing argument, ``--jobs 0``) is one line and status 2, as every other
    bad input, instead of click's boxed usage panel."""
    import importlib

    import typer.core
    from rich.markup import escape

    # click's exceptions, wherever this typer takes them from (recent ones vendor click)
    vendored = getattr(typer.core, "_click", None)
    click = (vendored or importlib.import_module("click")).exceptions
    no_args = getattr(click, "NoArgsIsHelpError", ())  # click >= 8.2
    abort = getattr(click, "Abort", typer.Abort)
    try:
        return app(standalone_mode=False)
    except no_args as error:  # `p2pfl` alone: its help
        error.show()
        return error.exit_code
    except click.UsageError as error:
        hint = f"; see: {error.ctx.command_path} --help" if error.ctx is not None else ""
        console.print(
            f"[bold red]error:[/] {escape(error.format_message().rstrip('.'))}{escape(hint)}",
            highlight=False, soft_wrap=True,
        )
        return 2
    except click.ClickException as error:
        console.print(f"[bold red]error:[/] {escape(error.format_message())}", highlight=False, soft_wrap=True)
        return error.exit_code
    except abort:  # Ctrl-C at a prompt
        print("interrupted", file=sys.stderr)
        return 130


def _exit_now(code: object) -> None:  # pragma: no cover - ends the process
    import os

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":  # pragma: no cover
    main()
