"""The node's event loop (``p2pfl.eventloop``): uvloop where installed, asyncio's otherwise.

- ``auto`` runs on uvloop where it can be imported, ``asyncio`` on asyncio's own loop;
- a node learns the same, bit for bit, on either loop (the protocol sees the same events);
- ``event_loop = "uvloop"`` where uvloop is missing is one line at start-up, exit 2.

The node processes of the cluster tests (tests/cluster.py) run on the default, ``auto``:
on Linux that is uvloop under the libp2p transport and its trio thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from p2pfl import eventloop
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from tests.test_node_startup import bad_input

pytestmark = pytest.mark.timeout(120)

needs_uvloop = pytest.mark.skipif(
    not eventloop.uvloop_available(), reason="uvloop is not installed here (not built for Windows)"
)


async def loop_name() -> str:
    return eventloop.running_loop_name()


@needs_uvloop
def test_auto_and_uvloop_run_on_uvloop() -> None:
    assert eventloop.run(loop_name()) == "uvloop"
    assert eventloop.run(loop_name(), "auto") == "uvloop"
    assert eventloop.run(loop_name(), "uvloop") == "uvloop"


def test_asyncio_runs_on_asyncios_own_loop() -> None:
    assert eventloop.loop_factory("asyncio") is None
    assert eventloop.run(loop_name(), "asyncio") == "asyncio"


def test_auto_without_uvloop_falls_back_to_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "uvloop_available", lambda: False)
    assert eventloop.loop_factory("auto") is None
    assert eventloop.run(loop_name(), "auto") == "asyncio"


def lone_node(state_dir: Path, choice: str) -> Node:
    """A node that learns alone (no peers wanted) on the in-memory network."""
    identity = Identity.generate(b"\x31" * 32)
    config = NodeConfig.model_validate(
        {
            "rounds": 4,
            "seed": 3,
            "event_loop": choice,
            "state_dir": str(state_dir),
            "data": {"dataset": "synthetic", "batch_size": 16},
            "model": {"name": "logreg"},
            "protocol": {"name": "dpsgd", "round_timeout": 0.5, "local_steps": 3},
            "network": {"min_peers": 0, "discovery_timeout": 0.2, "ping_interval": 0},
        }
    )
    return Node(config, MemoryTransport(MemoryNetwork(seed=0), identity.peer_id), identity)


@needs_uvloop
def test_a_node_learns_the_same_on_either_loop(tmp_path: Path) -> None:
    models = {}
    for choice in ("asyncio", "uvloop"):
        node = lone_node(tmp_path / choice, choice)

        async def main(node: Node = node) -> tuple[str, dict[str, object]]:
            return eventloop.running_loop_name(), await asyncio.wait_for(node.run(), 60)

        name, status = eventloop.run(main(), node.config.event_loop)
        assert name == choice
        assert status["state"] == "finished" and status["failure"] is None
        assert status["rounds_done"] == 4
        assert node.protocol is not None
        models[choice] = node.protocol.params.clone()
    assert torch.equal(models["asyncio"], models["uvloop"])
    assert not torch.equal(models["asyncio"], lone_node(tmp_path / "x", "auto").commons.start)


def test_uvloop_asked_for_where_it_is_missing_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eventloop, "uvloop_available", lambda: False)
    assert bad_input(tmp_path, capsys, "--set", 'event_loop="uvloop"') == (
        'error: event_loop: "uvloop" is not installed here (pip install uvloop; not built for '
        'Windows); set event_loop = "auto" or "asyncio"'
    )


def test_an_unknown_event_loop_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = bad_input(tmp_path, capsys, "--set", 'event_loop="trio"')
    assert line.startswith("error: event_loop") and "'auto', 'uvloop' or 'asyncio'" in line, line
