"""Lean simulator memory: means are trained from scratch and never stored, rows are reused
block by block, and none of it changes a single bit of the results.

The reference for "the same bits" is the design this replaced, in which every mean was
computed once and its value kept: here the same run is made with every mean settled (its
value kept) right after it is trained from, and every peer's model must be equal.
"""

from __future__ import annotations

import torch

from sim.memory import arena_rows, release_free_heap
from sim.mixing import Mixer, RowArena, plain
from sim.runner import build_simulation, run_simulation
from sim.scenario import scenario_from_dict


def scenario(**network) -> dict:
    return {
        "name": "memory-test",
        "seed": 7,
        "rounds": 6,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": 0.1},
        "topology": {"kind": "regular", "n": 48, "params": {"k": 4}},
        "protocol": {"name": "dpsgd"},
        # queued uplinks and uneven speeds: rounds overlap, blocks free out of order
        "network": {"step_time": 0.002, "speed_spread": 0.5, **network},
        "sim": {"eval_every": 3, "eval_peers": 8, "threads": 1},
    }


def final_models(simulation) -> list[torch.Tensor]:
    return [plain(p.params).clone() for p in simulation.engine.protocols]


def test_lean_run_equals_a_run_that_keeps_every_mean():
    lean = build_simulation(scenario_from_dict(scenario()))
    run_simulation(lean, show_progress=False)

    kept = build_simulation(scenario_from_dict(scenario()))
    executor = kept.engine.executor
    flush = executor.flush

    def flush_and_keep() -> None:
        flush()
        assert executor.mixer is not None
        executor.mixer.settle_spent(before=1 << 30)  # every mean trained from: value kept

    executor.flush = flush_and_keep  # type: ignore[method-assign]
    run_simulation(kept, show_progress=False)
    kept_mixer, lean_mixer = kept.engine.executor.mixer, lean.engine.executor.mixer
    assert kept_mixer is not None and lean_mixer is not None
    assert kept_mixer.deferred == lean_mixer.deferred
    for a, b in zip(final_models(lean), final_models(kept), strict=True):
        assert torch.equal(a, b)
    assert [r["acc_mean"] for r in lean.rows] == [r["acc_mean"] for r in kept.rows]


def test_same_seed_same_bits():
    runs = []
    for _ in range(2):
        simulation = build_simulation(scenario_from_dict({**scenario(), "rounds": 3}))
        simulation.engine.run()
        runs.append(final_models(simulation))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_means_are_not_stored_and_rows_stay_within_a_few_rounds():
    simulation = build_simulation(scenario_from_dict(scenario()))
    engine = simulation.engine
    engine.run()  # no evaluation: nothing asks for a model's value
    executor = engine.executor
    n = engine.n
    mixer = executor.mixer
    assert mixer is not None
    spent = [p.params for p in engine.protocols if mixer.is_pending(p.params)]
    assert len(spent) == n  # every model is a mean without a value of its own
    assert executor.fused_chunks > 0
    arena = executor.arena
    assert isinstance(arena, RowArena)  # the CPU run's arena (DeviceArena is the GPU's)
    assert len(arena.buffers) == 1  # one buffer: every mean is one product
    assert arena.rows_in_use <= 3 * n
    assert sum(arena.high_water.values()) <= arena_rows(n, executor.chunk)


def test_a_mean_alone_or_in_a_chunk_gives_the_same_bits():
    arena = RowArena(dim=33, capacity=12)
    mixer = Mixer(arena, chunk=4)
    ident, first, block = arena.take(6)
    block.copy_(torch.randn(block.shape, generator=torch.Generator().manual_seed(1)))
    rows = mixer.rows(ident, first, block)
    weights = torch.tensor([0.4, 0.35, 0.25])
    picks = [[0, 1, 2], [3, 4, 5], [5, 0, 2]]
    chunked = [mixer.defer([rows[i] for i in pick], weights) for pick in picks]
    alone = [mixer.defer([rows[i] for i in pick], weights) for pick in picks]
    scratch = mixer.compute_into(chunked, torch.empty(3, 33), generations=[0, 0, 0])
    assert all(mixer.is_pending(m) for m in chunked)  # trained from, value not kept
    for mix, value in zip(alone, scratch, strict=True):
        assert torch.equal(plain(mix), value)
    for mix, value in zip(chunked, scratch, strict=True):
        assert torch.equal(plain(mix), value)  # computed again from its rows: same bits


def test_arena_fills_the_first_hole_a_split_request_fits():
    arena = RowArena(dim=2, capacity=10)
    _, first_a, a = arena.take(4)
    _, first_b, b = arena.take(4)
    assert (first_a, first_b) == (0, 4)
    del a  # rows 0..3 free again, 8..9 never used
    ident, first, piece = arena.take(6, at_least=2)
    assert (ident, first, piece.shape[0]) == (0, 0, 4)  # the hole, not new memory
    _, first, rest = arena.take(2, at_least=2)
    assert first == 8 and arena.allocated == 1
    del b, piece, rest


def test_a_stopped_peers_mean_is_settled_when_the_arena_is_full():
    arena = RowArena(dim=3, capacity=6)
    mixer = Mixer(arena, chunk=4)
    arena.reclaim = lambda: mixer.settle_spent(before=2)
    ident, first, block = arena.take(3)
    block.copy_(torch.arange(9, dtype=torch.float32).view(3, 3))
    rows = mixer.rows(ident, first, block)
    stopped = mixer.defer(rows, None)  # a peer's mean, trained from, then the peer stopped
    mixer.compute_into([stopped], torch.empty(1, 3), generations=[0])
    expected = torch.arange(9, dtype=torch.float32).view(3, 3).mean(0)
    del block, rows
    _, _, other = arena.take(3)  # the rest of the buffer
    ident, first, reused = arena.take(3)  # full: the stale mean is settled, its rows freed
    assert (ident, first) == (0, 0) and arena.allocated == 1
    reused.fill_(-1.0)
    assert torch.allclose(plain(stopped), expected)
    del other


def test_buffer_room_and_heap_release():
    assert arena_rows(1000, 100) >= 2 * 1000
    assert arena_rows(1000, 100, row_bytes=4) == 3 * 1000 + 2 * 100
    assert isinstance(release_free_heap(), bool)


def test_benchmark_memory_and_device_parts_run():
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        import sim_scale
    finally:
        sys.path.remove(benchmarks)
    (memory,) = sim_scale.part_memory(n=30, rounds=2, dataset="digits", threads=1)
    assert memory["part"] == "memory" and memory["rows_per_peer"] > 0
    assert "parameter rows per peer" in memory["note"]
    rows = sim_scale.part_device(n=30, rounds=1, dataset="digits", threads=1)
    assert rows[0]["variant"] == "DeviceRounds on cpu" and rows[0]["wall_per_round_s"] > 0
