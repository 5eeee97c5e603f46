"""The simulator's message screen reads the bound its trainer computed in one pass.

Every trained row travels to every neighbour and each receiver's contract bounds its
values; the executor computes each row's L2 norm (which no entry's magnitude exceeds)
once per training chunk, in cache, and the contract skips its own scan when that bound
is well inside its limit. These tests pin down that the bound is what the contract acts
on, that it is the row's true norm, that a bound near the limit (or NaN) still gets the
exact scan, and that a simulation with bounds refuses exactly what one without refuses.
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


def test_contract_skips_the_scan_only_for_a_bound_well_inside_the_limit():
    values = torch.tensor([[1.0, -2.0, 2.0], [0.0, 0.0, 2e6], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    small, large, lying, unknown = _rows(values, [3.0, 2e6, math.nan, None])
    receiver = _receiver(3)
    assert check_message(receiver, "p1", Message("model", 0, small)) is None
    # a bound beyond the limit: scanned, and 2e6 is refused
    assert check_message(receiver, "p1", Message("model", 0, large)) is Refusal.TOO_LARGE
    # a NaN bound (the row had a NaN or an Inf) or none at all: scanned; these are fine
    assert check_message(receiver, "p1", Message("model", 0, lying)) is None
    assert check_message(receiver, "p1", Message("model", 0, unknown)) is None


def test_a_bound_is_trusted_when_well_inside_the_limit():
    # the row's values exceed the limit but its (wrong) bound says 1.0: the contract acts
    # on the bound, which shows that it reads it (the executor's bound is never wrong)
    (row,) = _rows(torch.tensor([[0.0, 2e6, 1.0]]), [1.0])
    assert check_message(_receiver(3), "p1", Message("model", 0, row)) is None


def test_rows_without_a_bound_are_scanned():
    (row,) = _rows(torch.tensor([[0.0, 2e6, 1.0]]), None)
    assert row.abs_bound is None
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

    seen: list[tuple[torch.Tensor, float | None]] = []
    original = training.TrainingExecutor._run_batched

    def recording(self, jobs):
        original(self, jobs)
        seen.extend((job.result, job.result.abs_bound) for job in jobs)

    monkeypatch.setattr(training.TrainingExecutor, "_run_batched", recording)
    _run(_diverging())
    assert seen
    for row, bound in seen:
        assert bound is not None, "a row without its bound"
        plain = row.as_subclass(torch.Tensor)
        if not torch.isfinite(plain).all():
            assert not math.isfinite(bound)
        else:
            assert bound == pytest.approx(float(torch.linalg.vector_norm(plain.double())), rel=1e-5)
            assert bound >= float(plain.abs().max()) * (1 - 1e-6)

    # and with the bounds withheld (every row scanned by the contract) the run refuses the same
    monkeypatch.setattr(training.TrainingExecutor, "_run_batched", original)
    from sim import mixing

    real_rows = mixing.Mixer.rows
    monkeypatch.setattr(
        mixing.Mixer, "rows", lambda self, ident, first, block, bounds=None: real_rows(self, ident, first, block)
    )
    unscanned, _ = _run(_diverging())
    assert dict(unscanned.engine.refusals) == scanned
