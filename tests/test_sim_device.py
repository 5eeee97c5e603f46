"""The device path of the batched rounds (``sim.device``): CPU vs CUDA, and the
device-generic code exercised on the CPU where no GPU is present.

Tolerances: on the CPU the device path differs from the simulator only in the order the
sparse product sums (torch's against scipy's), a few float32 ulps per round: 1e-5 after
three rounds. CUDA's matrix kernels round differently again (and may use TF32 unless
disabled, which this test does): 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from sim.device import DeviceRounds, peak_device_bytes, resolve_device
from sim.errors import ScenarioError
from sim.mixing import plain
from sim.runner import build_simulation
from sim.scenario import scenario_from_dict
from tests.device_kit import digits_scenario
from topologies import metropolis_hastings

N, ROUNDS = 30, 3
PEERS = [0, 7, 15, 29]


def scenario() -> dict:
    return digits_scenario("device-test", n=N, rounds=ROUNDS, lr=0.1, eval_every=ROUNDS)


def device_models(device: str) -> torch.Tensor:
    """Final models of ``PEERS`` after ``ROUNDS`` rounds on ``device`` (fresh samplers)."""
    simulation = build_simulation(scenario_from_dict(scenario()))
    trainer = simulation.trainer
    rounds = DeviceRounds(
        trainer,
        simulation.engine.executor.samplers,  # type: ignore[arg-type]
        metropolis_hastings(simulation.graph),
        trainer.init_params(simulation.scenario.seed),
        device=resolve_device(device),
    )
    rounds.run(ROUNDS)
    assert rounds.stacks[0].device.type == torch.device(device).type  # the stack lives there
    return rounds.params(PEERS)


def test_device_path_on_explicit_cpu_matches_the_simulator():
    simulation = build_simulation(scenario_from_dict(scenario()))
    simulation.engine.run()
    simulated = torch.stack([plain(simulation.engine.protocols[i].params) for i in PEERS])
    on_cpu = device_models("cpu")
    assert on_cpu.device.type == "cpu" and on_cpu.shape == simulated.shape
    assert torch.allclose(on_cpu, simulated, atol=1e-5, rtol=0)
    assert not torch.equal(on_cpu, torch.stack([simulation.trainer.init_params(4)] * len(PEERS)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: CPU vs CUDA not compared")
def test_cuda_matches_cpu_within_float_tolerance():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats()
    on_cuda = device_models("cuda")
    assert peak_device_bytes(torch.device("cuda")) > 0
    assert torch.allclose(on_cuda, device_models("cpu"), atol=1e-4, rtol=0)


def test_device_names_are_checked_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ScenarioError, match=r"sim.device = 'tpu': expected one of cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ScenarioError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
    else:
        with pytest.raises(ScenarioError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
