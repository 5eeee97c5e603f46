"""Five real node processes over libp2p on 127.0.0.1: converge, survive a SIGKILL, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CONFIG = """
seed = 11
rounds = 80
min_round_interval = 0.3

[data]
dataset = "digits"
batch_size = 16

[model]
name = "mlp"
hidden = [32]
lr = 0.1

[protocol]
name = "dpsgd"
local_steps = 10
round_timeout = 3.0

[network]
min_peers = 4
discovery_timeout = 90.0
send_timeout = 3.0
"""


def test_five_processes_converge_and_a_killed_peer_resumes(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(CONFIG)
    cluster = Cluster(tmp_path, config, 5)
    try:
        cluster.start_all()
        cluster.wait_for(lambda: all(cluster.rounds_done(i) >= 6 for i in range(5)), 150, "round 6 everywhere")

        victim = 3
        victim_id = cluster.require_status(victim)["peer_id"]
        others = [i for i in range(5) if i != victim]
        logs = {i: cluster.root / f"peer{i}.log" for i in others}
        already = {i: logs[i].read_text(errors="replace").count(f"{victim_id} lost") for i in others}
        cluster.kill(victim)
        # every neighbour says so at WARNING, within ping_failures x ping_interval (2 x 5 s
        # by default) plus a margin: a SIGKILLed peer must show in the log, not only in
        # status.json (a failed send to it may tell them sooner)
        cluster.wait_for(
            lambda: all(
                logs[i].read_text(errors="replace").count(f"{victim_id} lost") > already[i]
                for i in others
            ),
            2 * 5.0 + 5.0,
            "the others to log the killed peer as lost",
        )
        checkpoint_round = cluster.rounds_done(victim)
        assert checkpoint_round >= 6
        before = {i: cluster.rounds_done(i) for i in others}
        cluster.wait_for(
            lambda: all(cluster.rounds_done(i) >= before[i] + 4 for i in others),
            60,
            "the others to keep going without the killed peer",
        )

        cluster.start(victim)
        cluster.wait_for(
            lambda: (cluster.status(victim) or {}).get("resumed_from") is not None,
            120,
            "the killed peer to restart from its checkpoint",
        )
        resumed = cluster.require_status(victim)["resumed_from"]
        assert resumed >= checkpoint_round > 0  # not round 0

        codes = cluster.wait_exit(150)
        assert all(code == 0 for code in codes.values()), codes
        accuracies = [cluster.require_status(i)["accuracy"] for i in range(5)]
        assert min(accuracies) >= 0.85, accuracies
        assert sum(accuracies) / 5 >= 0.9, accuracies
        for i in others:  # the survivors noticed the crash and counted no forged input
            status = cluster.require_status(i)
            assert status["rounds_done"] == 80
            assert status["guard"]["dropped"]["bad_signature"] == 0
    finally:
        cluster.close()
