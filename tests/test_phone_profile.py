"""The phone-class profile (examples/node/phone.toml, docs/phone.md): a digits run of nodes
confined to 1 CPU and 512 MiB each completes inside the limit.

The confined run needs root and a cgroup hierarchy with the memory and cpu controllers
(``benchmarks/phone.py`` makes the cgroups as children of the test's own and removes
them); elsewhere it is skipped and says why. The profile's own checks run everywhere.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import phone  # noqa: E402
from p2pfl.config import NodeConfig  # noqa: E402
from p2pfl.nodecli import load_node_config  # noqa: E402
from p2pfl.transport.limits import TransportLimits  # noqa: E402

PROFILE = ROOT / "examples" / "node" / "phone.toml"


def test_the_phone_profile_paces_compresses_and_bounds_less_than_the_defaults() -> None:
    cfg = load_node_config(PROFILE, [])
    default = NodeConfig()
    assert cfg.threads == 1 and cfg.min_round_interval >= 1.0
    assert cfg.protocol.codec.name in ("fp16", "int8", "topk")  # compressed on the wire
    assert cfg.checkpoint_every > 1 and cfg.eval_every > 1
    limits = TransportLimits.from_config(cfg.network)
    defaults = TransportLimits.from_config(default.network)
    size, default_size = cfg.network.max_message_bytes, default.network.max_message_bytes
    assert size < default_size
    assert limits.total_bytes(size) < defaults.total_bytes(default_size) / 10
    assert limits.max_streams < defaults.max_streams
    assert limits.max_sends_per_peer < defaults.max_sends_per_peer


def test_sizes_and_the_reason_to_skip_are_read_as_documented(monkeypatch) -> None:
    assert phone.parse_size("512M") == 512 << 20
    assert phone.parse_size("1G") == 1 << 30
    assert phone.parse_size("1000") == 1000
    with pytest.raises(SystemExit, match="--memory"):
        phone.parse_size("lots")
    monkeypatch.setattr(phone.os, "geteuid", lambda: 1000)
    assert phone.cgroup_unavailable() == "needs root to create cgroups"


@pytest.mark.timeout(240)
def test_three_phone_class_nodes_complete_a_digits_run_inside_1_cpu_and_512_mib(monkeypatch) -> None:
    reason = phone.cgroup_unavailable()
    if reason is not None:
        pytest.skip(reason)
    # as the profile runs them (docs/phone.md): no docstrings, optimised bytecode cached
    monkeypatch.setenv("PYTHONOPTIMIZE", "2")
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    limit = 512 << 20
    run = phone.run_phone(
        peers=3,
        rounds=4,
        memory=limit,
        cpus=1.0,
        confine="all",
        # pacing cut so that the test is quick; the rest is the profile as shipped
        sets=["min_round_interval=0.1", "eval_every=2"],
        timeout=180,
        sample=0.2,
    )
    assert run.version in (1, 2)
    assert [node.peer for node in run.nodes] == [0, 1, 2]
    for node in run.nodes:
        assert node.confined
        assert node.exit_code == 0, f"peer {node.peer} exited with {node.exit_code}"
        assert node.rounds == 4
        assert node.oom_kills == 0
        assert node.cgroup_peak is None or node.cgroup_peak > 0  # the group was charged
        assert 0 < node.peak < limit  # what the limit holds, and the process's own peak
        # (RSS also counts shared library pages another process brought in and the group
        # was not charged for: it may exceed the limit without the limit being hit)
        assert node.accuracy is not None and node.accuracy > 0.3  # it did learn
        # Issue 18's goal, 300 MB, on both measures: the cgroup's charge (~184 MB
        # measured) and the process's peak RSS (~294 MB; torch alone is ~200 MB resident;
        # 330 MB before py-libp2p's unused features were loaded lazily and the profile
        # left docstrings out: p2pfl/transport/_slim_imports.py, docs/phone.md)
        assert node.cgroup_peak is None or node.cgroup_peak < phone.GOAL_BYTES
        # A child's ru_maxrss starts from its forking process's high-water mark (it is
        # carried across exec): only meaningful when this process stayed under the bound
        # (alone, yes; in a full test run pytest itself holds ~550 MB)
        if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < phone.GOAL_BYTES:
            assert 0 < node.peak_rss < phone.GOAL_BYTES, f"peer {node.peer}: {node.peak_rss} B"
