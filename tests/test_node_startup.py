"""``p2pfl node`` start-up checks and discovery that ends with too few peers (issue 14).

- Every bad input is one line on stderr naming the key or file and what was expected,
  exit status 2, no traceback; all are found before the dataset loads or the transport
  starts (the CLI is called in-process: the checks are the same code as in a process).
- An unreachable bootstrap peer is reported at WARNING on each attempt, retried with a
  growing delay, and when discovery ends with fewer peers than ``network.min_peers``
  the node exits 1 with a message naming the addresses tried (a real ``p2pfl node``
  process). With ``min_peers = 0`` the same node learns alone, as asked.
- JSON written by the node and the simulator never holds NaN or Infinity.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from p2pfl.aggregation.registry import AGGREGATORS
from p2pfl.checkpoint import write_json_atomic
from p2pfl.cli import app
from p2pfl.config import NodeConfig, NodeNetworkConfig
from p2pfl.discovery import Discovery
from p2pfl.identity import Identity
from p2pfl.jsonsafe import dumps, finite
from p2pfl.neighbours import PeerGraph
from p2pfl.node import Node
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from tests.cluster import free_ports

pytestmark = pytest.mark.timeout(120)

#: a peer id nobody runs (a fixed key): dialled at a port nobody listens on
ABSENT = Identity.generate(b"\x5a" * 32).peer_id


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``p2pfl node ARGS`` in this process: (exit status, stdout, stderr)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with pytest.raises(SystemExit) as done:
            app(["node", *args])
    finally:  # the CLI points logging at this test's captured stderr: undo it
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def base_args(tmp_path: Path) -> list[str]:
    return ["--state-dir", str(tmp_path / "state"), "--key-file", str(tmp_path / "node.key")]


def bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line a bad input gives (exit 2, nothing on stdout, no traceback)."""
    code, out, err = run_cli([*base_args(tmp_path), *args], capsys)
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.rstrip("\n")


def test_an_unknown_aggregator_or_parameter_is_one_line(tmp_path, capsys) -> None:
    names = ", ".join(sorted(AGGREGATORS))
    assert bad_input(tmp_path, capsys, "--set", "protocol.aggregator=meen") == (
        f"error: protocol.aggregator: unknown aggregator 'meen'; accepted: {names}"
    )
    params = ", ".join(AGGREGATORS["trimmed_mean"])
    line = bad_input(
        tmp_path,
        capsys,
        "--set",
        "protocol.aggregator=trimmed_mean",
        "--set",
        "protocol.aggregator_params.fooo=1",
    )
    assert line == (
        "error: protocol.aggregator_params: aggregator 'trimmed_mean' does not accept fooo; "
        f"accepted parameters: {params}"
    )


def test_a_set_without_a_value_is_one_line(tmp_path, capsys) -> None:
    assert bad_input(tmp_path, capsys, "--set", "rounds") == (
        "error: --set expects key=value, got 'rounds'"
    )


def test_bad_addresses_are_refused_before_anything_starts(tmp_path, capsys) -> None:
    assert bad_input(tmp_path, capsys, "--listen", "garbage") == (
        "error: network.listen: 'garbage': unknown protocol: garbage; "
        "expected /ip4/<address>/tcp/<port>"
    )
    assert bad_input(tmp_path, capsys, "--listen", "/ip4/127.0.0.1/udp/4001") == (
        "error: network.listen: '/ip4/127.0.0.1/udp/4001' is not an address to listen on; "
        "expected /ip4/<address>/tcp/<port>"
    )
    dial = "expected /ip4/<address>/tcp/<port>/p2p/<peer id>"
    assert bad_input(tmp_path, capsys, "--bootstrap", "garbage") == (
        f"error: network.bootstrap: 'garbage': unknown protocol: garbage; {dial}"
    )
    assert bad_input(tmp_path, capsys, "--bootstrap", "/ip4/127.0.0.1/tcp/4001") == (
        "error: network.bootstrap: '/ip4/127.0.0.1/tcp/4001' is not a dialable peer "
        f"address; {dial}"
    )
    assert bad_input(tmp_path, capsys, "--bootstrap", "/ip4/127.0.0.1/tcp/4001/p2p/xyz") == (
        f"error: network.bootstrap: '/ip4/127.0.0.1/tcp/4001/p2p/xyz': Invalid CID: xyz; {dial}"
    )
    # nothing was started, nothing written: the checks came first
    assert not (tmp_path / "state").exists() and not (tmp_path / "node.key").exists()


def test_a_port_in_use_is_one_line(tmp_path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = bad_input(tmp_path, capsys, "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert line == (
        f"error: network.listen: cannot listen on /ip4/127.0.0.1/tcp/{port}: Address already "
        "in use (another node or program has this port)"
    )


def test_a_corrupt_key_file_is_one_line_and_left_alone(tmp_path, capsys) -> None:
    key = tmp_path / "node.key"
    key.write_bytes(b"garbage")
    key.chmod(0o600)
    assert bad_input(tmp_path, capsys) == (
        f"error: key_file: {key}: not a libp2p Ed25519 private key (7 bytes); expected the "
        "36-byte key file p2pfl node writes (move it away to create a new identity)"
    )
    assert key.read_bytes() == b"garbage"  # never replaced: it may be someone's identity


def test_bad_config_values_and_state_dir_are_one_line(tmp_path, capsys) -> None:
    assert bad_input(tmp_path, capsys, "--set", "network.min_peers=-1") == (
        "error: network.min_peers: Input should be greater than or equal to 0 (got -1)"
    )
    config = tmp_path / "node.toml"
    config.write_text('rounds = "many"\n')
    assert bad_input(tmp_path, capsys, "-c", str(config)) == (
        "error: rounds: Input should be a valid integer, unable to parse string as an "
        "integer (got 'many')"
    )
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    line = bad_input(tmp_path, capsys)
    assert line.startswith(f"error: state_dir: {blocker}: cannot write there (")
    assert line.endswith("); expected a writable directory")


def test_a_protocol_table_without_a_name_tunes_the_default_protocol(tmp_path, capsys) -> None:
    """``--set protocol.aggregator=...`` alone used to fail with pydantic's "Unable to
    extract tag using discriminator"; it now tunes the default protocol (dpsgd)."""
    from p2pfl.nodecli import load_node_config

    config = load_node_config(None, ["protocol.aggregator=median"])
    assert config.protocol.name == "dpsgd" and config.protocol.aggregator == "median"


# ---------------------------------------------------------------- too few peers met


def test_an_unreachable_bootstrap_peer_is_warned_and_the_node_exits_non_zero(tmp_path) -> None:
    """A real process, a bootstrap address where nobody listens, a 3 s discovery: one
    WARNING per attempt naming the address, retried with backoff, then exit 1 naming it."""
    port = free_ports(1)[0]
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{ABSENT}"
    args = [
        sys.executable, "-m", "p2pfl.cli", "node", *base_args(tmp_path),
        "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", addr,
        "--set", "network.discovery_timeout=3", "--set", "data.dataset=\"synthetic\"",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    attempts = [line for line in lines if "WARNING" in line and "not reachable" in line]
    assert len(attempts) >= 2, done.stderr  # retried
    for number, line in enumerate(attempts, start=1):
        assert f"bootstrap peer {addr} not reachable (attempt {number}: " in line
    assert "retrying in 0.5s" in attempts[0]  # then longer: test_bootstrap_dials_back_off
    assert lines[-1] == (
        "error: node failed: discovery: met 0 of the 1 peers network.min_peers asks for within "
        f"network.discovery_timeout = 3s; tried: {addr} (connection refused or no answer); "
        "set network.min_peers = 0 to learn alone"
    )
    assert "Traceback" not in done.stderr and "starting dpsgd" not in done.stderr
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["state"] == "failed" and status["failure"].startswith("discovery: met 0")
    assert status["rounds_done"] == 0


def memory_node(tmp_path: Path, min_peers: int, *, rounds: int = 2, timeout: float = 0.6) -> Node:
    """A lone node on the in-memory network whose bootstrap peer never shows up."""
    identity = Identity.generate(b"\x21" * 32)
    config = NodeConfig.model_validate(
        {
            "rounds": rounds,
            "state_dir": str(tmp_path / f"alone{min_peers}"),
            "data": {"dataset": "synthetic", "batch_size": 16},
            "model": {"name": "logreg"},
            "protocol": {"name": "dpsgd", "round_timeout": 0.5},
            "network": {
                "bootstrap": [f"/memory/{ABSENT}/p2p/{ABSENT}"],
                "min_peers": min_peers,
                "discovery_timeout": timeout,
                "ping_interval": 0,
            },
        }
    )
    return Node(config, MemoryTransport(MemoryNetwork(seed=0), identity.peer_id), identity)


def test_a_node_learns_alone_only_when_min_peers_is_0(tmp_path) -> None:
    refused = asyncio.run(asyncio.wait_for(memory_node(tmp_path, 1).run(), 30))
    assert refused["state"] == "failed" and refused["rounds_done"] == 0
    assert f"/memory/{ABSENT}/p2p/{ABSENT} (" in refused["failure"]
    alone = asyncio.run(asyncio.wait_for(memory_node(tmp_path, 0).run(), 30))
    assert alone["failure"] is None and alone["state"] == "finished"
    assert alone["rounds_done"] == 2


def lone_discovery(transport: MemoryTransport, graph: PeerGraph | None = None, **network):
    settings = NodeNetworkConfig.model_validate({"discovery_timeout": 2.5, **network})

    async def never_send(peer: str, message: object) -> None:
        raise AssertionError("nothing is sent in this test")

    return Discovery(
        transport.peer_id,
        transport,
        settings,
        graph=graph,
        send=never_send,
        spawn=lambda coroutine: coroutine.close(),
    )


def test_bootstrap_dials_back_off(tmp_path) -> None:
    """Dials to a bootstrap peer that is down: 0.5 s, then 1 s, then 2 s apart (bounded by
    the discovery timeout), each one logged, not a tight loop."""
    dials: list[float] = []

    class Unreachable(MemoryTransport):
        async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
            dials.append(time.monotonic())
            return await super().connect(addr, timeout=timeout)

    me = Identity.generate(b"\x22" * 32).peer_id
    discovery = lone_discovery(
        Unreachable(MemoryNetwork(), me), bootstrap=[f"/memory/{ABSENT}/p2p/{ABSENT}"]
    )

    async def discover() -> None:
        await discovery.transport.start()
        await discovery.discover()

    asyncio.run(discover())
    gaps = [b - a for a, b in zip(dials, dials[1:], strict=False)]
    assert 3 <= len(dials) <= 4, gaps
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps
    assert discovery.tried == {f"/memory/{ABSENT}/p2p/{ABSENT}": f"peer {ABSENT} is not listening"}


def test_a_graph_asks_for_its_neighbours_not_more(tmp_path) -> None:
    """With a topology file the need is ``min(min_peers, degree)``: a node of degree 1 with
    its one neighbour met may start although ``min_peers`` is 3."""
    me, friend, other = (Identity.generate(bytes([k]) * 32).peer_id for k in (1, 2, 3))
    path = tmp_path / "graph.txt"
    path.write_text(f"{me} {friend}\n{friend} {other}\n")
    graph = PeerGraph.from_file(str(path))
    discovery = lone_discovery(MemoryTransport(MemoryNetwork(), me), graph, min_peers=3)
    shortfall = discovery.shortfall()
    assert shortfall is not None and shortfall.startswith("met 0 of the 1 peers")
    assert "no bootstrap address given (network.bootstrap), mDNS off" in shortfall
    discovery.meet(other)  # not a graph neighbour: does not count
    assert discovery.shortfall() is not None
    discovery.meet(friend)
    assert discovery.shortfall() is None


# ---------------------------------------------------------------- valid JSON everywhere


def strict_loads(text: str) -> object:
    """``json.loads`` that refuses NaN and Infinity, as a JavaScript reader does."""

    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_become_null_at_any_depth() -> None:
    value = {
        "acc": float("nan"),
        "rows": [1.0, float("inf"), (-math.inf, 2)],
        "np": np.float32("nan"),
        "ok": np.float64(0.25),
        "n": np.int64(3),
        "nested": {"x": {"y": [float("-inf")]}},
        "path": Path("/x"),
    }
    expected = {
        "acc": None,
        "rows": [1.0, None, [None, 2]],
        "np": None,
        "ok": 0.25,
        "n": 3,
        "nested": {"x": {"y": [None]}},
        "path": "/x",
    }
    assert strict_loads(dumps(value)) == expected
    assert finite(float("nan")) is None and finite(1.5) == 1.5 and finite("NaN") == "NaN"
    # what ``default`` converts is made finite too
    assert strict_loads(dumps({"t": object()}, default=lambda o: float("nan"))) == {"t": None}


def test_status_json_with_a_nan_accuracy_is_valid_json(tmp_path) -> None:
    path = tmp_path / "status.json"
    write_json_atomic(path, {"accuracy": float("nan"), "loss": [float("inf")]})
    assert strict_loads(path.read_text()) == {"accuracy": None, "loss": [None]}
