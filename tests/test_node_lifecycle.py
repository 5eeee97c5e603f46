"""What a node says and writes as it goes through its phases (issue 14).

- A neighbour that vanishes (cut off the in-memory network: no goodbye, its pings fail,
  as after a SIGKILL) is reported at WARNING by each of its neighbours, with its id and
  the round, within ``ping_failures x ping_interval`` plus a margin; its return likewise;
  the per-round line counts live neighbours (``neighbours 1/2 live``).
- status.json is rewritten in every phase: discovering (also while discovery lasts),
  training (as soon as the protocol starts, not at the end of the first round), and
  finished, stopped or failed at the end.
- A stop during discovery ends it at once (no "starting ... with 0 neighbours"); a real
  ``p2pfl node`` process given SIGTERM or SIGINT in a 900 s discovery exits within 2 s
  with status 0 and status.json saying "stopped".
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.transport.memory import MemoryNetwork
from tests.cluster import free_ports
from tests.test_node_neighbours import make_cluster

pytestmark = pytest.mark.timeout(120)

PING_INTERVAL = 0.2
PING_FAILURES = 2
#: slack for a loaded CI machine on top of the detection time the settings promise
MARGIN = 2.0
PROTOCOL = {"name": "dpsgd", "local_steps": 1, "round_timeout": 1.0}


class Records(logging.Handler):
    """Keeps the ``p2pfl.node`` records, with the monotonic time each arrived."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[float, logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((time.monotonic(), record))

    def matching(self, test: Callable[[logging.LogRecord], bool]) -> list[float]:
        return [at for at, record in self.seen if test(record)]

    async def wait(
        self, test: Callable[[logging.LogRecord], bool], count: int, timeout: float, what: str
    ) -> list[float]:
        """Times of the first ``count`` matching records; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.matching(test)
            if len(found) >= count:
                return found[:count]
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"no {what} within {timeout}s: {[r.getMessage() for _, r in self.seen][-8:]}"
        )


@pytest.fixture
def records():
    handler = Records()
    logger = logging.getLogger("p2pfl.node")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def record_states(node: Node) -> list[tuple[str, int]]:
    """Every status.json the node writes, as (state, rounds_done) read back from disk."""
    written: list[tuple[str, int]] = []
    write = node._write_status

    def write_and_read(**kwargs: Any) -> None:
        write(**kwargs)
        on_disk = json.loads((node.state_dir / "status.json").read_text())
        written.append((on_disk["state"], on_disk["rounds_done"]))

    node._write_status = write_and_read  # type: ignore[method-assign]
    return written


def warning_about(peer: str, what: str) -> Callable[[logging.LogRecord], bool]:
    def test(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return record.levelno == logging.WARNING and text.startswith(
            f"neighbour {peer} {what} at round "
        )

    return test


def test_a_vanished_neighbour_is_warned_about_and_its_return_too(tmp_path, records) -> None:
    network = MemoryNetwork(seed=3)
    nodes = make_cluster(
        tmp_path,
        3,
        rounds=10_000,  # stopped below
        protocol=PROTOCOL,
        network=network,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_INTERVAL,
        ping_failures=PING_FAILURES,
    )
    victim = nodes[2].peer_id
    states = record_states(nodes[0])
    detection = PING_FAILURES * PING_INTERVAL + MARGIN

    async def scenario() -> None:
        runs = asyncio.gather(*(node.run() for node in nodes))
        try:
            await records.wait(
                lambda r: r.getMessage().startswith("round 2 "), 3, 60, "round 2 everywhere"
            )
            cut_at = time.monotonic()
            network.partition([victim])  # gone without a word, as if SIGKILLed
            lost = await records.wait(warning_about(victim, "lost"), 2, detection, "loss warning")
            assert max(lost) - cut_at <= detection
            await records.wait(
                lambda r: "neighbours 1/2 live" in r.getMessage(), 1, 10, "a round line"
            )
            healed_at = time.monotonic()
            network.heal()
            back = await records.wait(warning_about(victim, "back"), 2, detection, "return warning")
            assert max(back) - healed_at <= PING_INTERVAL + MARGIN
        finally:
            for node in nodes:
                node.stop()
            await asyncio.wait_for(runs, 30)

    asyncio.run(scenario())
    lost_lines = [r.getMessage() for _, r in records.seen if warning_about(victim, "lost")(r)]
    assert len(lost_lines) == 2  # once per observer, not once per missed ping
    assert all("; 1/2 neighbours live" in line for line in lost_lines), lost_lines
    # status.json: discovering first, "training" before any round ended, "stopped" last
    assert states[0] == ("discovering", 0)
    assert ("training", 0) in states
    assert states[-1][0] == "stopped" and states[-1][1] > 2
    assert [state for state, _ in states].index("training") < len(states) - 1


def test_a_stop_during_discovery_ends_it_at_once(tmp_path, records) -> None:
    """A node waiting 60 s for peers that never come, stopped once status.json has been
    rewritten while discovering: it returns at once, with state "stopped"."""
    (node,) = make_cluster(
        tmp_path, 1, rounds=5, protocol=PROTOCOL, min_peers=3, discovery_timeout=60.0
    )
    states = record_states(node)

    async def scenario() -> tuple[dict[str, Any], float]:
        run = asyncio.ensure_future(node.run())
        await asyncio.wait_for(node.listening.wait(), 10)
        deadline = time.monotonic() + 10
        while len(states) < 2:  # status.json rewritten while discovering
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.02)
        stopped_at = time.monotonic()
        node.stop()
        status = await asyncio.wait_for(run, 10)
        return status, time.monotonic() - stopped_at

    status, took = asyncio.run(scenario())
    assert took < 1.0, took
    assert status["state"] == "stopped" and status["failure"] is None
    assert [state for state, _ in states[:-1]] == ["discovering"] * (len(states) - 1)
    assert len(states) >= 3 and states[-1] == ("stopped", 0)
    messages = [r.getMessage() for _, r in records.seen]
    assert not any(m.startswith("starting ") for m in messages), messages
    assert json.loads((node.state_dir / "status.json").read_text())["state"] == "stopped"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_discovery_ends_the_process_within_2s(tmp_path, sig) -> None:
    absent = Identity.generate(b"\x5b" * 32).peer_id
    port = free_ports(1)[0]
    state = tmp_path / "state"
    args = [
        sys.executable, "-m", "p2pfl.cli", "node",
        "--state-dir", str(state), "--key-file", str(tmp_path / "node.key"),
        "--listen", "/ip4/127.0.0.1/tcp/0",
        "--bootstrap", f"/ip4/127.0.0.1/tcp/{port}/p2p/{absent}",
        "--set", "network.discovery_timeout=900", "--set", "data.dataset=\"synthetic\"",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        seen = b""
        while b"not reachable (attempt 2" not in seen:  # discovering, and retrying
            assert time.monotonic() < deadline and process.poll() is None, seen.decode()
            seen += process.stderr.readline()
        status = json.loads((state / "status.json").read_text())
        assert status["state"] == "discovering"
        sent_at = time.monotonic()
        process.send_signal(sig)
        code = process.wait(timeout=10)
        took = time.monotonic() - sent_at
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    rest = process.stderr.read().decode() if process.stderr else ""
    assert code == 0, rest
    assert took < 2.0, took
    assert "Traceback" not in rest and "starting dpsgd" not in rest
    assert json.loads((state / "status.json").read_text())["state"] == "stopped"


def test_the_round_line_counts_live_neighbours(tmp_path, records) -> None:
    """Two nodes, 3 rounds: every round line says ``neighbours 1/1 live``."""
    nodes = make_cluster(tmp_path, 2, rounds=3, protocol=PROTOCOL, ping_interval=0)

    async def scenario() -> list[dict[str, Any]]:
        return await asyncio.wait_for(asyncio.gather(*(node.run() for node in nodes)), 60)

    statuses = asyncio.run(scenario())
    assert all(s["state"] == "finished" for s in statuses)
    lines = [r.getMessage() for _, r in records.seen if r.getMessage().startswith("round ")]
    assert len(lines) == 6 and all("  neighbours 1/1 live  " in line for line in lines), lines
    for path in (Path(n.state_dir) / "status.json" for n in nodes):
        assert json.loads(path.read_text())["state"] == "finished"


def test_missed_pings_report_a_silent_neighbour_down_then_up() -> None:
    """The ping path alone (no send fails): a peer cut off is reported down after
    ``ping_failures`` missed pings, within ``ping_failures x ping_interval`` plus a margin,
    once; and up at its first answer after the link is back."""
    from p2pfl.liveness import Liveness
    from p2pfl.transport.memory import MemoryTransport

    network = MemoryNetwork()
    me, peer = MemoryTransport(network, "me"), MemoryTransport(network, "peer")
    events: list[tuple[str, float]] = []
    changed = asyncio.Event()

    def note(what: str) -> Callable[[str], None]:
        def record(who: str) -> None:
            assert who == "peer"
            events.append((what, time.monotonic()))
            changed.set()

        return record

    running = [True]
    liveness = Liveness(
        me,
        interval=PING_INTERVAL,
        timeout=PING_INTERVAL,
        failures=PING_FAILURES,
        watched=lambda: ["peer"],
        running=lambda: running[0],
        may_return=lambda who: True,
        on_down=note("down"),
        on_up=note("up"),
    )

    async def scenario() -> None:
        await me.start()
        await peer.start()
        pings = asyncio.ensure_future(liveness.run())
        network.cut("me", "peer")
        cut_at = time.monotonic()
        await asyncio.wait_for(changed.wait(), PING_FAILURES * PING_INTERVAL + MARGIN)
        assert events[0][0] == "down" and "peer" in liveness.down
        assert events[0][1] - cut_at <= PING_FAILURES * PING_INTERVAL + MARGIN
        changed.clear()
        network.restore("me", "peer")
        await asyncio.wait_for(changed.wait(), PING_INTERVAL + MARGIN)
        running[0] = False
        await asyncio.wait_for(pings, 5)

    asyncio.run(scenario())
    assert [what for what, _ in events] == ["down", "up"]


def test_a_signal_before_the_node_runs_exits_0_in_one_line(tmp_path, capsys, monkeypatch) -> None:
    """SIGTERM while the node is being built (its dataset loading): one line, status 0,
    and the caller's signal handlers are back afterwards."""
    import p2pfl.startup
    from p2pfl.cli import app

    def signalled(config: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, by the node's start-up handler
        raise AssertionError("the signal did not stop the start-up")

    monkeypatch.setattr(p2pfl.startup, "check_node_inputs", signalled)
    before = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with pytest.raises(SystemExit) as done:
            app(["node", "--state-dir", str(tmp_path / "s"), "--key-file", str(tmp_path / "k")])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert done.value.code in (0, None)
    assert capsys.readouterr().err == "stopped by SIGTERM before the node started\n"
    assert signal.getsignal(signal.SIGTERM) is before
