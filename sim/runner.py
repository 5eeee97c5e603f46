"""From a scenario to a results folder: build the peers, run the engine, write it all out.

``build_simulation`` wires a ``Scenario`` into an ``Engine``: its peers are assembled by
``p2pfl.peer``, as a node assembles itself (dataset and trainer shared once, each peer a
data share, a sampler and a protocol object); ``run_simulation`` runs it with a progress
bar, measuring at every ``sim.eval_every`` rounds; ``write_run`` produces the run folder:
the resolved config, ``metrics.csv``, ``summary.json`` and PNG plots.

``record_run`` is the way that never loses a run: it writes the config and a "running"
summary before the first round, appends each row to ``metrics.csv`` as it is measured,
writes a checkpoint of the whole run every ``sim.checkpoint_every`` seconds
(``sim.checkpoint``), and on Ctrl-C writes the folder with what exists, marked
``"status": "interrupted"``, before letting the interrupt go on. ``resume_run`` continues
a killed run from its checkpoint to the results of the run never stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from p2pfl.jsonsafe import dumps as safe_json
from p2pfl.learning import BatchSampler, Dataset, LocalTrainer, load_dataset
from p2pfl.learning.sampler import derive_seed  # noqa: F401 - kept importable from here
from p2pfl.peer import build_commons, use_torch_threads
from p2pfl.protocols.base import Protocol
from p2pfl.protocols.records import Keyring
from p2pfl.protocols.registry import mixing_scheme, protocol_class
from sim.adversary import Adversary, plan_adversary
from sim.checkpoint import (
    CHECKPOINT_FILE,
    Checkpointer,
    CheckpointError,
    RunProgress,
    code_fingerprint,
    read_checkpoint,
)
from sim.conditions import apply_conditions
from sim.device import simulation_device, trainer_scope_error
from sim.disruptions import DisruptionRuntime, install_disruptions
from sim.engine import Engine
from sim.metrics import Evaluator, RowRecorder, write_csv
from sim.mixing import deferred_aggregate
from sim.naming import name_peers
from sim.network import Network
from sim.rundir import Provenance, claim_run_dir
from sim.scenario import Scenario, ScenarioError
from sim.training import TrainingExecutor
from topologies import build_graph, metropolis_hastings, require_connected, uniform
from topologies.errors import TopologyError

log = logging.getLogger("p2pfl.sim")


@dataclass
class Simulation:
    scenario: Scenario
    engine: Engine
    evaluator: Evaluator
    dataset: Dataset
    trainer: LocalTrainer
    peer_ids: list[str]
    graph: Any
    relays: np.ndarray
    data_sizes: np.ndarray
    rows: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    wall_time: float = 0.0
    disruptions: DisruptionRuntime | None = None
    adversary: Adversary | None = None
    #: the peers' keys when they sign relayed data (or are named by key); ``None`` otherwise
    keyring: Keyring | None = None


def build_simulation(
    scenario: Scenario, *, dataset: Dataset | None = None, device_path: bool = False
) -> Simulation:
    """The engine, peers and evaluator of ``scenario``, every peer started.

    ``device_path`` runs the device path's torch code even for ``sim.device = "cpu"``
    (see ``sim.device.simulation_device``): tests and benchmarks compare it with the
    default numpy/scipy path on a machine without a GPU.
    """
    seed = scenario.seed
    use_torch_threads(scenario.sim.threads)
    device = simulation_device(scenario, force=device_path)  # None: the default CPU path
    topo = scenario.topology
    declared = protocol_class(scenario.protocol)  # what the protocol declares to drivers
    try:
        graph = build_graph(topo.kind, topo.n, seed=seed, **topo.params)
        if declared.needs_connected_graph or scenario.network.mode == "graph":
            require_connected(graph, purpose=f"{scenario.protocol.name} over topology.kind={topo.kind!r}")
    except TopologyError as error:
        raise ScenarioError(f"topology: {error}") from None
    graph, adversary = plan_adversary(scenario, graph)  # Byzantine peers, Sybil identities
    n = graph.number_of_nodes()
    peer_ids, keyring = name_peers(
        n, seed, names=scenario.sim.peer_names, signed=scenario.sim.sign_relayed
    )

    if dataset is None:
        dataset = load_dataset(scenario.data.dataset, data_dir=scenario.data.data_dir, seed=seed)
    rng = np.random.default_rng([seed, 0xDA7A])
    n_relays = int(round(scenario.data.relay_fraction * n))
    relays = np.sort(rng.choice(n, n_relays, replace=False)) if n_relays else np.zeros(0, int)
    holders = np.setdiff1d(np.setdiff1d(np.arange(n), relays), adversary.sybils)
    # the peers' shared parts (one dataset, one trainer, the start model, Bristle's
    # extractor) and each peer's own, assembled as a node assembles itself (p2pfl.peer)
    commons = build_commons(
        scenario.data,
        scenario.model,
        scenario.protocol,
        seed=seed,
        shares=len(holders),
        dataset=dataset,
    )
    trainer = commons.trainer
    if device is not None:
        refusal = trainer_scope_error(trainer, scenario)
        if refusal is not None:
            raise ScenarioError(refusal)
        # every peer starts from the start vector on the device: a protocol that combines
        # its own model with a received one before either was trained (gossip's merge)
        # then never puts a CPU and a device tensor into one operation
        commons = replace(commons, start=commons.start.to(device))
    share_of = {int(holder): k for k, holder in enumerate(holders)}
    setups = [commons.peer(i, share_of.get(i)) for i in range(n)]
    samplers: list[BatchSampler | None] = [setup.sampler for setup in setups]
    data_sizes = np.array([setup.data_size for setup in setups], dtype=np.int64)

    mixing = None
    scheme = mixing_scheme(scenario.protocol)
    if scheme is not None:
        matrix = metropolis_hastings(graph) if scheme == "metropolis_hastings" else uniform(graph)
        mixing = matrix.tocsr()
    if graph.number_of_nodes():
        peer, degree = min(graph.degree, key=lambda item: (item[1], item[0]))
        refusal = commons.never_aggregates(degree, f"peer {peer} has {degree} neighbours")
        if refusal is not None:
            raise ScenarioError(refusal)
    executor = TrainingExecutor(trainer, samplers, backend=scenario.sim.backend, device=device)
    # The batched backend defers the protocols' plain means (one sparse product per chunk).
    aggregate = deferred_aggregate(executor.mixer, commons.aggregate)
    protocols: list[Protocol] = []
    for i in range(n):
        neighbours = [peer_ids[j] for j in sorted(graph.neighbors(i))]
        weights = None
        if mixing is not None:
            row = mixing.getrow(i)
            weights = {peer_ids[j]: float(w) for j, w in zip(row.indices, row.data, strict=True) if j != i}
        protocols.append(
            commons.build_protocol(
                setups[i],
                peer_id=peer_ids[i],
                neighbours=neighbours,
                population=peer_ids,
                mixing_weights=weights,
                aggregate=aggregate,
                signer=keyring.signer(peer_ids[i]) if keyring is not None else None,
                # the batched backend trains into its arena, never into a protocol's model
                share_start=scenario.sim.backend == "batched",
            )
        )

    net = scenario.network
    network = Network(
        graph,
        latency=net.latency,
        bandwidth=net.bandwidth,
        loss=net.loss,
        latency_jitter=net.latency_jitter,
        mode=net.mode,
        seed=seed,
    )
    if net.regions or net.links:
        try:
            apply_conditions(network, graph, net.regions, net.links, seed)
        except ValueError as error:
            raise ScenarioError(str(error)) from None
    speeds = np.ones(n)
    if net.speed_spread > 0:
        speeds = rng.uniform(1 - net.speed_spread, 1 + net.speed_spread, size=n)
    engine = Engine(
        protocols,
        network,
        executor,
        step_time=net.step_time,
        speeds=speeds,
        rounds=scenario.rounds,
        progress=declared.progress,
    )
    evaluator = Evaluator(
        trainer,
        dataset.x_test,
        dataset.y_test,
        n_peers=n,
        eval_peers=scenario.sim.eval_peers,
        test_samples=scenario.sim.eval_test_samples,
        seed=seed,
        device=device,
    )
    simulation = Simulation(scenario, engine, evaluator, dataset, trainer, peer_ids, graph, relays, data_sizes)
    simulation.keyring = keyring
    simulation.adversary = adversary.install(simulation)  # None when there is no attack
    simulation.disruptions = install_disruptions(simulation)  # None when there are none
    for index, spec in enumerate(scenario.disruptions):
        if spec.at_round is not None and spec.at_round >= scenario.rounds:
            # not an error (a shortened run, --set rounds=3, keeps its scenario's disruptions),
            # but a study that silently lacks its disaster would look like one without it
            log.warning(
                "disruptions[%d] (%s) at_round = %d never fires: the run has %d rounds",
                index, spec.kind, spec.at_round, scenario.rounds,
            )
    late = simulation.disruptions.late_joiners if simulation.disruptions else set()
    if late:  # protocols that learn their population (MoDeST) must not know them yet
        absent = [peer_ids[i] for i in sorted(late)]
        for protocol in engine.protocols:
            protocol.withhold(absent)
    for i in range(n):
        if i not in late:
            engine.start_peer(i, 0.0)
    return simulation


def run_simulation(
    simulation: Simulation,
    *,
    show_progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    state: RunProgress | None = None,
    on_checkpoint: Callable[[Simulation, int, RunProgress], None] | None = None,
) -> list[dict[str, Any]]:
    """Run to ``scenario.rounds``, measuring every ``eval_every`` rounds (and at 0 and the end).

    ``state`` continues a run read back from its checkpoint (``sim.checkpoint``);
    ``on_checkpoint(simulation, round, state)`` is offered each advance of the system's
    progress, after that round's row, with the engine between two events: what it writes
    then is the whole run (the listeners added here are left out of it, and made again
    by the run that resumes).
    """
    scenario = simulation.scenario
    engine = simulation.engine
    every = scenario.sim.eval_every
    state = state if state is not None else RunProgress()
    started = time.perf_counter() - state.elapsed
    listeners: list[Callable[[dict[str, Any]], None]] = [on_row] if on_row else []
    measured = state.measured
    own_from = len(engine._round_listeners)  # listeners of the build (disruptions...) come first

    def measure(round_: int) -> None:
        measured.add(round_)
        row = simulation.evaluator.measure(engine, round_)
        if simulation.disruptions is not None:
            row.update(simulation.disruptions.measure())
        if simulation.adversary is not None:
            row.update(simulation.adversary.measure())
        simulation.rows.append(row)
        for listener in listeners:
            listener(row)
        log.info(
            "round %d  acc %.3f (min %.3f max %.3f)  consensus %.3g  %.1f MB sent  t=%.1fs",
            round_, row["acc_mean"], row["acc_min"], row["acc_max"], row["consensus_distance"],
            row["bytes_total"] / 1e6, row["virtual_time"],
        )

    def on_progress(round_: int) -> None:
        # Progress can jump several rounds at once (lagging peers catching up after a
        # heal): measure at the first progress at or past each due round.
        round_ = min(round_, scenario.rounds)
        due = (round_ // every) * every
        if round_ not in measured and (due > state.last_due or round_ == scenario.rounds):
            state.last_due = due
            measure(round_)

    def checkpoint(round_: int) -> None:
        if on_checkpoint is None or round_ >= scenario.rounds:
            return
        state.elapsed = time.perf_counter() - started
        state.evaluator_elapsed = time.perf_counter() - simulation.evaluator.started
        own = engine._round_listeners
        engine._round_listeners = own[:own_from]
        try:
            on_checkpoint(simulation, round_, state)
        finally:
            engine._round_listeners = own

    engine.on_progress(on_progress)
    engine.on_progress(checkpoint)
    try:  # the wall time is kept also when Ctrl-C stops the run
        if 0 not in measured:
            measure(0)
        if show_progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            columns = (
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rounds  acc {task.fields[acc]}"),
                TimeElapsedColumn(),
            )
            with Progress(*columns) as progress:
                task = progress.add_task(
                    scenario.name, total=scenario.rounds, acc="-", completed=min(engine.progress(), scenario.rounds)
                )
                engine.on_progress(lambda r: progress.update(task, completed=min(r, scenario.rounds)))
                listeners.append(lambda row: progress.update(task, acc=f"{row['acc_mean']:.3f}"))
                engine.run(until=scenario.sim.max_virtual_time)
        else:
            engine.run(until=scenario.sim.max_virtual_time)
        final = min(engine.progress(), scenario.rounds)
        if final not in measured:
            measure(final)
        warning = timer_warning(simulation)
        if warning is not None:
            log.warning(warning)
    finally:
        simulation.wall_time = time.perf_counter() - started
    return simulation.rows


#: above this share of round ends by the timer, a run says so (log and summary)
TIMER_SHARE_WARNED = 0.5


def rounds_closed_by_timer(engine: Engine) -> float | None:
    """The share of the peers' round ends that came from the round timer rather than from
    the last expected model (``None``: no round ended, or the protocol has no such timer)."""
    ended = int(engine.stats.rounds_done.sum())
    timeouts = engine.records.get("round_timeouts", 0.0)
    return timeouts / ended if ended else None


def timer_warning(simulation: Simulation) -> str | None:
    """One line when most rounds closed on their timer: each then averaged only the
    models that had arrived, which a user would otherwise take for the protocol's result."""
    share = rounds_closed_by_timer(simulation.engine)
    if share is None or share <= TIMER_SHARE_WARNED:
        return None
    timeout = simulation.scenario.protocol.model_dump().get("round_timeout")
    setting = f" (protocol.round_timeout = {timeout:g} s)" if timeout is not None else ""
    return (
        f"{share:.0%} of the rounds closed on their round timer{setting}, not on their "
        "messages: each averaged only the models that had arrived; raise "
        "protocol.round_timeout or lower the load per round"
    )


def summarize(simulation: Simulation) -> dict[str, Any]:
    engine = simulation.engine
    last = simulation.rows[-1] if simulation.rows else {}
    return {
        "name": simulation.scenario.name,
        "protocol": simulation.scenario.protocol.name,
        "peers": engine.n,
        "rounds_requested": simulation.scenario.rounds,
        "rounds_completed": min(engine.progress(), simulation.scenario.rounds),
        "final": last,
        "best_acc_mean": max((r["acc_mean"] for r in simulation.rows), default=float("nan")),
        "wall_time_s": simulation.wall_time,
        "virtual_time_s": engine.now,
        "events_processed": engine.events_processed,
        "training_jobs": engine.executor.jobs_run,
        "training_batches": engine.executor.batches_run,
        "counters": dict(sorted(engine.records.items())),
        "relay_peers": int(len(simulation.relays)),
        "rounds_closed_by_timer": rounds_closed_by_timer(engine),
        "warnings": [w for w in (timer_warning(simulation),) if w is not None],
    }


#: what ``summary.json`` says of a run: still going (or killed hard), ended, or stopped by Ctrl-C
RUN_STATUSES = ("running", "completed", "interrupted")


def default_run_dir(scenario: Scenario, provenance: Provenance | None = None) -> Path:
    """A new, never-shared folder under ``sim.output_dir`` named by scenario, seed and overrides."""
    overrides = provenance.overrides if provenance is not None else ()
    return claim_run_dir(scenario.sim.output_dir, scenario.name, tag=f"s{scenario.seed}", overrides=overrides)


def write_config(scenario: Scenario, path: Path, provenance: Provenance | None = None) -> None:
    """The resolved scenario as TOML (it runs again as is), headed by how it was asked for."""
    config = scenario.model_dump(mode="json", exclude_none=True)
    header = (provenance or Provenance()).header()
    path.write_text(header + tomli_w.dumps(config))


def record_run(
    simulation: Simulation,
    run_dir: Path,
    *,
    provenance: Provenance | None = None,
    show_progress: bool = False,
    plots: bool = True,
    tensorboard: bool = False,
    state: RunProgress | None = None,
    checkpoints: bool = True,
) -> list[dict[str, Any]]:
    """Run ``simulation`` into ``run_dir`` (which must exist), losing nothing on the way.

    ``checkpoints=False``: no ``checkpoint.bin`` whatever ``sim.checkpoint_every`` says
    (a seed of ``--seeds``, which ``--resume`` does not continue: it runs again).

    Before the first round: ``config.toml`` and a ``summary.json`` saying ``running``.
    During the run: each row appended to ``metrics.csv`` as it is measured (and, with
    ``tensorboard``, to event files in ``tensorboard/``: :mod:`sim.tracking`). At the
    end, the whole folder (``completed``); on Ctrl-C the folder with the rows so far
    (``interrupted``), then the ``KeyboardInterrupt`` is raised again for the caller.
    """
    provenance = provenance or Provenance()
    write_config(simulation.scenario, run_dir / "config.toml", provenance)
    started = {
        "name": simulation.scenario.name,
        "status": "running",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance.as_dict(),
    }
    (run_dir / "summary.json").write_text(safe_json(started, indent=2) + "\n")
    recorder = RowRecorder(run_dir / "metrics.csv")
    if state is not None:  # resumed: the rows up to the checkpoint, none measured after it
        recorder.restart(simulation.rows)
    listeners: list[Callable[[dict[str, Any]], None]] = [recorder]
    every = simulation.scenario.sim.checkpoint_every if checkpoints else 0.0
    checkpointer = Checkpointer(run_dir / CHECKPOINT_FILE, every)
    if every > 0:  # of the sources as they are now, close to when they were imported
        code_fingerprint()
    tracker = None
    if tensorboard:
        from sim.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(run_dir / "tensorboard")
        listeners.append(tracker)

    def on_row(row: dict[str, Any]) -> None:
        for listener in listeners:
            listener(row)

    try:
        run_simulation(
            simulation, show_progress=show_progress, on_row=on_row, state=state, on_checkpoint=checkpointer
        )
    except KeyboardInterrupt:
        write_run(simulation, run_dir, status="interrupted", provenance=provenance, plots=plots)
        raise
    finally:
        if tracker is not None:
            tracker.close()
    write_run(simulation, run_dir, status="completed", provenance=provenance, plots=plots)
    checkpointer.discard()
    return simulation.rows


def resume_run(
    scenario: Scenario,
    run_dir: Path,
    *,
    provenance: Provenance | None = None,
    show_progress: bool = False,
    plots: bool = True,
) -> Simulation:
    """Continue the run in ``run_dir`` from its checkpoint (``sim.checkpoint``) to its end.

    Refused (``CheckpointError``, one line) for a folder without a checkpoint, a run that
    completed, and a checkpoint of another scenario or code; ``metrics.csv`` is cut back to
    the checkpoint's rows first, so that no row is written twice or missed.
    """
    path = run_dir / CHECKPOINT_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder to resume")
    if _summary_status(run_dir) == "completed":
        raise CheckpointError(f"{run_dir}: the run completed; there is nothing to resume")
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: no checkpoint ({CHECKPOINT_FILE}) to resume from: the run ended before "
            "its first one (sim.checkpoint_every) or checkpoints were off; run it again"
        )
    if scenario.sim.device != "cpu":
        raise CheckpointError("--resume: runs on sim.device = 'cpu' only (a device run keeps rows on the GPU)")
    simulation, state = read_checkpoint(path, scenario, lambda: build_simulation(scenario))
    for stale in run_dir.glob(f".{CHECKPOINT_FILE}.*.tmp"):  # a write a kill cut short
        stale.unlink(missing_ok=True)
    simulation.evaluator.started = time.perf_counter() - state.evaluator_elapsed
    log.info("resuming %s from its checkpoint at %d rows", run_dir, len(simulation.rows))
    record_run(
        simulation, run_dir, provenance=provenance, show_progress=show_progress, plots=plots, state=state
    )
    return simulation


def _summary_status(run_dir: Path) -> str | None:
    import json

    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def write_run(
    simulation: Simulation,
    out_dir: Path | None = None,
    *,
    status: str = "completed",
    provenance: Provenance | None = None,
    plots: bool = True,
) -> Path:
    """The run folder: config, ``metrics.csv``, ``summary.json`` (with ``status``), plots.

    Without ``out_dir``, a new folder of its own (:func:`default_run_dir`); a given
    ``out_dir`` is written into (created if missing).
    """
    scenario = simulation.scenario
    if out_dir is None:
        out_dir = default_run_dir(scenario, provenance)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(scenario, out_dir / "config.toml", provenance)
    write_csv(simulation.rows, out_dir / "metrics.csv")
    summary = summarize(simulation)
    summary["status"] = status
    summary["seed"] = scenario.seed
    summary.update((provenance or Provenance()).as_dict())
    # NaN/Infinity (a diverged run) written as null: summary.json stays JSON
    (out_dir / "summary.json").write_text(safe_json(summary, indent=2, default=float) + "\n")
    if not plots:
        return out_dir
    from sim.plots import plot_run  # lazily: matplotlib only when plots are written

    plot_run(simulation.rows, out_dir, title=scenario.name, events=simulation.events)
    if simulation.disruptions is not None:
        simulation.disruptions.write(out_dir, title=scenario.name)
    return out_dir
