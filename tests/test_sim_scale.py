"""Batched simulation: deferred mixing, pooled rows, the engine's fast paths, the benchmark.

The first group checks that batching changes nothing but speed: a batched run and a
per-peer run of the same seed agree. The others guard the optimisations one by one:
rows of a pooled buffer never alias a live row, deferred means compute what eager code
would, timers and the event queue keep their order, and the benchmark's code path runs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pfl.aggregation import get_aggregator
from p2pfl.protocols.base import (
    CancelTimer,
    Effect,
    Event,
    Message,
    Protocol,
    SetTimer,
    TimerFired,
)
from sim.engine import Engine
from sim.mixing import Mixer, PendingMix, PendingStack, Row, RowArena, plain
from sim.network import Network
from sim.runner import build_simulation, run_simulation
from sim.scenario import scenario_from_dict

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scenario(protocol: dict, **overrides) -> dict:
    raw: dict[str, Any] = {
        "name": "scale-test",
        "seed": 5,
        "rounds": 6,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": 0.1},
        "topology": {"kind": "barabasi_albert", "n": 12, "params": {"m": 2}},
        "protocol": protocol,
        "network": {"step_time": 0.002},
        "sim": {"eval_every": 2, "threads": 1},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def run_both(raw: dict, crash: int | None = None):
    runs = []
    for backend in ("batched", "per_peer"):
        simulation = build_simulation(scenario_from_dict({**raw, "sim": {**raw["sim"], "backend": backend}}))
        if crash is not None:
            engine = simulation.engine

            def crash_peer(now: float, e: Engine = engine, peer: int = crash) -> None:
                e.crash(peer)

            engine.schedule(0.03, crash_peer)
        rows = run_simulation(simulation, show_progress=False)
        runs.append((simulation, rows))
    return runs


def assert_same_run(batched, per_peer) -> None:
    (b_sim, b_rows), (p_sim, p_rows) = batched, per_peer
    assert len(b_rows) == len(p_rows)
    for a, b in zip(b_rows, p_rows, strict=True):
        assert a["round"] == b["round"]
        assert a["messages_total"] == b["messages_total"]
        assert a["bytes_total"] == b["bytes_total"]
        assert math.isclose(a["acc_mean"], b["acc_mean"], abs_tol=1e-3)
        assert math.isclose(a["loss_mean"], b["loss_mean"], rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(a["consensus_distance"], b["consensus_distance"], rel_tol=1e-3, abs_tol=1e-5)
    for p, q in zip(b_sim.engine.protocols, p_sim.engine.protocols, strict=True):
        assert p.round == q.round
        assert torch.allclose(plain(p.params), plain(q.params), atol=1e-5)


# ---------------------------------------------------------------- batched == per peer


@pytest.mark.parametrize(
    "protocol, overrides",
    [
        ({"name": "dpsgd", "local_steps": 2}, {}),
        # relay peers train nothing: their "result" is a pending mean, stacked eagerly
        ({"name": "dpsgd"}, {"data": {"relay_fraction": 0.25}}),
        # uniform means (``stack.mean(0)``) over peers drawn from the whole population
        ({"name": "epidemic", "fanout": 3, "round_timeout": 0.05}, {"network": {"mode": "overlay"}}),
        # a robust rule gets a materialised stack
        ({"name": "dpsgd", "aggregator": "median"}, {}),
    ],
    ids=["dpsgd", "dpsgd-relays", "epidemic", "dpsgd-median"],
)
def test_batched_run_equals_per_peer_run(protocol, overrides):
    batched, per_peer = run_both(scenario(protocol, **overrides))
    assert_same_run(batched, per_peer)
    executor = batched[0].engine.executor
    if protocol.get("aggregator") is None:
        assert executor.mixer.deferred > 0  # the means really were deferred ...
        assert executor.fused_chunks > 0  # ... and trained from straight away


def test_batched_equals_per_peer_with_a_crash():
    # neighbours of the crashed peer time out and mix with fewer senders (other weights)
    batched, per_peer = run_both(
        scenario({"name": "dpsgd", "round_timeout": 0.2}, rounds=5), crash=3
    )
    assert_same_run(batched, per_peer)


def test_batched_run_keeps_no_per_peer_models():
    simulation = build_simulation(scenario_from_dict(scenario({"name": "dpsgd"}, rounds=4)))
    run_simulation(simulation, show_progress=False)
    params = [p.params for p in simulation.engine.protocols]
    assert all(isinstance(p, PendingMix) for p in params)
    # every model is a row of a few shared chunks, not a tensor of its own
    storages = {plain(p).untyped_storage().data_ptr() for p in params}
    assert len(storages) < len(params) / 2
    arena = simulation.engine.executor.arena
    assert arena.allocated <= 3


# ---------------------------------------------------------------- the row arena


def test_arena_never_reuses_a_buffer_still_viewed():
    arena = RowArena(dim=3, capacity=4)
    ident, first, block = arena.take(4)
    block.fill_(1.0)
    derived = block[2][1:]  # a view of a view keeps the memory busy too
    del block
    other, _, fresh = arena.take(4)
    assert other != ident and arena.allocated == 2
    fresh.fill_(2.0)
    assert derived.tolist() == [1.0, 1.0]
    del derived
    again, _, reused = arena.take(4)
    assert again == ident and arena.allocated == 2  # free again: no new memory


def test_arena_packs_blocks_and_rows_map_to_their_memory():
    arena = RowArena(dim=5, capacity=6)
    mixer = Mixer(arena)
    blocks = [arena.take(2), arena.take(3), arena.take(4)]  # the third does not fit: new buffer
    rows: list[Row] = []
    for ident, first, block in blocks:
        block.copy_(torch.randn(block.shape))
        rows += mixer.rows(ident, first, block)
    assert [b[0] for b in blocks] == [0, 0, 1]
    assert [b[1] for b in blocks] == [0, 2, 0]
    pointers = {plain(r).data_ptr() for r in rows}
    assert len(pointers) == len(rows)  # no two rows share memory
    for row in rows:
        buffer = arena.buffers[row._key >> 32]
        assert np.array_equal(buffer[row._key & 0xFFFFFFFF], plain(row).numpy())
    assert rows[0].numel() == 5 and Message("model", 0, rows[0]).nbytes() > 20


def test_arena_gives_idle_memory_back():
    arena = RowArena(dim=2, capacity=2, keep_idle=1)
    blocks = [arena.take(2) for _ in range(4)]
    assert arena.allocated == 4
    del blocks
    arena.take(2)
    assert len(arena.buffers) <= 2


# ---------------------------------------------------------------- deferred means


def _rows(count: int = 6, dim: int = 7, buffers: int = 1) -> tuple[Mixer, list[Row]]:
    arena = RowArena(dim=dim, capacity=math.ceil(count / buffers))
    mixer = Mixer(arena, chunk=4)
    rows: list[Row] = []
    generator = torch.Generator().manual_seed(0)
    while len(rows) < count:
        ident, first, block = arena.take(min(arena.capacity, count - len(rows)))
        block.copy_(torch.randn(block.shape, generator=generator))
        rows += mixer.rows(ident, first, block)
    return mixer, rows


@pytest.mark.parametrize("buffers", [1, 3])
def test_deferred_means_match_eager(buffers):
    mixer, rows = _rows(buffers=buffers)
    eager = [plain(r) for r in rows]
    picks = [[0, 1, 2], [5, 3], [4, 4, 0, 2], [1], [2, 5, 0]]
    weights = [torch.tensor([0.5, 0.25, 0.25]), None, torch.tensor([0.1, 0.2, 0.3, 0.4]), None,
               torch.tensor([1 / 3] * 3)]
    aggregate = mixer.aggregate(None)
    mixes, expected = [], []
    for pick, w in zip(picks, weights, strict=True):
        stack = torch.stack([rows[i] for i in pick])
        assert isinstance(stack, PendingStack)
        mixes.append(aggregate(stack, w, 0))
        reference = torch.stack([eager[i] for i in pick])
        expected.append(reference.mean(0) if w is None else w @ reference)
    assert mixer.pending == len(picks) and mixer.products == 0
    for mix, want in zip(mixes, expected, strict=True):
        assert torch.allclose(plain(mix), want, atol=1e-6)
    assert mixer.pending == 0


def test_default_protocol_mean_is_deferred_through_torch():
    mixer, rows = _rows()
    stack = torch.stack(tuple(rows[:3]))  # a tuple: Sequence[Tensor] (a list[Row] is not)
    w = torch.tensor([0.2, 0.3, 0.5])
    # what synchronous.weighted_mean does when no aggregate is injected
    mix = w.to(stack.dtype) @ stack
    mean = stack.mean(dim=0)
    assert isinstance(mix, PendingMix) and isinstance(mean, PendingMix)
    eager = torch.stack([plain(r) for r in rows[:3]])
    assert torch.allclose(plain(mix), w @ eager, atol=1e-6)
    assert torch.allclose(plain(mean), eager.mean(0), atol=1e-6)


def test_pending_mix_behaves_like_a_tensor():
    mixer, rows = _rows()
    mix = mixer.aggregate(None)(torch.stack(tuple(rows[:2])), None, 0)
    # metadata does not force the computation (a message is sized, a Train is queued)
    assert mix.shape == (7,) and mix.numel() == 7 and mix.dtype == torch.float32
    assert Message("model", 1, mix).nbytes() > 28 and mixer.pending == 1
    value = (plain(rows[0]) + plain(rows[1])) / 2
    assert torch.allclose(mix + 0, value, atol=1e-6)  # anything else computes it
    assert mixer.pending == 0
    assert torch.allclose(mix.clone(), value) and np.allclose(mix.numpy(), value.numpy())
    assert mix.tolist() == pytest.approx(value.tolist(), abs=1e-6)
    assert torch.allclose(torch.stack([mix, mix])[1], value)
    assert type(mix * 2) is torch.Tensor  # results are plain tensors


def test_robust_rule_gets_the_materialised_stack():
    mixer, rows = _rows()
    median = get_aggregator("median")
    stack = torch.stack(tuple(rows[:5]))
    eager = torch.stack([plain(r) for r in rows[:5]])
    assert torch.equal(mixer.aggregate(median)(stack, None, 0), median(eager, None, 0))
    assert torch.equal(median(stack, None, 0), median(eager, None, 0))  # through torch too


def test_rows_stay_plain_for_everything_but_stack():
    _, rows = _rows()
    assert type(rows[0] + 1) is torch.Tensor
    assert type(rows[0][1:]) is torch.Tensor
    mixed = torch.stack([rows[0], plain(rows[1])])  # not all rows: eager
    assert type(mixed) is torch.Tensor and mixed.shape == (2, 7)


# ---------------------------------------------------------------- engine fast paths


class _Timers(Protocol):
    """Records when its timer ``t`` fires; the test arms and cancels it from outside."""

    name = "timers"

    def __init__(self) -> None:
        super().__init__("p0", torch.zeros(1), [])
        self.fired: list[float] = []

    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, TimerFired) and event.name == "t":
            self.fired.append(event.now)
        return []


def _engine(protocol: Protocol) -> Engine:
    import networkx as nx

    graph = nx.empty_graph(1)
    return Engine([protocol], Network(graph, latency=0.01, bandwidth=1e6), None, step_time=1.0,  # type: ignore[arg-type]
                  rounds=10**9)


@pytest.mark.parametrize(
    "script, fires",
    [
        ([(0.0, "set", 5.0), (1.0, "set", 8.0)], [8.0]),  # re-armed later: fires once, late
        ([(0.0, "set", 5.0), (1.0, "set", 2.0)], [2.0]),  # re-armed earlier: fires early
        ([(0.0, "set", 5.0), (1.0, "cancel", 0.0)], []),
        ([(0.0, "set", 5.0), (1.0, "cancel", 0.0), (2.0, "set", 5.0)], [5.0]),
        ([(0.0, "set", 3.0), (4.0, "set", 6.0)], [3.0, 6.0]),  # fired, then armed again
        ([(0.0, "set", 3.0), (3.0, "set", 6.0)], [6.0]),  # re-armed just before it was due
    ],
)
def test_timers_fire_once_at_their_last_deadline(script, fires):
    protocol = _Timers()
    engine = _engine(protocol)
    for at, action, value in script:
        effect = SetTimer("t", value) if action == "set" else CancelTimer("t")

        def apply(now: float, e: Effect = effect) -> None:
            engine._apply(0, [e])

        engine.schedule(at, apply)
    engine.run(until=20.0)
    assert protocol.fired == fires


def test_same_time_events_run_in_insertion_order():
    order: list[int] = []
    engine = _engine(_Timers())
    for i in range(5):

        def append(now: float, i: int = i) -> None:
            order.append(i)

        engine.schedule(1.0, append)
    engine.schedule(0.5, lambda now: engine.schedule(1.0, lambda now: order.append(99)))
    engine.run(until=2.0)
    assert order == [0, 1, 2, 3, 4, 99]
    assert engine.pending_events == 0


def test_progress_follows_crashes_and_rounds():
    simulation = build_simulation(scenario_from_dict(scenario({"name": "dpsgd", "round_timeout": 0.2}, rounds=4)))
    engine = simulation.engine
    engine.run(until=0.02)
    slowest = int(np.argmin(engine.stats.rounds_done))
    before = engine.progress()
    engine.crash(slowest)  # the slowest peer no longer counts
    expected = int(np.min(engine.stats.rounds_done[engine.alive]))
    assert engine.progress() == expected >= before
    engine.run()
    assert engine.progress() == int(np.min(engine.stats.rounds_done[engine.alive])) >= 4


# ---------------------------------------------------------------- the benchmark


@pytest.fixture(scope="module")
def sim_scale():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import sim_scale as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_benchmark_ratio_part_runs_and_agrees(sim_scale):
    bare, simulated = sim_scale.part_ratio(n=40, rounds=2, warm_up=1, dataset="digits", threads=1)
    assert bare["variant"] == "bare batched compute" and simulated["variant"] == "simulator"
    assert simulated["ratio_wall"] > 0 and simulated["ratio_cpu"] > 0
    assert float(simulated["max_param_diff"]) < 1e-5  # the same computation, with or without simulator


def test_benchmark_reference_and_scale_parts_run(sim_scale):
    per_peer, batched = sim_scale.part_reference(n=10, rounds=2, dataset="digits", threads=1)
    assert float(batched["max_param_diff"]) < 1e-4 and batched["ratio_wall"] > 0
    (scale,) = sim_scale.part_scale(n=30, rounds=2, dataset="digits", threads=1,
                                    eval_every=1, eval_peers=10, eval_test=100)
    assert scale["peak_rss_mib"] > 0 and "10 sampled peers on 100 test images" in scale["note"]


def test_benchmark_writes_table_csv_and_png(sim_scale, tmp_path, capsys):
    out = tmp_path / "scale.csv"
    sim_scale.main(["--quick", "--parts", "ratio", "--sizes", "30", "--in-process", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "bare batched compute" in printed and "simulator" in printed
    assert out.read_text().startswith("part,n,rounds,variant")
    assert out.with_suffix(".png").stat().st_size > 0
