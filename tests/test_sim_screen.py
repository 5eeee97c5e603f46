"""The simulator's message screen reads the value range its trainer took in one scan.

Every trained row travels to every neighbour and each receiver's contract bounds its
values; the executor scans a training chunk once, in cache, and the contract reads that
range instead of scanning each row again. These tests pin down that the range is the
one the contract acts on, that it is the row's true range, and that a simulation with
it refuses exactly what one that scans every row refuses.
"""

from __future__ import annotations

import math

import pytest
import torch

from p2pfl.messages import Message
from p2pfl.protocols.contract import Refusal, check_message
from p2pfl.protocols.dpsgd import DPSGD
from sim.mixing import Mixer, RowArena
from sim.runner import build_simulation, run_simulation
from sim.scenario import scenario_from_dict


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(values: torch.Tensor, ranges):
    arena = RowArena(values.shape[1], capacity=values.shape[0])
    ident, first, block = arena.take(values.shape[0])
    block.copy_(values)
    return Mixer(arena).rows(ident, first, block, ranges)


def _receiver(dim: int) -> DPSGD:
    return DPSGD("p0", torch.zeros(dim), ["p1"])


def test_contract_acts_on_the_row_range_not_a_rescan():
    values = torch.ones(2, 3)
    fine, flagged = _rows(values, [(1.0, 1.0), (math.nan, math.nan)])
    receiver = _receiver(3)
    assert check_message(receiver, "p1", Message("model", 0, fine)) is None
    # the same values, but the scan that made the row saw a NaN: refused on its word
    assert check_message(receiver, "p1", Message("model", 0, flagged)) is Refusal.TOO_LARGE


def test_rows_without_a_range_are_scanned():
    (row,) = _rows(torch.tensor([[0.0, 2e6, 1.0]]), None)
    assert row.value_range is None
    assert check_message(_receiver(3), "p1", Message("model", 0, row)) is Refusal.TOO_LARGE


def _diverging() -> dict:
    # a learning rate this large sends some peers' models to Inf/NaN within a few rounds
    return {
        "name": "screen-test",
        "seed": 3,
        "rounds": 6,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": 1e4},
        "topology": {"kind": "barabasi_albert", "n": 10, "params": {"m": 2}},
        "protocol": {"name": "dpsgd", "local_steps": 2},
        "network": {"step_time": 0.002},
        "sim": {"eval_every": 3, "threads": 1},
    }


def _run(scenario: dict):
    simulation = build_simulation(scenario_from_dict(scenario))
    run_simulation(simulation, show_progress=False)
    executor = simulation.engine.executor
    return simulation, executor


def test_training_rows_carry_their_true_range_and_refusals_match_a_full_scan(monkeypatch):
    simulation, executor = _run(_diverging())
    scanned = dict(simulation.engine.refusals)
    assert scanned.get("too_large", 0) > 0, "the scenario should produce out-of-bound models"

    # every row the executor handed out carries its exact range
    from sim import training

    seen: list[tuple[torch.Tensor, tuple[float, float] | None]] = []
    original = training.TrainingExecutor._run_batched

    def recording(self, jobs):
        original(self, jobs)
        seen.extend((job.result, job.result.value_range) for job in jobs)

    monkeypatch.setattr(training.TrainingExecutor, "_run_batched", recording)
    _run(_diverging())
    assert seen
    for row, value_range in seen:
        plain = row.as_subclass(torch.Tensor)
        low, high = value_range
        if torch.isnan(plain).any():
            assert math.isnan(low) and math.isnan(high)
        else:
            assert (low, high) == (plain.min().item(), plain.max().item())

    # and with the ranges withheld (every row scanned by the contract) the run refuses the same
    monkeypatch.setattr(training.TrainingExecutor, "_run_batched", original)
    from sim import mixing

    real_rows = mixing.Mixer.rows
    monkeypatch.setattr(
        mixing.Mixer, "rows", lambda self, ident, first, block, ranges=None: real_rows(self, ident, first, block)
    )
    unscanned, _ = _run(_diverging())
    assert dict(unscanned.engine.refusals) == scanned
