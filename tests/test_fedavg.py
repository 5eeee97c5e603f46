"""Federated averaging: the server/client protocol, its contract, both drivers.

Hand-checked cases on the sans-I/O object (sampling, the sample-weighted mean, the round
timer, unreachable clients), the contract refusing what only the server or a sampled
client may send, convergence on digits in the simulator, and the same parameters on
memory-transport nodes as in the simulator.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pfl.learning import evaluate
from p2pfl.protocols.base import (
    Message,
    MessageReceived,
    PeerDown,
    Record,
    RoundCompleted,
    Send,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols.contract import Refusal
from p2pfl.protocols.fedavg import GLOBAL, ROUND, ROUND_TIMER, SAMPLES, UPDATE, FedAvg
from sim.mixing import plain
from sim.runner import build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict

pytestmark = pytest.mark.timeout(240)

CLIENTS = ["a", "b", "c", "d"]


def server(k: int = 2, **options: Any) -> FedAvg:
    return FedAvg("s", torch.zeros(3), CLIENTS, server="s", clients_per_round=k, **options)


def client(name: str = "a", samples: int = 5) -> FedAvg:
    return FedAvg(name, torch.zeros(3), ["s"], server="s", samples=samples)


def sends(effects: list[Any], kind: str) -> list[Send]:
    return [e for e in effects if isinstance(e, Send) and e.message.kind == kind]


def update(sender: str, round_: int, value: float, n: int) -> MessageReceived:
    message = Message(UPDATE, round_, torch.full((3,), value), {SAMPLES: n})
    return MessageReceived(1.0, sender, message)


# ----------------------------------------------------------------- the protocol by hand


def test_server_samples_k_distinct_clients_and_averages_by_sample_count() -> None:
    peer = server(k=2)
    effects = peer.handle(Start(0.0))
    out = sends(effects, GLOBAL)
    sampled = sorted(s.to for s in out)
    assert len(sampled) == 2 and len(set(sampled)) == 2 and set(sampled) <= set(CLIENTS)
    assert all(s.message.round == 0 for s in out)
    assert any(isinstance(e, SetTimer) and e.name == ROUND_TIMER for e in effects)
    first, second = sampled
    assert peer.handle(update(first, 0, 1.0, 1)) == []  # still waiting for the other
    done = peer.handle(update(second, 0, 5.0, 3))
    # FedAvg's n_k / n weights: (1 * 1 + 3 * 5) / 4 = 4
    assert torch.allclose(peer.params, torch.full((3,), 4.0))
    assert RoundCompleted(0) in done and peer.round == 1
    assert len(sends(done, GLOBAL)) == 2  # round 1 opened at once
    assert all(s.message.round == 1 for s in sends(done, GLOBAL))


def test_every_client_is_sampled_over_rounds_and_the_draw_is_seeded() -> None:
    def draws(seed: int) -> list[list[str]]:
        peer = FedAvg("s", torch.zeros(3), CLIENTS, server="s", clients_per_round=1, seed=seed)
        effects = peer.handle(Start(0.0))
        history = []
        for round_ in range(20):
            (only,) = sends(effects, GLOBAL)
            history.append([only.to])
            effects = peer.handle(update(only.to, round_, 0.0, 1))
        return history

    assert draws(3) == draws(3)
    assert {name for (name,) in draws(3)} == set(CLIENTS)


def test_a_lost_client_does_not_stall_the_round() -> None:
    peer = server(k=2)
    sampled = sorted(s.to for s in sends(peer.handle(Start(0.0)), GLOBAL))
    peer.handle(update(sampled[0], 0, 2.0, 4))
    effects = peer.handle(TimerFired(5.0, ROUND_TIMER))  # the other never answers
    assert RoundCompleted(0) in effects and Record("round_timeouts", 1.0) in effects
    assert torch.allclose(peer.params, torch.full((3,), 2.0))
    # no update at all by the timer: the round ends with the global model unchanged
    effects = peer.handle(TimerFired(10.0, ROUND_TIMER))
    assert RoundCompleted(1) in effects and Record("fedavg.empty_rounds", 1.0) in effects
    assert torch.allclose(peer.params, torch.full((3,), 2.0))


def test_an_unreachable_client_ends_the_wait_and_is_not_sampled_again() -> None:
    peer = server(k=2)
    sampled = sorted(s.to for s in sends(peer.handle(Start(0.0)), GLOBAL))
    peer.handle(update(sampled[0], 0, 1.0, 1))
    effects = peer.handle(PeerDown(1.0, sampled[1]))
    assert RoundCompleted(0) in effects  # no need to wait for the timer
    for round_ in range(1, 10):
        out = sends(effects, GLOBAL)
        assert sampled[1] not in {s.to for s in out}
        effects = []
        for s in out:
            effects += peer.handle(update(s.to, round_, 0.0, 1))


def test_a_client_trains_the_global_model_and_sends_its_update() -> None:
    peer = client("a", samples=7)
    assert peer.handle(Start(0.0)) == []  # a client waits for the server
    model = torch.tensor([1.0, 2.0, 3.0])
    effects = peer.handle(MessageReceived(0.5, "s", Message(GLOBAL, 4, model)))
    assert RoundCompleted(3) in effects  # the global of round 4 ends round 3
    train = next(e for e in effects if isinstance(e, Train))
    assert torch.equal(train.params, model) and torch.equal(peer.params, model)
    out = peer.handle(TrainingDone(1.0, train.ticket, torch.ones(3), 0.5))
    (reply,) = sends(out, UPDATE)
    assert reply.to == "s" and reply.message.round == 4 and reply.message.meta == {SAMPLES: 7}
    # the same global again (a retransmission) trains nothing
    assert not any(
        isinstance(e, Train)
        for e in peer.handle(MessageReceived(2.0, "s", Message(GLOBAL, 4, model)))
    )
    # the server's leave notice completes the rounds a client was not sampled for
    assert peer.handle(MessageReceived(3.0, "s", Message(ROUND, 9))) == [RoundCompleted(8)]


# ----------------------------------------------------------------- the contract (hostile)


def test_only_the_server_may_send_the_global_model() -> None:
    victim = client("a")
    forged = Message(GLOBAL, 0, torch.zeros(3))
    assert victim.screen("b", forged) is Refusal.NOT_ALLOWED  # another client
    assert victim.screen("s", forged) is None
    assert victim.screen("s", Message(ROUND, 3)) is None
    assert victim.screen("b", Message(ROUND, 3)) is Refusal.NOT_ALLOWED
    # the server takes no global model from anyone
    assert server().screen("a", forged) is Refusal.NOT_ALLOWED
    # a client takes no updates
    assert victim.screen("s", Message(UPDATE, 0, torch.zeros(3), {SAMPLES: 1})) is (
        Refusal.NOT_ALLOWED
    )


def test_only_the_sampled_clients_may_send_that_rounds_update() -> None:
    peer = server(k=2)
    sampled = {s.to for s in sends(peer.handle(Start(0.0)), GLOBAL)}
    outsider = next(c for c in CLIENTS if c not in sampled)
    insider = min(sampled)
    good = Message(UPDATE, 0, torch.zeros(3), {SAMPLES: 10})
    assert peer.screen(insider, good) is None
    assert peer.screen(outsider, good) is Refusal.NOT_ALLOWED
    assert peer.screen(insider, Message(UPDATE, 1, torch.zeros(3), {SAMPLES: 1})) is (
        Refusal.NOT_ALLOWED  # not sampled for round 1 (not drawn yet)
    )
    assert peer.screen(insider, Message(UPDATE, 0, torch.zeros(3))) is Refusal.BAD_FIELD
    bad_count = Message(UPDATE, 0, torch.zeros(3), {SAMPLES: 0})
    assert peer.screen(insider, bad_count) is Refusal.BAD_FIELD
    wrong_dtype = Message(UPDATE, 0, torch.zeros(3, dtype=torch.float64), {SAMPLES: 1})
    assert peer.screen(insider, wrong_dtype) is Refusal.BAD_TENSOR
    wrong_size = Message(UPDATE, 0, torch.zeros(4), {SAMPLES: 1})
    assert peer.screen(insider, wrong_size) is Refusal.BAD_TENSOR
    huge = Message(UPDATE, 0, torch.full((3,), float("nan")), {SAMPLES: 1})
    assert peer.screen(insider, huge) is Refusal.TOO_LARGE


def test_the_simulator_refuses_a_forged_global_from_a_client() -> None:
    """In a run over a complete graph (the message is routable), a client that sends
    ``global`` to another is refused by the receiver's contract and counted; the victim
    never trains on it."""
    simulation = build_simulation(_scenario(rounds=2, topology={"kind": "complete", "n": 6}))
    engine = simulation.engine
    forged = Message(GLOBAL, 0, torch.full((engine.protocols[2].message_dim,), 50.0))
    engine._send(1, Send("p2", forged), forged.nbytes())  # p1 -> p2 at time 0
    run_simulation(simulation, show_progress=False)
    assert engine.refusals[Refusal.NOT_ALLOWED.value] == 1
    assert float(plain(engine.protocols[2].params).abs().max()) < 50.0


# ----------------------------------------------------------------- the simulator


def _scenario(rounds: int, **overrides: Any) -> Any:
    raw: dict[str, Any] = {
        "name": "fedavg",
        "seed": 1,
        "rounds": rounds,
        "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
        "topology": {"kind": "star", "n": 6},
        "protocol": {"name": "fedavg", "local_steps": 10, "clients_per_round": 2},
        "sim": {"eval_every": rounds},
    }
    raw.update(overrides)
    return scenario_from_dict(raw)


def test_fedavg_converges_on_digits_in_the_simulator() -> None:
    """Star of 11 (server + 10 clients), 5 sampled per round, 30 rounds: the server's
    model reaches 0.88 test accuracy (observed 0.922, seed 1)."""
    scenario = _scenario(
        30,
        topology={"kind": "star", "n": 11},
        protocol={"name": "fedavg", "local_steps": 10, "clients_per_round": 5},
    )
    simulation = build_simulation(scenario)
    run_simulation(simulation, show_progress=False)
    engine = simulation.engine
    the_server = engine.protocols[0]
    assert isinstance(the_server, FedAvg) and the_server.is_server and the_server.round == 30
    assert engine.records["fedavg.sampled"] == 5 * 31  # rounds 0..30 opened
    assert engine.records.get("round_timeouts", 0) == 0
    dataset = simulation.dataset
    result = evaluate(
        simulation.trainer, plain(the_server.params)[None], dataset.x_test, dataset.y_test
    )
    accuracy = float(result.accuracy[0])
    print(f"fedavg digits server accuracy after 30 rounds: {accuracy:.3f}")
    assert accuracy >= 0.88
    # clients' updates are weighted by their data shares (the assembly's sample counts)
    clients = [p for p in engine.protocols[1:] if isinstance(p, FedAvg)]
    assert len(clients) == len(engine.protocols) - 1
    assert [p.samples for p in clients] == [int(n) for n in simulation.data_sizes[1:]]


def test_a_bad_population_is_one_line() -> None:
    with pytest.raises(ScenarioError, match="clients_per_round=9 exceeds the 5 clients"):
        _scenario(2, protocol={"name": "fedavg", "clients_per_round": 9})
    with pytest.raises(ScenarioError, match="protocol.server=6 must be < topology.n=6"):
        _scenario(2, protocol={"name": "fedavg", "server": 6, "clients_per_round": 2})


# ----------------------------------------------------------------- both drivers


@pytest.mark.parametrize("name", ["fedavg", "foolsgold"])
def test_memory_transport_nodes_compute_the_simulators_parameters(
    tmp_path: Path, name: str
) -> None:
    """Eight nodes (server = node 0, the smallest id, = simulated p0), three clients per
    round: the server's global model after each of 12 rounds, and every client's model
    at each round it completed, equal the simulator's within 1e-5 (observed 9e-8)."""
    from tests.test_drivers_equivalent import (
        COMPLETE,
        PEERS,
        TOLERANCE,
        memory_transports,
        run_nodes,
        simulate,
    )

    protocol = {
        "name": name,
        "local_steps": 5,
        "clients_per_round": 3,
        "round_timeout": 60.0,  # never fires in either driver
    }
    rounds = 12
    simulated, _ = simulate(protocol, COMPLETE, rounds)
    on_nodes = asyncio.run(run_nodes(tmp_path, protocol, rounds, None, memory_transports()))
    assert sorted(simulated[0]) == sorted(on_nodes[0]) == list(range(rounds))
    worst, compared = 0.0, 0
    for peer in range(PEERS):
        common = sorted(set(simulated.get(peer, {})) & set(on_nodes.get(peer, {})))
        assert peer == 0 or common, f"client {peer} completed no round in both drivers"
        for round_ in common:
            diff = float((simulated[peer][round_] - on_nodes[peer][round_]).abs().max())
            worst, compared = max(worst, diff), compared + 1
    print(f"{name}: largest difference {worst:.3g} over {compared} snapshots")
    assert worst <= TOLERANCE


def test_the_server_is_named_by_index_or_by_id() -> None:
    from p2pfl.config import FedAvgConfig
    from p2pfl.protocols.registry import fedavg_server

    by_index = FedAvgConfig(name="fedavg", server=2)
    assert fedavg_server(by_index, "p0", ["p0", "p1", "p2"]) == "p2"
    by_id = FedAvgConfig(name="fedavg", server_id="12D3KooWserver")
    assert fedavg_server(by_id, "p0", ["p0", "p1"]) == "12D3KooWserver"
    with pytest.raises(ValueError, match="protocol.server=2 is not among the 1 known peers"):
        fedavg_server(by_index, "p0", None)


@pytest.mark.parametrize(
    "name", ["fedavg_digits.toml", "foolsgold_sybils.toml", "attack_schedule.toml"]
)
def test_the_baseline_examples_are_valid(name: str) -> None:
    from sim.scenario import load_scenario

    examples = Path(__file__).resolve().parent.parent / "examples" / "baselines"
    scenario = load_scenario(examples / name)
    assert scenario.rounds >= 20


def test_crashed_clients_cost_a_timeout_once_and_the_run_goes_on() -> None:
    """Half of the clients crash at round 5 (nobody is told): the rounds that sampled
    them end at the timer, the server then skips them (failed sends) and the run reaches
    its 20 rounds, still learning."""
    scenario = _scenario(
        20,
        topology={"kind": "star", "n": 11},
        protocol={
            "name": "fedavg",
            "local_steps": 10,
            "clients_per_round": 4,
            "round_timeout": 2.0,
        },
        disruptions=[{"kind": "crash", "peers": [1, 2, 3, 4, 5], "at_round": 5}],
    )
    simulation = build_simulation(scenario)
    rows = run_simulation(simulation, show_progress=False)
    engine = simulation.engine
    the_server = engine.protocols[0]
    assert isinstance(the_server, FedAvg) and the_server.round == 20
    assert {f"p{i}" for i in range(1, 6)} <= the_server.unreachable
    assert 1 <= engine.records["round_timeouts"] <= 5
    dataset = simulation.dataset
    accuracy = float(
        evaluate(
            simulation.trainer, plain(the_server.params)[None], dataset.x_test, dataset.y_test
        ).accuracy[0]
    )
    print(f"fedavg with 5 of 10 clients crashed: {accuracy:.3f}, rows {len(rows)}")
    assert accuracy >= 0.8


def test_a_robust_rule_gets_the_previous_global_model_as_row_zero() -> None:
    """``aggregator = "median"``: the median of (global 0, update 1, update 5) is 1 (the
    weighted mean would be 3)."""
    from p2pfl.aggregation import get_aggregator

    peer = server(k=2, aggregate=get_aggregator("median"))
    sampled = sorted(s.to for s in sends(peer.handle(Start(0.0)), GLOBAL))
    peer.handle(update(sampled[0], 0, 1.0, 1))
    peer.handle(update(sampled[1], 0, 5.0, 1))
    assert torch.allclose(peer.params, torch.full((3,), 1.0))
