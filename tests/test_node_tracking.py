"""A node's optional TensorBoard event files (issue 15): off by default, refused at
start-up in one line when the extra is missing, and one scalar per measured round."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.nodecli import load_node_config
from p2pfl.startup import StartupError, check_tracking
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport

pytestmark = pytest.mark.timeout(120)


def _config(tmp_path: Path, index: int, bootstrap: list[str], **extra: Any) -> NodeConfig:
    raw: dict[str, Any] = {
        "seed": 3,
        "rounds": 4,
        "state_dir": str(tmp_path / f"node{index}"),
        "peer_index": index,
        "num_peers": 2,
        "data": {"dataset": "digits", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16], "lr": 0.1},
        "protocol": {"name": "dpsgd", "local_steps": 5, "round_timeout": 2.0},
        "network": {"bootstrap": bootstrap, "min_peers": 1, "discovery_timeout": 20.0},
    }
    raw.update(extra)
    return NodeConfig.model_validate(raw)


def test_tensorboard_is_off_by_default_and_a_flag_or_key_turns_it_on() -> None:
    assert NodeConfig().tensorboard is False
    assert load_node_config(None, [], {"tensorboard": True}).tensorboard is True
    assert load_node_config(None, ["tensorboard=true"]).tensorboard is True


def test_missing_package_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    check_tracking(NodeConfig())  # off: the package is never asked for
    with pytest.raises(StartupError, match=r"^tensorboard: .*pip install 'p2pfl-gossip\[tracking\]'"):
        check_tracking(NodeConfig(tensorboard=True))
    args = [
        "node", "--tensorboard", "--quiet",
        "--key-file", str(tmp_path / "key"),
        "--state-dir", str(tmp_path / "state"),
        "--listen", "/ip4/127.0.0.1/tcp/0",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "p2pfl-gossip[tracking]" in lines[0], result.output
    assert not (tmp_path / "key").exists()  # refused before the identity was made


def test_a_node_pair_writes_a_scalar_per_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the optional extra p2pfl-gossip[tracking] is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    identities = [Identity.generate(bytes([i + 7]) * 32) for i in range(2)]
    first = identities[0].peer_id
    network = MemoryNetwork(seed=2)
    nodes = []
    for i, identity in enumerate(identities):
        bootstrap = [] if i == 0 else [f"/memory/{first}/p2p/{first}"]
        config = _config(tmp_path, i, bootstrap, tensorboard=i == 0)  # node 1: off
        nodes.append(Node(config, MemoryTransport(network, identity.peer_id), identity))

    async def run_all() -> list[dict[str, Any]]:
        return await asyncio.wait_for(asyncio.gather(*(node.run() for node in nodes)), 100)

    statuses = asyncio.run(run_all())
    assert [s["rounds_done"] for s in statuses] == [4, 4]
    assert not (tmp_path / "node1" / "tensorboard").exists()  # off: no event files
    assert (tmp_path / "node1" / "status.json").exists()
    events = EventAccumulator(str(tmp_path / "node0" / "tensorboard"))
    events.Reload()
    accuracy = [(s.step, s.value) for s in events.Scalars("accuracy")]
    assert [step for step, _ in accuracy] == [0, 1, 2, 3]
    assert all(0.0 <= value <= 1.0 for _, value in accuracy)
    assert accuracy[-1][1] == pytest.approx(statuses[0]["accuracy"], rel=1e-6)
    tags = set(events.Tags()["scalars"])
    assert {"loss", "neighbours", "neighbours_live", "bytes_sent", "drops"} <= tags
    assert [s.value for s in events.Scalars("neighbours_live")] == [1.0] * 4
    sent = [s.value for s in events.Scalars("bytes_sent")]
    assert sent == sorted(sent) and sent[-1] > 0


def test_rounds_without_evaluation_have_no_accuracy_point(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the optional extra p2pfl-gossip[tracking] is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    identity = Identity.generate(bytes([9]) * 32)
    config = _config(
        tmp_path, 0, [], num_peers=1, eval_every=2, tensorboard=True,
        network={"min_peers": 0, "discovery_timeout": 0.5},
    )  # fmt: skip
    node = Node(config, MemoryTransport(MemoryNetwork(seed=4), identity.peer_id), identity)
    status = asyncio.run(asyncio.wait_for(node.run(), 60))
    assert status["rounds_done"] == 4
    events = EventAccumulator(str(tmp_path / "node0" / "tensorboard"))
    events.Reload()
    # evaluated in rounds 0 and 2 (every other) and 3 (the last): no stale repeats
    assert [s.step for s in events.Scalars("accuracy")] == [0, 2, 3]
    assert [s.step for s in events.Scalars("neighbours")] == [0, 1, 2, 3]
