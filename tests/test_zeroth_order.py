"""Zeroth-order fine-tuning with shared randomness (``p2pfl.protocols.zeroth_order``).

What is checked: it learns (digits, in the simulator and on memory-transport nodes, the
two drivers computing the same models step by step); every peer of a complete graph holds
the same model; a late scalar is applied on arrival and the peer ends where it would have;
hostile scalars (NaN, out of range, a tensor, a stranger's, a far-future or stale step, a
duplicate) are dropped and counted and change no model.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.learning import BatchSampler, LocalTrainer, build_model, evaluate, load_dataset
from p2pfl.learning.batch_loss import batch_losses
from p2pfl.messages import Message
from p2pfl.protocols.base import (
    EvaluateLosses,
    LossesEvaluated,
    MessageReceived,
    Record,
    RoundCompleted,
    Send,
    Start,
    TimerFired,
)
from p2pfl.protocols.contract import Refusal
from p2pfl.protocols.zeroth_order import (
    LATE_ROUNDS,
    LEAD_ROUNDS,
    ROUND_TIMER,
    SCALAR,
    ZerothOrder,
    direction,
    quantize,
)
from sim.runner import build_simulation, run_simulation
from sim.scenario import scenario_from_dict
from tests import test_drivers_equivalent as equivalent

pytestmark = pytest.mark.timeout(180)

#: the fine-tuning set-up of examples/zo_digits.toml, smaller
ZO: dict[str, Any] = {
    "name": "zeroth_order",
    "lr": 0.05,
    "eps": 1e-3,
    "grad_scale": 0.02,
    "pretrain_steps": 40,
    "pretrain_samples": 300,
    "round_timeout": 1.0,
}
#: chance on digits is 0.10; the pre-trained start model is at 0.46 (seed 1)
TARGET_ACCURACY = 0.80


def scenario(rounds: int, protocol: dict[str, Any] | None = None, **extra: Any) -> Any:
    return scenario_from_dict(
        {
            "name": "zo-test",
            "seed": 1,
            "rounds": rounds,
            "data": {"dataset": "digits", "partition": "iid", "batch_size": 32},
            "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
            "topology": {"kind": "complete", "n": 8},
            "protocol": protocol or ZO,
            "sim": {"eval_every": rounds},
            **extra,
        }
    )


# ---------------------------------------------------------------- it learns, in both drivers


def test_it_converges_in_the_simulator_and_every_peer_holds_the_same_model() -> None:
    simulation = build_simulation(scenario(250))
    started = time.process_time()
    rows = run_simulation(simulation, show_progress=False)
    assert time.process_time() - started < 60
    first, last = rows[0], rows[-1]
    print(f"simulator: accuracy {first['acc_mean']:.3f} -> {last['acc_mean']:.3f} in 250 steps")
    assert last["round"] == 250
    assert first["acc_mean"] < 0.55  # the briefly pre-trained start
    assert last["acc_mean"] >= TARGET_ACCURACY, (first["acc_mean"], last["acc_mean"])
    params = [p.params for p in simulation.engine.protocols]
    assert all(torch.equal(params[0], p) for p in params[1:])
    # one byte's message per neighbour per step: 8 peers x 7 neighbours x 250 steps
    assert last["messages_total"] == 8 * 7 * 250
    assert simulation.engine.records["round_timeouts"] == 0


def test_it_sends_over_fifty_times_fewer_bytes_per_round_than_dpsgd() -> None:
    zo = build_simulation(scenario(5))
    run_simulation(zo, show_progress=False)
    dpsgd = build_simulation(scenario(5, {"name": "dpsgd", "local_steps": 1}))
    run_simulation(dpsgd, show_progress=False)
    zo_bytes = sum(zo.engine.stats.sent_bytes)
    dpsgd_bytes = sum(dpsgd.engine.stats.sent_bytes)
    assert sum(zo.engine.stats.sent_messages) == sum(dpsgd.engine.stats.sent_messages)
    assert dpsgd_bytes > 50 * zo_bytes, (dpsgd_bytes, zo_bytes)


def node_accuracy(params: torch.Tensor) -> float:
    dataset = load_dataset("digits", seed=equivalent.SEED)
    net = build_model("mlp", dataset.input_shape, dataset.num_classes, hidden=(32,))
    trainer = LocalTrainer(net, dataset.x_train, dataset.y_train, lr=0.1, batch_size=16)
    return float(evaluate(trainer, params, dataset.x_test, dataset.y_test).accuracy[0])


def test_memory_transport_nodes_compute_the_simulators_models_and_learn(tmp_path: Path) -> None:
    """8 nodes over the memory transport and the simulator, complete graph, peers named by
    their keys in both (a direction is seeded by the peer id): the same model after every
    step, and the nodes' model improves on the start."""
    protocol = {**ZO, "round_timeout": equivalent.TIMEOUT}
    rounds = 80
    simulated, _ = equivalent.simulate(
        protocol, equivalent.COMPLETE, rounds, peer_names="keys"
    )
    keys = equivalent.identities(equivalent.PEERS, keyring=True)
    on_nodes = asyncio.run(
        equivalent.run_nodes(
            tmp_path, protocol, rounds, None, equivalent.memory_transports(), keys
        )
    )
    worst, where = equivalent.largest_difference(simulated, on_nodes)
    assert worst <= equivalent.TOLERANCE, f"drivers diverge by {worst:.3g} at {where}"
    last = max(on_nodes[0])
    models = [on_nodes[peer][last] for peer in range(equivalent.PEERS)]
    assert all(torch.equal(models[0], m) for m in models[1:])  # one model on every node
    config = NodeConfig.model_validate(
        {**equivalent.SHARED, "protocol": protocol, "peer_index": 0, "num_peers": 8}
    )
    from p2pfl.peer import build_commons

    start = build_commons(
        config.data, config.model, config.protocol, seed=equivalent.SEED, shares=8
    ).start
    before, after = node_accuracy(start), node_accuracy(models[0])
    print(f"nodes: accuracy {before:.3f} -> {after:.3f} in {last + 1} steps; sim vs node {worst:.3g}")
    assert after >= before + 0.15, (before, after)


def test_a_node_and_the_simulator_assemble_the_same_peer(tmp_path: Path) -> None:
    """The same pre-trained start, data share, batches and settings in both drivers."""
    from tests import test_peer

    protocol = {**ZO, "pretrain_steps": 5}
    simulation = test_peer._simulation(protocol)
    node = test_peer._node(tmp_path, protocol, test_peer.INDEX)
    simulated = simulation.engine.protocols[test_peer.INDEX]
    others = [f"peer{j}" for j in range(test_peer.PEERS - 1)]
    node.met.update(others)
    built = node._new_protocol(others)
    assert type(built) is type(simulated) is ZerothOrder
    assert torch.equal(built.params, simulated.params)
    plain_start = build_simulation(
        scenario_from_dict({**test_peer.SHARED, "rounds": 1, "topology": {"kind": "complete", "n": 5},
                            "protocol": {**protocol, "pretrain_steps": 0}})
    ).engine.protocols[0].params
    assert not torch.equal(built.params, plain_start)  # it was pre-trained
    assert isinstance(built, ZerothOrder) and isinstance(simulated, ZerothOrder)
    for key in ("lr", "eps", "grad_scale", "round_timeout", "weight"):
        assert getattr(built, key) == getattr(simulated, key), key


# ---------------------------------------------------------------- the protocol, unit by unit


def peer(name: str = "a", neighbours: tuple[str, ...] = ("b", "c"), dim: int = 50) -> ZerothOrder:
    return ZerothOrder(name, torch.zeros(dim), list(neighbours), lr=0.1, grad_scale=0.01, seed=3)


def probe(protocol: ZerothOrder, now: float, losses: tuple[float, float]) -> list[Any]:
    """Start a step and answer its loss evaluation."""
    ask = [e for e in protocol.handle(Start(now)) if isinstance(e, EvaluateLosses)]
    assert len(ask) == 1 and len(ask[0].params) == 2
    return protocol.handle(LossesEvaluated(now, ask[0].ticket, list(losses)))


def scalar(step: int, g: Any, **meta: Any) -> Message:
    return Message(SCALAR, step, None, {"g": g, **meta})


def test_directions_are_shared_randomness() -> None:
    z = direction(5, "peer", 3, 1000)
    assert torch.equal(z, direction(5, "peer", 3, 1000))
    assert not torch.equal(z, direction(5, "peer", 4, 1000))
    assert not torch.equal(z, direction(5, "other", 3, 1000))
    assert not torch.equal(z, direction(6, "peer", 3, 1000))
    assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1.0) < 0.1


def test_a_projected_gradient_travels_as_one_clipped_byte() -> None:
    assert quantize(0.123, 0.01) == (12, False)
    assert quantize(-1.27, 0.01) == (-127, False)
    assert quantize(5.0, 0.01) == (127, True)
    assert quantize(-5.0, 0.01) == (-127, True)
    protocol = peer()
    effects = probe(protocol, 0.0, (1.002, 1.0))  # g = 0.002 / 2e-3 = 1.0 -> q = 100
    sends = [e for e in effects if isinstance(e, Send)]
    assert sorted(s.to for s in sends) == ["b", "c"]
    message = sends[0].message
    assert message.params is None and message.meta == {"g": 100} and message.round == 0
    assert message.nbytes() < 200  # the envelope's estimate plus about a dozen bytes


def test_the_update_replays_every_peers_perturbation() -> None:
    protocol = peer()
    probe(protocol, 0.0, (1.002, 1.0))  # own byte: 100
    protocol.handle(MessageReceived(0.1, "c", scalar(0, -20)))
    effects = protocol.handle(MessageReceived(0.1, "b", scalar(0, 7)))
    assert any(isinstance(e, RoundCompleted) and e.round == 0 for e in effects)
    expected = torch.zeros(50)
    for name, q in (("a", 100), ("b", 7), ("c", -20)):
        expected -= 0.1 / 3 * q * 0.01 * direction(3, name, 0, 50)
    assert torch.allclose(protocol.params, expected, atol=1e-6)
    assert protocol.round == 1


def test_a_late_scalar_is_applied_on_arrival_and_the_models_meet_again() -> None:
    on_time, late = peer(), peer()
    for protocol in (on_time, late):
        probe(protocol, 0.0, (1.002, 1.0))
        protocol.handle(MessageReceived(0.1, "b", scalar(0, 7)))
    on_time.handle(MessageReceived(0.1, "c", scalar(0, -20)))
    effects = late.handle(TimerFired(1.0, ROUND_TIMER))  # c's byte is not here by the deadline
    assert any(isinstance(e, Record) and e.name == "round_timeouts" for e in effects)
    assert late.round == 1 and not torch.allclose(late.params, on_time.params)
    effects = late.handle(MessageReceived(1.5, "c", scalar(0, -20)))
    assert [e.name for e in effects if isinstance(e, Record)] == ["zo.late_applied"]
    assert torch.allclose(late.params, on_time.params, atol=1e-7)
    # the same byte again changes nothing
    effects = late.handle(MessageReceived(1.6, "c", scalar(0, -20)))
    assert [e.name for e in effects if isinstance(e, Record)] == ["zo.duplicate"]
    assert torch.allclose(late.params, on_time.params, atol=1e-7)


def test_a_scalar_beyond_the_late_window_is_dropped_and_counted() -> None:
    protocol = peer(neighbours=("b",))
    probe(protocol, 0.0, (1.0, 1.0))
    for step in range(LATE_ROUNDS + 1):  # b's bytes are lost: every step times out
        protocol.handle(TimerFired(float(step + 1), ROUND_TIMER))
        protocol.handle(LossesEvaluated(float(step + 1), protocol._next_ticket, [1.0, 1.0]))
    before = protocol.params.clone()
    effects = protocol.handle(MessageReceived(9.0, "b", scalar(0, 50)))
    assert [e.name for e in effects if isinstance(e, Record)] == ["zo.dropped_stale"]
    assert torch.equal(protocol.params, before)


HOSTILE: list[tuple[str, str, Message, Refusal]] = [
    ("nan", "b", scalar(0, math.nan), Refusal.BAD_FIELD),
    ("inf", "b", scalar(0, math.inf), Refusal.BAD_FIELD),
    ("huge", "b", scalar(0, 10**9), Refusal.BAD_FIELD),
    ("one past the byte", "b", scalar(0, 128), Refusal.BAD_FIELD),
    ("a float", "b", scalar(0, 0.5), Refusal.BAD_FIELD),
    ("a bool", "b", scalar(0, True), Refusal.BAD_FIELD),
    ("no byte", "b", Message(SCALAR, 0, None, {}), Refusal.BAD_FIELD),
    ("an extra field", "b", scalar(0, 1, extra=1), Refusal.BAD_FIELD),
    ("a tensor", "b", Message(SCALAR, 0, torch.zeros(50), {"g": 1}), Refusal.BAD_TENSOR),
    ("a stranger", "z", scalar(0, 1), Refusal.NOT_ALLOWED),
    ("a far-future step", "b", scalar(LEAD_ROUNDS + 1, 1), Refusal.FUTURE_ROUND),
    ("a negative step", "b", scalar(-1, 1), Refusal.BAD_FIELD),
    ("another kind", "b", Message("model", 0, torch.zeros(50)), Refusal.UNKNOWN_KIND),
]


@pytest.mark.parametrize(("case", "sender", "message", "refusal"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_the_contract_refuses_hostile_scalars(
    case: str, sender: str, message: Message, refusal: Refusal
) -> None:
    assert peer().screen(sender, message) is refusal, case
    assert peer().screen("b", scalar(0, -127)) is None


def test_hostile_scalars_in_a_simulation_are_dropped_counted_and_change_nothing() -> None:
    """A run where p1 is made to send p0 every hostile scalar besides its own: the engine
    counts each refusal by reason, and every peer still ends with the same model as a run
    without them."""
    clean = build_simulation(scenario(6))
    run_simulation(clean, show_progress=False)
    attacked = build_simulation(scenario(6))
    engine = attacked.engine

    def inject(now: float) -> None:
        for _, sender, message, _ in HOSTILE:  # "b" is neighbour p1, "z" a stranger
            engine._push(now, 0, MessageReceived(now, "p1" if sender == "b" else "p9", message))

    engine.schedule(0.005, inject)
    run_simulation(attacked, show_progress=False)
    assert sum(engine.refusals.values()) == len(HOSTILE)
    assert engine.records[f"refused.{Refusal.BAD_FIELD.value}"] >= 8
    for a, b in zip(clean.engine.protocols, engine.protocols, strict=True):
        assert torch.equal(a.params, b.params)


def test_the_hostile_peer_fuzzer_breaks_no_invariant() -> None:
    """``sim.fuzz``'s hostile peer (every category of message, and floods) against the
    protocol: no honest peer raises, every malformed message is refused and counted, the
    honest peers' accuracy stays within the fuzzer's margins."""
    from sim.fuzz import FuzzOptions, fuzz_scenario, run_fuzz

    raw = fuzz_scenario("dpsgd", rounds=30, n=8)  # its network and data; our protocol
    raw.update(
        name="fuzz-zeroth-order",
        topology={"kind": "complete", "n": 8},
        protocol={**ZO, "round_timeout": 0.1},
        model={"name": "mlp", "hidden": [16], "lr": 0.1},
    )
    result = run_fuzz(raw, options=FuzzOptions(seed=0))
    assert result.messages > 50 and sum(result.refused_hostile.values()) > 0
    assert result.ok, result.violations


def test_a_duplicate_byte_for_the_current_step_counts_once() -> None:
    protocol = peer()
    probe(protocol, 0.0, (1.0, 1.0))
    protocol.handle(MessageReceived(0.1, "b", scalar(0, 9)))
    effects = protocol.handle(MessageReceived(0.1, "b", scalar(0, -127)))
    assert [e.name for e in effects if isinstance(e, Record)] == ["zo.duplicate"]
    assert protocol.inbox[0]["b"] == 9


def test_a_peer_without_a_gradient_sends_zero_and_its_neighbours_do_not_wait() -> None:
    protocol = peer()
    effects = probe(protocol, 0.0, (math.nan, math.nan))
    sends = [e for e in effects if isinstance(e, Send)]
    assert [s.message.meta for s in sends] == [{"g": 0}, {"g": 0}]
    assert any(isinstance(e, Record) and e.name == "zo.no_gradient" for e in effects)


def test_a_checkpoint_keeps_the_step_the_model_and_what_was_applied(tmp_path: Path) -> None:
    protocol = peer()
    probe(protocol, 0.0, (1.002, 1.0))
    protocol.handle(MessageReceived(0.1, "b", scalar(0, 7)))
    protocol.handle(TimerFired(1.0, ROUND_TIMER))
    protocol.handle(MessageReceived(1.1, "b", scalar(1, 3)))  # early for the next step
    restored = peer()
    restored.load_state_dict(protocol.state_dict())
    assert restored.round == 1 and torch.equal(restored.params, protocol.params)
    assert restored.inbox == {1: {"b": 3}}
    assert restored.applied[0] == {"a", "b"}
    effects = restored.handle(MessageReceived(2.0, "b", scalar(0, 7)))
    assert [e.name for e in effects if isinstance(e, Record)] == ["zo.duplicate"]


# ---------------------------------------------------------------- what the drivers serve


def test_losses_are_taken_on_one_batch_and_advance_the_sampler_by_one() -> None:
    dataset = load_dataset("digits", seed=0)
    net = build_model("mlp", dataset.input_shape, dataset.num_classes, hidden=(8,))
    trainer = LocalTrainer(net, dataset.x_train, dataset.y_train, lr=0.1, batch_size=16)
    x = trainer.init_params(0)
    sampler = BatchSampler(torch.arange(100).numpy(), 16, 4)
    twin = BatchSampler(torch.arange(100).numpy(), 16, 4)
    losses = batch_losses(trainer, sampler, [x, x, x + 0.1])
    assert losses[0] == losses[1] and losses[0] != losses[2]
    _, loss = trainer.train(x, twin, 1)  # one step's loss is taken before its update
    assert math.isclose(losses[0], loss, rel_tol=1e-5)
    assert sampler.next_batch().tolist() == twin.next_batch().tolist()
    assert all(math.isnan(v) for v in batch_losses(trainer, None, [x, x]))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"local_steps": 2}, "local_steps must be 1"),
        ({"codec": "fp16"}, "codec must be 'fp32'"),
        ({"aggregator": "median"}, "aggregator must be 'mean'"),
        ({"grad_scale": 0}, "grad_scale"),
        ({"shared_start": {"steps": 5}}, "not both"),
    ],
)
def test_settings_it_cannot_honour_are_refused(change: dict[str, Any], words: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=words):
        scenario(5, {**ZO, **change})
