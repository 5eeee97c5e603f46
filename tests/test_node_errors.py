"""An exception inside a protocol callback never leaves a node hanging (issue 12).

A protocol made to raise (monkeypatched) on memory-transport nodes:
- in the round timer or in local training: the node stops at once, logs the error, counts
  it (``errors`` in ``status.json``), reports ``failure`` and state ``failed``, and
  ``p2pfl node`` exits with status 1;
- while handling a received message: the message is dropped, its sender charged, and the
  node finishes all its rounds.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from typer.testing import CliRunner

from p2pfl.node import Node
from p2pfl.protocols.synchronous import SynchronousRoundProtocol
from p2pfl.transport.memory import MemoryTransport
from tests.test_node_neighbours import LossyTransport, identities, make_cluster, run_nodes

pytestmark = pytest.mark.timeout(120)

PROTOCOL = {"name": "dpsgd", "local_steps": 5, "round_timeout": 1.0}


class Harm(RuntimeError):
    """What the monkeypatched protocol raises (like ``torch.stack`` on mismatched shapes)."""


def run_until_victim_stops(nodes: list[Node], victim: Node) -> dict:
    """Run the cluster; once the victim's run returns, stop the others. The victim must
    return by itself, well before the rounds it was asked for would take."""

    async def scenario() -> dict:
        runs = {node.peer_id: asyncio.ensure_future(node.run()) for node in nodes}
        try:
            return await asyncio.wait_for(runs[victim.peer_id], 30)
        finally:
            for node in nodes:
                node.stop()
            await asyncio.wait_for(asyncio.gather(*runs.values(), return_exceptions=True), 30)

    return asyncio.run(scenario())


@pytest.mark.parametrize("where", ["timer", "training"])
def test_an_exception_in_the_nodes_own_callbacks_stops_it_with_the_error(
    tmp_path, monkeypatch, caplog, where: str
) -> None:
    """Node 0 raises at its first round timer (node 2's models are lost, so rounds time
    out), or in its second local training; before, a raising timer callback left no timer
    armed and the node waited forever."""
    nodes = make_cluster(tmp_path, 3, rounds=50, protocol=PROTOCOL)
    lossy = nodes[2]
    assert isinstance(lossy.transport, MemoryTransport)
    nodes[2] = Node(
        lossy.config, LossyTransport(lossy.transport.network, lossy.peer_id), lossy.identity
    )
    victim = nodes[0]
    finish = SynchronousRoundProtocol._finish_round

    def finish_or_raise(self, now: float, *, timed_out: bool):
        if where == "timer" and timed_out and self.peer_id == victim.peer_id:
            raise Harm("stack expects each tensor to be equal size")
        return finish(self, now, timed_out=timed_out)

    monkeypatch.setattr(SynchronousRoundProtocol, "_finish_round", finish_or_raise)
    train = Node._train_locally
    calls = {"n": 0}

    def train_or_raise(self, params, steps):
        if where == "training" and self is victim:
            calls["n"] += 1
            if calls["n"] == 2:
                raise Harm("out of memory")
        return train(self, params, steps)

    monkeypatch.setattr(Node, "_train_locally", train_or_raise)
    with caplog.at_level(logging.ERROR, logger="p2pfl.node"):
        status = run_until_victim_stops(nodes, victim)
    assert status["failure"].startswith(f"{where}: Harm: "), status["failure"]
    assert status["errors"] == {where: 1}
    assert status["rounds_done"] <= 2
    on_disk = json.loads((victim.state_dir / "status.json").read_text())
    assert on_disk["state"] == "failed" and on_disk["errors"] == {where: 1}
    assert on_disk["failure"] == status["failure"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "p2pfl.node"]
    assert len(errors) == 1 and "Harm" in errors[0].getMessage()


def test_a_raising_message_handler_costs_the_message_not_the_node(tmp_path, monkeypatch) -> None:
    """Node 0's protocol raises on node 1's round-1 model: that model is dropped (and
    charged to node 1), node 0's round 1 ends by its timer, and every node finishes."""
    rounds = 4
    nodes = make_cluster(tmp_path, 3, rounds=rounds, protocol={**PROTOCOL, "round_timeout": 2.0})
    victim, sender = nodes[0], nodes[1]
    on_message = SynchronousRoundProtocol._on_message

    def on_message_or_raise(self, event):
        is_target = self.peer_id == victim.peer_id and event.sender == sender.peer_id
        if is_target and event.message.round == 1:
            raise Harm("cannot handle this one")
        return on_message(self, event)

    monkeypatch.setattr(SynchronousRoundProtocol, "_on_message", on_message_or_raise)
    statuses = asyncio.run(run_nodes(nodes, 60))
    status = statuses[0]
    assert status["failure"] is None and status["errors"] == {"message": 1}
    assert all(s["rounds_done"] == rounds for s in statuses)
    assert status["counters"].get("round_timeouts", 0) == 1  # the round that lost the model
    drops = {reason: count for reason, count in victim.guard.drops(sender.peer_id).items() if count}
    assert drops == {"malformed": 1}
    assert all(s["errors"] == {} for s in statuses[1:])


def test_p2pfl_node_exits_non_zero_when_the_node_failed(tmp_path, monkeypatch) -> None:
    from p2pfl import nodecli
    from p2pfl.cli import app

    failed = {
        "peer_id": identities(1)[0].peer_id,
        "round": 1,
        "rounds_done": 1,
        "accuracy": None,
        "failure": "timer: Harm: boom",
    }
    monkeypatch.setattr(nodecli, "run_node", lambda config: failed)
    result = CliRunner().invoke(app, ["node", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "node failed: timer: Harm: boom" in result.output
    monkeypatch.setattr(nodecli, "run_node", lambda config: {**failed, "failure": None})
    assert CliRunner().invoke(app, ["node", "--state-dir", str(tmp_path)]).exit_code == 0
