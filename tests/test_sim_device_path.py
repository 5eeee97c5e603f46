"""The whole simulator on the device path (``sim.device``), checked on the CPU.

No GPU is needed: ``build_simulation(..., device_path=True)`` runs the device path's torch
code (``DeviceArena``, ``DeviceMixer``, the device training and evaluation) on
``torch.device("cpu")``, and its peers' models and accuracies are compared with the
default numpy/scipy path's. On the CPU the two agree to float tolerance (in practice to
the bit: torch's CSR product sums each row in the order scipy's does). Where CUDA is
present the same comparison runs on it, with a looser tolerance (other kernels).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from sim.device import DEVICE_SCOPE, DeviceArena, DeviceMixer
from sim.errors import ScenarioError
from sim.mixing import RowArena, plain
from sim.runner import build_simulation, run_simulation
from sim.scenario import scenario_from_dict
from tests.device_kit import digits_scenario

N, ROUNDS = 30, 4


def scenario(protocol: str = "dpsgd", rounds: int = ROUNDS, **sim: object) -> dict:
    return digits_scenario(
        "device-path", n=N, rounds=rounds, lr=0.3, eval_every=2, protocol=protocol, local_steps=4, **sim
    )


def run(raw: dict, *, device_path: bool) -> tuple[torch.Tensor, list[float], list[float], object]:
    """Every peer's final model (on the CPU), the accuracy and loss rows, the simulation."""
    simulation = build_simulation(scenario_from_dict(raw), device_path=device_path)
    rows = run_simulation(simulation, show_progress=False)
    models = torch.stack([plain(p.params).cpu() for p in simulation.engine.protocols])
    return models, [r["acc_mean"] for r in rows], [r["loss_mean"] for r in rows], simulation


@pytest.mark.parametrize("protocol", ["dpsgd", "epidemic", "gossip"])
def test_device_path_on_the_cpu_equals_the_default_path(protocol):
    default, acc, loss, plain_sim = run(scenario(protocol), device_path=False)
    on_device, acc_d, loss_d, device_sim = run(scenario(protocol), device_path=True)
    executor = device_sim.engine.executor  # type: ignore[attr-defined]
    assert plain_sim.engine.executor.device is None  # type: ignore[attr-defined]  # the default stays numpy/scipy
    assert isinstance(plain_sim.engine.executor.arena, RowArena)  # type: ignore[attr-defined]
    assert executor.device == torch.device("cpu")
    assert isinstance(executor.arena, DeviceArena) and isinstance(executor.mixer, DeviceMixer)
    if protocol != "gossip":  # gossip merges eagerly (an age-weighted sum): no deferred means
        assert executor.mixer.products > 0
    if protocol == "dpsgd":  # whole chunks trained straight from means computed on the device
        assert executor.fused_chunks > 0
    assert torch.allclose(on_device, default, atol=1e-5, rtol=0)
    assert acc_d == pytest.approx(acc, abs=1e-6) and loss_d == pytest.approx(loss, abs=1e-5)
    assert acc[-1] > acc[0] + 0.1  # it learned: the comparison is not between two start models


def test_crashes_recoveries_and_relays_on_the_device_path_equal_the_default_path():
    """Stopped peers' means are settled on the device (``settle_spent``) and the dead
    peers' models are evaluated there too; relay-only peers (no data) train nothing."""
    raw = scenario(rounds=8)
    raw["data"]["relay_fraction"] = 0.2
    raw["disruptions"] = [{"kind": "crash", "at_round": 3, "count": 6}, {"kind": "recover", "at_round": 6}]
    default, acc, _, plain_sim = run(raw, device_path=False)
    on_device, acc_d, _, device_sim = run(raw, device_path=True)
    assert torch.allclose(on_device, default, atol=1e-5, rtol=0)
    assert acc_d == pytest.approx(acc, abs=1e-6)
    all_devices = [r["acc_mean_all"] for r in device_sim.rows]  # type: ignore[attr-defined]
    assert all_devices == pytest.approx([r["acc_mean_all"] for r in plain_sim.rows], abs=1e-6)  # type: ignore[attr-defined]


def test_device_arena_reuses_blocks_and_holds_a_bounded_number_of_rows():
    simulation = build_simulation(scenario_from_dict(scenario(rounds=12)), device_path=True)
    arena = simulation.engine.executor.arena
    assert isinstance(arena, DeviceArena)
    in_use: list[int] = []
    simulation.engine.on_progress(lambda _round: in_use.append(arena.rows_in_use))
    run_simulation(simulation, show_progress=False)
    assert len(in_use) >= 12
    reference = build_simulation(scenario_from_dict(scenario(rounds=12)))
    cpu_arena = reference.engine.executor.arena
    on_cpu: list[int] = []
    reference.engine.on_progress(lambda _round: on_cpu.append(cpu_arena.rows_in_use))
    run_simulation(reference, show_progress=False)
    assert in_use == on_cpu  # the same rows alive as in the CPU arena, round by round
    # about two rounds of rows alive at any time (the round trained, the round its means
    # read); never more than the three rounds the arena is sized for
    assert max(in_use) <= 3 * N and arena.peak_rows <= arena.capacity
    assert max(in_use[6:]) <= max(in_use[:6])  # no growth over rounds
    assert arena.allocated >= 12 and len(arena.buffers) < arena.allocated  # dead blocks let go


def test_a_device_block_lives_exactly_as_long_as_a_view_of_it():
    """The claim ``DeviceArena`` rests on: a row (or a view of a view of it) keeps its
    block alive through ``_base``; when the last view dies, so does the block."""
    arena = DeviceArena(5, capacity=100, device=torch.device("cpu"))
    mixer = DeviceMixer(arena, chunk=4)
    ident, first, block = arena.take(4)
    rows = mixer.rows(ident, first, block)
    assert all(row._base is block for row in rows)
    alias = plain(rows[2]).view(5, 1)  # a plain view of a row's view
    ref = weakref.ref(block)
    del block, rows
    gc.collect()
    assert ref() is not None and arena.in_use(ident) and arena.rows_in_use == 4
    del alias
    gc.collect()
    assert ref() is None and not arena.in_use(ident) and arena.rows_in_use == 0


def test_a_device_mix_gets_the_same_bits_alone_and_in_a_chunk():
    torch.manual_seed(0)
    arena = DeviceArena(64, capacity=100, device=torch.device("cpu"))
    mixer = DeviceMixer(arena, chunk=8)
    blocks = []
    rows = []
    for size in (5, 3):  # rows in two blocks: a mix reads both
        ident, first, block = arena.take(size)
        block.copy_(torch.randn(size, 64))
        blocks.append(block)
        rows += mixer.rows(ident, first, block)
    mixes = [
        torch.stack([rows[0], rows[6], rows[3]]).mean(0),
        torch.tensor([0.5, 0.25, 0.25]) @ torch.stack([rows[7], rows[1], rows[4]]),
    ]
    assert all(mixer.is_pending(m) and m.device == torch.device("cpu") for m in mixes)
    scratch = torch.empty(2, 64)
    mixer.compute_into(mixes, scratch)  # spent: trained from, values not kept
    assert torch.equal(plain(mixes[1]), scratch[1]) and torch.equal(plain(mixes[0]), scratch[0])
    expected = 0.5 * blocks[1][2] + 0.25 * blocks[0][1] + 0.25 * blocks[0][4]
    assert torch.allclose(scratch[1], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sim": {"backend": "per_peer"}}, "sim.backend = 'per_peer'"),
        ({"protocol": {"name": "fedavg"}}, "protocol 'fedavg'"),
        ({"protocol": {"name": "dpsgd", "aggregator": "median"}}, "protocol.aggregator = 'median'"),
        ({"protocol": {"name": "dpsgd", "codec": "fp16"}}, "protocol.codec = 'fp16'"),
        ({"attack": {"name": "sign_flip", "fraction": 0.1}}, "attack 'sign_flip'"),
        ({"model": {"name": "cnn", "hidden": None}}, "model 'cnn'"),
    ],
)
def test_what_the_device_path_does_not_cover_is_refused_in_one_line(change, named):
    raw = scenario()
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if key in ("sim", "model") else value
    with pytest.raises(ScenarioError) as caught:
        build_simulation(scenario_from_dict(raw), device_path=True)
    message = str(caught.value)
    assert "\n" not in message and named in message and DEVICE_SCOPE in message
    assert message.startswith("sim.device = 'cpu': ")


def test_sim_device_names_and_cuda_availability_are_checked_in_one_line():
    with pytest.raises(ScenarioError, match=r"sim.device: .*expected 'cpu', 'cuda' or 'cuda:N' \(got 'tpu'\)"):
        scenario_from_dict(scenario(device="tpu"))
    assert scenario_from_dict(scenario()).sim.device == "cpu"  # the default
    if not torch.cuda.is_available():
        with pytest.raises(ScenarioError, match=r"^sim.device = 'cuda': CUDA is not available on this machine"):
            build_simulation(scenario_from_dict(scenario(device="cuda")))


def test_p2pfl_sim_refuses_cuda_without_a_gpu_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: sim.device = 'cuda' is accepted")
    from typer.testing import CliRunner

    from p2pfl.cli import app

    path = tmp_path / "s.toml"
    path.write_text('rounds = 1\n[data]\ndataset = "digits"\n[sim]\ndevice = "cuda"\n')
    result = CliRunner().invoke(app, ["sim", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "sim.device = 'cuda': CUDA is not available" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the simulator on CUDA not compared")
def test_the_simulator_on_cuda_matches_the_cpu_path():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats()
    default, acc, _, _ = run(scenario(), device_path=False)
    on_cuda, acc_c, _, simulation = run(scenario(device="cuda"), device_path=False)
    executor = simulation.engine.executor  # type: ignore[attr-defined]
    assert executor.device.type == "cuda" and executor.x.device.type == "cuda"
    assert plain(simulation.engine.protocols[0].params).device.type == "cuda"  # type: ignore[attr-defined]
    assert torch.cuda.max_memory_allocated() > 0
    assert torch.allclose(on_cuda, default, atol=1e-4, rtol=0)
    assert acc_c == pytest.approx(acc, abs=2 / 360)  # a prediction or two may flip on near-ties
