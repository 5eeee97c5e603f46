"""The namespace harness itself: the NATs behave as home routers, nothing is left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.netns import (
    HOME_IP,
    PREFIX,
    PUBLIC_IP,
    Internet,
    NetnsError,
    netns_names,
    remove_stale,
    unavailable_reason,
)

REASON = unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"netns: {REASON}"), pytest.mark.timeout(60)]

SERVE = """
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen()
print("ready", flush=True)
server.settimeout(20)
conn, (host, port) = server.accept()
print(host, flush=True)
conn.close()
"""

DIAL = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
    print("connected")
except OSError as error:
    print("failed", type(error).__name__)
"""


def _python(net: Internet, ns: str, code: str, *args: str) -> subprocess.Popen[str]:
    command = [*net.exec_prefix(ns), sys.executable, "-c", code, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _serve(net: Internet, ns: str, ip: str, port: int) -> subprocess.Popen[str]:
    """A one-shot TCP server in ``ns``, returned once it listens."""
    server = _python(net, ns, SERVE, ip, str(port))
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    return server


def _dial(net: Internet, ns: str, ip: str, port: int) -> str:
    out, _ = _python(net, ns, DIAL, ip, str(port)).communicate(timeout=10)
    return out.strip()


def test_homes_reach_the_public_node_through_their_nat_and_nothing_reaches_in() -> None:
    with Internet(homes=2) as net:
        made = net.namespaces
        server = _serve(net, net.public, PUBLIC_IP, 5000)
        try:
            # the public node sees the home's router, not the home's private address
            assert _dial(net, net.home[0].ns, PUBLIC_IP, 5000) == "connected"
            seen, _ = server.communicate(timeout=20)
            assert seen.strip() == net.home[0].wan_ip
        finally:
            server.kill()
        home_server = _serve(net, net.home[1].ns, HOME_IP, 5001)
        try:
            # the other home's router and its private address are both closed to outsiders
            assert _dial(net, net.public, net.home[1].wan_ip, 5001).startswith("failed")
            assert _dial(net, net.home[0].ns, net.home[1].wan_ip, 5001).startswith("failed")
            # the same private address from another home is that home's own machine
            assert _dial(net, net.home[0].ns, HOME_IP, 5001) == "failed ConnectionRefusedError"
        finally:
            home_server.kill()
            home_server.wait(timeout=10)
    assert not set(made) & set(netns_names())


#: dials ``argv[1]:argv[2]`` from its own listening port ``argv[3]`` (SO_REUSEPORT, as
#: py-libp2p's hole punch does) at unix time ``argv[4]``; the SYNs of the two ends cross
PUNCH = """
import socket, sys, time
def bound():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", int(sys.argv[3])))
    return s
listener = bound()
listener.listen()
dial = bound()
dial.settimeout(3)
time.sleep(max(0.0, float(sys.argv[4]) - time.time()))
try:
    dial.connect((sys.argv[1], int(sys.argv[2])))
    print("connected", dial.getpeername()[0])
except OSError as error:
    print("failed", type(error).__name__)
"""


def test_a_tcp_punch_from_the_listen_ports_gets_through_both_routers() -> None:
    """TCP simultaneous open between the two homes (what DCUtR does): both routers keep
    the source port (MASQUERADE does when it is free), so each SYN leaves as the other
    side's expected peer. Routers whose kernel answered the first SYN with a reset
    (nothing listens on that port of theirs) made both ends fail (connection refused)
    whenever one SYN arrived before the other had left; home routers drop it instead."""
    import time

    with Internet(homes=2) as net:
        at = str(time.time() + 0.5)
        ends = [
            _python(net, net.home[0].ns, PUNCH, net.home[1].wan_ip, "4621", "4611", at),
            _python(net, net.home[1].ns, PUNCH, net.home[0].wan_ip, "4611", "4621", at),
        ]
        said = [end.communicate(timeout=20)[0].strip() for end in ends]
    # each end sees the other home's router, at the port it listens on
    assert said == [f"connected {net.home[1].wan_ip}", f"connected {net.home[0].wan_ip}"], said


def test_a_failed_build_leaves_no_namespace() -> None:
    net = Internet(homes=1, rate="not-a-rate")
    with pytest.raises(NetnsError, match="tc qdisc add"):
        net.build()
    assert not [name for name in netns_names() if name.startswith(net.tag)]


def test_namespaces_of_a_dead_test_process_are_removed() -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # exited: its pid names no live process (unless reused at once)
    stale = f"{PREFIX}{dead}n1home1"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        assert stale in remove_stale()
        assert stale not in netns_names()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True, timeout=10)
