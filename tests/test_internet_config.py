"""The [network] keys of issue 18 and the ``p2pfl relay`` command, from the outside."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.nodecli import NodeConfigError, load_node_config, nat_settings

pytestmark = pytest.mark.timeout(60)


def test_defaults_keep_the_lan_behaviour() -> None:
    config = load_node_config(None, [])
    net = config.network
    assert (net.dht, net.run, net.peer_exchange, net.reachability, net.relay) == (
        False, "", True, "off", False,
    )  # fmt: skip
    assert nat_settings(config) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["network.dht=true"], "dht = true needs the run's name: set network.run"),
        (['network.run="digits"'], "network.run is looked up in the DHT"),
        (['network.reachability="maybe"'], "network.reachability"),
        (["network.relay_circuit_bytes=10"], "network.relay_circuit_bytes"),
    ],
)
def test_bad_network_keys_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(NodeConfigError) as error:
        load_node_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_nat_settings_follow_the_keys() -> None:
    config = load_node_config(
        None,
        [
            "network.relay=true",
            "network.hole_punching=false",
            "network.relay_circuit_bytes=2097152",
            "network.relay_max_circuits=3",
        ],
    )
    nat = nat_settings(config)
    assert nat is not None
    assert (nat.reachability, nat.relay, nat.hole_punching) == ("auto", True, False)
    assert (nat.limits.data, nat.limits.max_circuit_conns) == (2 << 20, 3)
    private = nat_settings(load_node_config(None, ['network.reachability="private"']))
    assert private is not None and (private.reachability, private.relay) == ("private", False)


def test_node_run_flag_turns_the_dht_on() -> None:
    config = load_node_config(None, [], {"network.run": "digits", "network.dht": True})
    assert (config.network.dht, config.network.run) == (True, "digits")


def _relay_command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "p2pfl.cli", "relay", "--key-file", str(tmp_path / "r.key"), *args]


def test_relay_command_prints_its_address_and_stops_on_sigint(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        _relay_command(tmp_path, "--listen", "/ip4/127.0.0.1/tcp/0", "-q"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()  # blocks until it listens
        assert line.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in line
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_relay_command_refuses_a_bad_listen_address_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        _relay_command(tmp_path, "--listen", "/ip4/1.2.3/tcp/0"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--listen" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_bad_libp2p_log_level_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "P2PFL_LIBP2P_LOG": "loud"}
    done = subprocess.run(
        _relay_command(tmp_path, "--listen", "/ip4/127.0.0.1/tcp/0"),
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert "P2PFL_LIBP2P_LOG = 'LOUD': expected one of DEBUG, INFO, WARNING, ERROR" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("value", "libp2p_level", "noisy_level"),
    [
        (None, logging.WARNING, logging.CRITICAL),  # the default: ordinary events quiet
        ("debug", logging.DEBUG, logging.NOTSET),  # diagnosis: all of it, at that level
        ("WARNING", logging.WARNING, logging.NOTSET),
    ],
)
def test_libp2p_log_is_quiet_on_ordinary_events_unless_asked(
    monkeypatch: pytest.MonkeyPatch, value: str | None, libp2p_level: int, noisy_level: int
) -> None:
    from p2pfl.nodecli import libp2p_logging
    from p2pfl.transport.libp2p import NOISY_LOGGERS

    names = ["libp2p", *NOISY_LOGGERS]
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate) for name in names}
    if value is None:
        monkeypatch.delenv("P2PFL_LIBP2P_LOG", raising=False)
    else:
        monkeypatch.setenv("P2PFL_LIBP2P_LOG", value)
    try:
        libp2p_logging()
        assert logging.getLogger("libp2p").level == libp2p_level
        assert logging.getLogger("libp2p").propagate
        assert {logging.getLogger(name).level for name in NOISY_LOGGERS} == {noisy_level}
    finally:
        for name, (level, propagate) in saved.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).propagate = propagate
