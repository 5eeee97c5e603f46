"""Attacks on a schedule: honest before ``start_round``, after ``stop_round`` and in the
off part of an on-off cycle; attacking in the rounds the schedule names, exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pfl.attacks import ByzantineProtocol, get_attack
from p2pfl.attacks.behaviour import DELAY_TIMER
from p2pfl.attacks.schedule import AttackSchedule
from p2pfl.config import NodeAttackConfig
from p2pfl.protocols.base import (
    Message,
    MessageReceived,
    Send,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols.dpsgd import DPSGD
from p2pfl.protocols.synchronous import MODEL
from sim.mixing import plain
from sim.runner import build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict

pytestmark = pytest.mark.timeout(120)

#: attack in rounds 5, 6, 9, 10, 13, 14 (hand-checked: two of every four from 5, stop 15)
ON_OFF = AttackSchedule(start_round=5, stop_round=15, period=4, duty=2)


def test_the_active_rounds_of_a_schedule_by_hand() -> None:
    assert [r for r in range(20) if ON_OFF.active(r)] == [5, 6, 9, 10, 13, 14]
    assert [r for r in range(8) if AttackSchedule(start_round=3).active(r)] == [3, 4, 5, 6, 7]
    assert [r for r in range(8) if AttackSchedule(stop_round=2).active(r)] == [0, 1]
    assert [r for r in range(7) if AttackSchedule(period=3, duty=1).active(r)] == [0, 3, 6]
    assert AttackSchedule().always and AttackSchedule(period=2, duty=2).always
    assert not ON_OFF.always and not AttackSchedule(start_round=1).always


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"start_round": 4, "stop_round": 4}, "stop_round must be > start_round=4"),
        ({"period": 3}, "give period and duty together"),
        ({"period": 3, "duty": 4}, "duty must be in [1, period=3]"),
        ({"start_round": -1}, "attack.start_round"),
    ],
)
def test_a_bad_schedule_is_one_line(table: dict[str, Any], message: str) -> None:
    raw = {"attack": {"name": "sign_flip", "count": 1, **table}}
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_node_attack_takes_the_same_schedule() -> None:
    attack = NodeAttackConfig(name="sign_flip", start_round=5, stop_round=15, period=4, duty=2)
    assert attack.build(10).schedule == ON_OFF


# ------------------------------------------------------------- the wrapper, round by round


def drive(peer: ByzantineProtocol, rounds: int) -> tuple[dict[int, bool], list[float]]:
    """Run ``peer`` (D-PSGD with one neighbour ``b``) for ``rounds`` rounds; say per round
    whether what it sent was crafted (not the model it trained), and its model after each
    round. Training adds 1 to every entry; ``b`` sends zeros."""
    crafted: dict[int, bool] = {}
    after: list[float] = []
    effects = peer.handle(Start(0.0))
    now = 0.0
    for round_ in range(rounds):
        train = next(e for e in effects if isinstance(e, Train))
        trained = train.params + 1.0
        now += 1.0
        effects = peer.handle(TrainingDone(now, train.ticket, trained))
        held = [e for e in effects if isinstance(e, SetTimer) and e.name == DELAY_TIMER]
        if held:  # a rushing attacker: its crafted model leaves at the delay timer
            assert not any(isinstance(e, Send) for e in effects)
            effects = peer.handle(TimerFired(held[0].at, DELAY_TIMER))
        (send,) = [e for e in effects if isinstance(e, Send)]
        assert send.message.round == round_ and send.message.params is not None
        crafted[round_] = not torch.equal(send.message.params, trained)
        reply = Message(MODEL, round_, torch.zeros(3))
        effects = peer.handle(MessageReceived(now, "b", reply))
        after.append(float(peer.params[0]))
    return crafted, after


def test_a_model_attack_crafts_in_the_scheduled_rounds_only() -> None:
    attack = get_attack("sign_flip", scale=2.0).scheduled(ON_OFF)
    inner = DPSGD("a", torch.zeros(3), ["b"], weights={"b": 0.5})
    peer = ByzantineProtocol(inner, attack, delay=0.25)
    crafted, _ = drive(peer, 18)
    assert [r for r, yes in crafted.items() if yes] == [5, 6, 9, 10, 13, 14]
    assert peer.report()["crafted_messages"] == 6 and peer.report()["honest_messages"] == 12


def test_isolation_only_in_active_rounds() -> None:
    """Hand-checked, weights 1/2 each, training adds 1, ``b`` sends zeros. Honest rounds
    0, 1: (1 + 0)/2 = 0.5, (1.5 + 0)/2 = 0.75. Active rounds 2, 3 (sign flip, scale 1):
    it sends 0.75 - (1.75 - 0.75) = -0.25 and, isolated, hears that instead of ``b``'s
    zeros: (1.75 - 0.25)/2 = 0.75 (not 0.875, which hearing ``b`` would give)."""
    attack = get_attack("sign_flip", scale=1.0).scheduled(AttackSchedule(start_round=2))
    inner = DPSGD("a", torch.zeros(3), ["b"], weights={"b": 0.5})
    crafted, after = drive(ByzantineProtocol(inner, attack, isolate=True), 4)
    assert crafted == {0: False, 1: False, 2: True, 3: True}
    assert after == [0.5, 0.75, 0.75, 0.75]


def test_a_data_attack_poisons_the_batches_of_active_rounds_only() -> None:
    attack = get_attack("label_flip", num_classes=10).scheduled(AttackSchedule(start_round=3))
    assert attack.trains and attack.batch_transform is not None
    peer = ByzantineProtocol(DPSGD("a", torch.zeros(3), ["b"]), attack)
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 2, 3])
    flipped: list[bool] = []
    effects = peer.handle(Start(0.0))
    for round_ in range(6):
        train = next(e for e in effects if isinstance(e, Train))
        _, labels = attack.batch_transform(x, y)  # what the driver's trainer now applies
        flipped.append(not torch.equal(labels, y))
        peer.handle(TrainingDone(1.0 + round_, train.ticket, train.params))
        effects = peer.handle(
            MessageReceived(1.0 + round_, "b", Message(MODEL, round_, torch.zeros(3)))
        )
    assert flipped == [False, False, False, True, True, True]


def test_a_scheduled_free_rider_trains_in_its_honest_rounds() -> None:
    always = get_attack("free_rider")
    assert not always.trains
    assert always.scheduled(AttackSchedule(start_round=4)).trains


# ------------------------------------------------------------- in the simulator

BASE: dict[str, Any] = {
    "name": "schedule",
    "seed": 2,
    "rounds": 12,
    "data": {"dataset": "digits", "partition": "iid", "batch_size": 16},
    "model": {"name": "mlp", "hidden": [32], "lr": 0.1},
    "topology": {"kind": "ring", "n": 10},
    "protocol": {"name": "dpsgd", "local_steps": 5},
    "sim": {"eval_every": 1},
}
SIGN_FLIP = {"name": "sign_flip", "params": {"scale": 4.0}, "count": 2}


def snapshots(simulation: Any) -> dict[int, dict[int, torch.Tensor]]:
    """Each peer's parameters at every round it completes, recorded while it runs."""
    from p2pfl.protocols.base import RoundCompleted

    engine = simulation.engine
    seen: dict[int, dict[int, torch.Tensor]] = {}

    def on_handled(peer: int, event: Any, effects: list[Any]) -> None:
        for effect in effects:
            if isinstance(effect, RoundCompleted):
                seen.setdefault(peer, {})[effect.round] = plain(
                    engine.protocols[peer].params
                ).clone()

    engine.on_handled(on_handled)
    return seen


def test_honest_for_five_rounds_then_attacking() -> None:
    """Two sign-flippers (scale 4) on a ring of 10 that start in round 5: up to round 5
    the honest peers' models and accuracy are the undisturbed run's, exactly; after it
    the attack shows (observed: 0.62 undisturbed vs 0.38 attacked at round 12)."""
    attacked = build_simulation(
        scenario_from_dict({**BASE, "attack": {**SIGN_FLIP, "start_round": 5}})
    )
    assert attacked.adversary is not None
    honest = [int(i) for i in attacked.adversary.honest]
    clean = build_simulation(scenario_from_dict(BASE))
    clean.evaluator.peer_sample = attacked.adversary.honest  # the same peers measured
    models_attacked, models_clean = snapshots(attacked), snapshots(clean)
    rows_attacked = run_simulation(attacked, show_progress=False)
    rows_clean = run_simulation(clean, show_progress=False)

    for clean_row, attacked_row in zip(rows_clean, rows_attacked, strict=True):
        assert clean_row["round"] == attacked_row["round"]
        if clean_row["round"] <= 5:  # rounds 0..4 done: no crafted model sent yet
            assert attacked_row["acc_mean"] == clean_row["acc_mean"]
    for peer in honest:
        for round_ in range(5):
            assert torch.equal(models_attacked[peer][round_], models_clean[peer][round_])
    # round 5 reaches the attackers' honest neighbours on the ring; round 11 everyone
    first_hit = {p for p in honest if not torch.equal(models_attacked[p][5], models_clean[p][5])}
    byzantine = set(int(i) for i in attacked.adversary.malicious)
    assert first_hit == {p for b in byzantine for p in attacked.graph.neighbors(b)} - byzantine
    assert all(not torch.equal(models_attacked[p][11], models_clean[p][11]) for p in honest)
    gap = rows_clean[-1]["acc_mean"] - rows_attacked[-1]["acc_mean"]
    print(
        f"round 12: undisturbed {rows_clean[-1]['acc_mean']:.3f}, attacked {rows_attacked[-1]['acc_mean']:.3f}"
    )
    assert gap >= 0.15


def test_on_off_attack_crafts_in_exactly_the_scheduled_rounds() -> None:
    """In a run, every model a Byzantine peer sends in rounds 2, 5, 8 (period 3, duty 1,
    from round 2, stop 10) is crafted, and every other one is the trained model."""
    attack = {**SIGN_FLIP, "start_round": 2, "stop_round": 10, "period": 3, "duty": 1}
    simulation = build_simulation(scenario_from_dict({**BASE, "attack": attack}))
    assert simulation.adversary is not None
    engine = simulation.engine
    byzantine = [int(i) for i in simulation.adversary.malicious]
    crafted: dict[int, set[int]] = {i: set() for i in byzantine}
    honest: dict[int, set[int]] = {i: set() for i in byzantine}
    counts = {i: (0, 0) for i in byzantine}

    def on_handled(peer: int, event: Any, effects: list[Any]) -> None:
        if peer not in counts:
            return
        wrapper = engine.protocols[peer]
        assert isinstance(wrapper, ByzantineProtocol)
        before, now = counts[peer], (wrapper.crafted, wrapper.passed)
        counts[peer] = now
        rounds = {
            e.message.round for e in effects if isinstance(e, Send) and e.message.kind == MODEL
        }
        if now[0] > before[0]:
            crafted[peer] |= rounds
        if now[1] > before[1]:
            honest[peer] |= rounds

    engine.on_handled(on_handled)
    run_simulation(simulation, show_progress=False)
    for peer in byzantine:
        assert crafted[peer] == {2, 5, 8}, (peer, crafted[peer])
        # rounds 0..11 done by every peer; a Byzantine peer may already have sent round 12's
        sent = honest[peer] | crafted[peer]
        assert sent in (set(range(12)), set(range(13))), (peer, sorted(sent))
        assert not honest[peer] & {2, 5, 8}


def test_a_node_attacks_on_its_schedule(tmp_path: Any) -> None:
    """Three D-PSGD nodes over the memory transport; node 2 sign-flips in rounds 3-5 only:
    it crafts exactly three models (one per round, sent to both neighbours) and sends the
    other rounds' models as trained."""
    from tests.test_node_attacks import DPSGD as NODE_DPSGD
    from tests.test_node_attacks import make_nodes, run_all

    attack = {"name": "sign_flip", "params": {"scale": 2.0}, "start_round": 3, "stop_round": 6}
    nodes = make_nodes(tmp_path, 3, NODE_DPSGD, attacks={2: attack}, rounds=8)
    statuses = run_all(nodes)
    assert statuses[2]["attack"]["crafted_messages"] == 3
    attacker = nodes[2].protocol
    assert isinstance(attacker, ByzantineProtocol)
    assert attacker.report()["honest_messages"] in (5, 6)  # rounds 0-2, 6, 7 (and 8's, if out)
