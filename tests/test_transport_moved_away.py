"""When a failed frame is sent again on another connection (``Libp2pTransport._moved_away``).

The states a relayed connection passes through when py-libp2p retires it, one at a time
and deterministically (the integration test, tests/test_relay_upgrade_linger.py, meets
them only as a race): the swarm marks its connection closed first, the yamux then sends
GO_AWAY (shutting down) and only after its secure channel closed reports ``is_closed``.
A frame cut anywhere in that sequence goes on on another open connection; a frame whose
own connection is fine, or that has nowhere else to go, fails as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from p2pfl.transport.libp2p import Libp2pTransport


@dataclass
class Event:
    set_: bool = False

    def is_set(self) -> bool:
        return self.set_


@dataclass
class Muxed:  # the yamux connection: closed only at the end of its close
    is_closed: bool = False
    event_shutting_down: Event = field(default_factory=Event)


@dataclass
class SwarmConn:  # the swarm's connection: closed at the start of its close
    muxed_conn: Muxed
    is_closed: bool = False


def moved_away(conns: list[SwarmConn], stream_conn: Muxed) -> bool:
    network = SimpleNamespace(get_connections=lambda peer: conns)
    transport: Any = SimpleNamespace(_host=SimpleNamespace(get_network=lambda: network))
    stream: Any = SimpleNamespace(muxed_conn=stream_conn)
    return Libp2pTransport._moved_away(transport, "peer", stream)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("open", False),  # the frame failed for another reason: no second copy
        ("swarm closed", True),  # the gap the CI failure fell into
        ("shutting down", True),  # GO_AWAY sent, the secure channel still closing
        ("closed", True),
    ],
)
def test_a_frame_on_a_retiring_connection_goes_on_on_the_direct_one(stage: str, expected: bool) -> None:
    relayed = SwarmConn(Muxed())
    direct = SwarmConn(Muxed())
    if stage != "open":
        relayed.is_closed = True
    if stage in ("shutting down", "closed"):
        relayed.muxed_conn.event_shutting_down.set_ = True
    if stage == "closed":
        relayed.muxed_conn.is_closed = True
    assert moved_away([relayed, direct], relayed.muxed_conn) is expected


@pytest.mark.parametrize("other", ["none", "closed", "shutting down"])
def test_with_no_other_open_connection_the_send_fails_as_before(other: str) -> None:
    relayed = SwarmConn(Muxed(), is_closed=True)
    conns = [relayed]
    if other != "none":
        direct = SwarmConn(Muxed())
        if other == "closed":
            direct.is_closed = True
        else:
            direct.muxed_conn.event_shutting_down.set_ = True
        conns.append(direct)
    assert moved_away(conns, relayed.muxed_conn) is False


def test_a_connection_the_swarm_already_dropped_counts_as_gone() -> None:
    """The swarm removes a closed connection from its map: the stream's muxer is then in
    no live connection at all."""
    gone = Muxed(event_shutting_down=Event(True))
    assert moved_away([SwarmConn(Muxed())], gone) is True
