"""From a scenario to a results folder: build the peers, run the engine, write it all out.

``build_simulation`` wires a ``Scenario`` into an ``Engine``: its peers are assembled by
``p2pfl.peer``, as a node assembles itself (dataset and trainer shared once, each peer a
data share, a sampler and a protocol object); ``run_simulation`` runs it with a progress
bar, measuring at every ``sim.eval_every`` rounds; ``write_run`` produces the run folder:
the resolved config, ``metrics.csv``, ``summary.json`` and PNG plots.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from p2pfl.learning import BatchSampler, Dataset, LocalTrainer, load_dataset
from p2pfl.learning.sampler import derive_seed  # noqa: F401 - kept importable from here
from p2pfl.peer import build_commons
from p2pfl.protocols.base import Protocol
from p2pfl.protocols.records import Keyring
from p2pfl.protocols.registry import mixing_scheme, protocol_class
from sim.adversary import Adversary, plan_adversary
from sim.disruptions import DisruptionRuntime, install_disruptions
from sim.engine import Engine
from sim.metrics import Evaluator, write_csv
from sim.mixing import deferred_aggregate
from sim.network import Network
from sim.plots import plot_run
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


def build_simulation(scenario: Scenario, *, dataset: Dataset | None = None) -> Simulation:
    seed = scenario.seed
    if scenario.sim.threads:
        torch.set_num_threads(scenario.sim.threads)
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
    peer_ids = [f"p{i}" for i in range(n)]

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
    share_of = {int(holder): k for k, holder in enumerate(holders)}
    setups = [commons.peer(i, share_of.get(i)) for i in range(n)]
    samplers: list[BatchSampler | None] = [setup.sampler for setup in setups]
    data_sizes = np.array([setup.data_size for setup in setups], dtype=np.int64)

    mixing = None
    scheme = mixing_scheme(scenario.protocol)
    if scheme is not None:
        matrix = metropolis_hastings(graph) if scheme == "metropolis_hastings" else uniform(graph)
        mixing = matrix.tocsr()
    executor = TrainingExecutor(trainer, samplers, backend=scenario.sim.backend)
    # The batched backend defers the protocols' plain means (one sparse product per chunk).
    aggregate = deferred_aggregate(executor.mixer, commons.aggregate)
    protocols: list[Protocol] = []
    keyring = Keyring.derive(peer_ids, seed) if scenario.sim.sign_relayed else None
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
    )
    simulation = Simulation(scenario, engine, evaluator, dataset, trainer, peer_ids, graph, relays, data_sizes)
    simulation.adversary = adversary.install(simulation)  # None when there is no attack
    simulation.disruptions = install_disruptions(simulation)  # None when there are none
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
) -> list[dict[str, Any]]:
    """Run to ``scenario.rounds``, measuring every ``eval_every`` rounds (and at 0 and the end)."""
    scenario = simulation.scenario
    engine = simulation.engine
    every = scenario.sim.eval_every
    started = time.perf_counter()
    listeners: list[Callable[[dict[str, Any]], None]] = [on_row] if on_row else []
    measured: set[int] = set()

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

    last_due = [0]

    def on_progress(round_: int) -> None:
        # Progress can jump several rounds at once (lagging peers catching up after a
        # heal): measure at the first progress at or past each due round.
        round_ = min(round_, scenario.rounds)
        due = (round_ // every) * every
        if round_ not in measured and (due > last_due[0] or round_ == scenario.rounds):
            last_due[0] = due
            measure(round_)

    engine.on_progress(on_progress)
    measure(0)
    if show_progress:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns) as progress:
            task = progress.add_task(scenario.name, total=scenario.rounds, acc="-")
            engine.on_progress(lambda r: progress.update(task, completed=min(r, scenario.rounds)))
            listeners.append(lambda row: progress.update(task, acc=f"{row['acc_mean']:.3f}"))
            engine.run(until=scenario.sim.max_virtual_time)
    else:
        engine.run(until=scenario.sim.max_virtual_time)
    final = min(engine.progress(), scenario.rounds)
    if final not in measured:
        measure(final)
    simulation.wall_time = time.perf_counter() - started
    return simulation.rows


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
    }


def write_run(simulation: Simulation, out_dir: Path | None = None) -> Path:
    scenario = simulation.scenario
    if out_dir is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out_dir = Path(scenario.sim.output_dir) / f"{scenario.name}-s{scenario.seed}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = scenario.model_dump(mode="json", exclude_none=True)
    (out_dir / "config.toml").write_text(tomli_w.dumps(config))
    write_csv(simulation.rows, out_dir / "metrics.csv")
    summary = summarize(simulation)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    plot_run(simulation.rows, out_dir, title=scenario.name, events=simulation.events)
    if simulation.disruptions is not None:
        simulation.disruptions.write(out_dir, title=scenario.name)
    return out_dir
