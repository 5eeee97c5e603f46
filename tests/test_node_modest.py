"""MoDeST on real node processes over libp2p on 127.0.0.1: five converge, a sixth joins late."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = [pytest.mark.timeout(170), pytest.mark.slow]

ROUNDS = 60

CONFIG = f"""
seed = 5
rounds = {ROUNDS}
eval_every = 1
min_round_interval = 1.0  # paced (about 1 s a round), so the run is still on when the joiner comes

[data]
dataset = "digits"
batch_size = 16

[model]
name = "mlp"
hidden = [32]
lr = 0.1

[protocol]
name = "modest"
sample_size = 3
num_aggregators = 1
local_steps = 10
success_fraction = 0.6
ping_timeout = 1.0
aggregation_timeout = 3.0
idle_timeout = 4.0

[network]
min_peers = 4
discovery_timeout = 60.0
send_timeout = 3.0
"""


def test_five_processes_converge_and_a_late_joiner_is_sampled(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(CONFIG)
    cluster = Cluster(tmp_path, config, 6)
    founders, joiner = range(5), 5
    try:
        for i in founders:
            cluster.start(i)
        # rounds are system-wide in MoDeST: a peer completes only the rounds it is sampled for
        cluster.wait_for(lambda: max(cluster.rounds_done(i) for i in founders) >= 3, 90, "round 3")

        cluster.start(joiner)  # knows nobody's view yet, and nobody knows it
        codes = cluster.wait_exit(120)
        assert all(code == 0 for code in codes.values()), codes

        statuses = [cluster.status(i) for i in range(6)]
        for i, status in enumerate(statuses):
            assert status is not None and status["rounds_done"] >= ROUNDS, (i, status)
            assert status["guard"]["dropped"]["bad_signature"] == 0
        written = [status for status in statuses if status is not None]  # all: asserted above
        accuracies = [status["accuracy"] for status in written]
        assert min(accuracies) >= 0.8, accuracies
        assert sum(accuracies) / len(accuracies) >= 0.85, accuracies
        # the joiner announced itself and trained or aggregated in a sampled round
        counters = written[joiner]["counters"]
        assert counters.get("modest.joiners_took_part") == 1, counters
    finally:
        cluster.close()
