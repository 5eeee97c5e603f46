"""The swarm's inbound connection slots: given back when a connection ends, and shared
between sources (py-libp2p 0.8.1 faults).

py-libp2p's swarm admits at most ``max_connections - min_connections`` (250) inbound
connections at once: each takes a slot of a ``trio.CapacityLimiter`` in the task that
the TCP listener runs for it, and gives it back when that task ends; the 251st is closed
unread. Two faults made one hostile peer enough to leave a node deaf to every newcomer
(an honest peer bootstrapping to it, a neighbour coming back), measured on loopback:

- *Slots kept forever.* After a successful upgrade that task waits for the *swarm* to
  finish, not for its connection to close (it must outlive the connection: the listener
  closes the socket when the task returns). So every inbound connection ever accepted
  kept its slot and its task for the host's lifetime: a peer that connected and
  disconnected 250 times (about 3 s from 20 keys) left a node refusing every inbound
  connection from then on, and each connection left a task behind. Here the upgrade, when
  it runs for the listener's task, waits for the connection's close and then raises
  ``_InboundEnded``, which the swarm's handler takes like any failed connection (it closes
  what is already closed and returns, so its slot and task are freed). Upgrades the swarm
  runs for others (a hole punch answering as the responder, a relay's circuit) are left as
  they are: they run in other tasks.
- *All slots to one source.* 250 TCP connections that never start the handshake (no
  key, no crypto: 250 sockets, opened again every 10 s when the swarm's upgrade timeout
  drops them) took every slot. Here one source address (an IPv4 address, an IPv6 /64)
  holds at most ``per_source`` slots, pending handshakes and open connections together
  (half of the cap by default); one over is closed before its handshake and counted as
  ``refused_connections``. An honest source rarely needs more than a handful: each node
  behind it uses one connection to this one.

A connection that does not finish its security and muxer handshake within the swarm's
``inbound_upgrade_timeout`` (10 s) is closed by py-libp2p, whether it came over TCP or
through a circuit relay (a relay's STOP stream is upgraded by the same swarm method);
here each such connection is also counted, as ``handshakes_cut``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from p2pfl.errors import P2PFLError
from p2pfl.versions import require

# patches private methods of py-libp2p's swarm, measured on this release only
require("libp2p", at_least="0.8.1", below="0.8.2", why="p2pfl.transport._inbound")

import trio  # noqa: E402  (after the version check)
from libp2p.connection_types import ConnectionType  # noqa: E402
from libp2p.network.exceptions import SwarmException  # noqa: E402
from libp2p.network.swarm import Swarm  # noqa: E402

__all__ = ["Shares", "guard_inbound_slots", "peer_source", "source_of"]

_K = TypeVar("_K", bound=Hashable)


class Shares(Counter[_K]):
    """How much of a bounded resource each holder (a source address, a source and a
    destination, ...) has: ``take`` refuses a holder at its cap, ``give`` hands one back,
    and a holder at zero leaves the table (it holds only those who hold something)."""

    def take(self, holder: _K, cap: int) -> bool:
        """One more for ``holder``, unless it holds ``cap`` already."""
        if self[holder] >= cap:
            return False
        self[holder] += 1
        return True

    def give(self, holder: _K) -> None:
        """One back from ``holder``."""
        if self[holder] <= 1:
            self.pop(holder, None)
        else:
            self[holder] -= 1


class _InboundEnded(P2PFLError):
    """The inbound connection a listener's task held has closed: the task may end."""


def source_of(read_write_closer: Any) -> str | None:
    """Who a raw inbound connection comes from, as far as slots go: its IPv4 address, or
    the /64 network of its IPv6 address (one host can have a whole /64); ``None`` if the
    socket does not say."""
    try:
        host = read_write_closer.get_remote_address()[0]
        address = ipaddress.ip_address(host)
    except Exception:  # noqa: BLE001 - a socket already gone, a transport without addresses
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def peer_source(swarm: Swarm, peer_id: Any) -> str | None:
    """The source (``source_of``) of ``peer_id``'s first direct connection; ``None`` when
    it has none (a relayed connection comes from the relay's address: not the peer's)."""
    try:
        for conn in swarm.get_connections(peer_id):
            if conn.get_connection_type() != ConnectionType.RELAYED:
                return source_of(conn.muxed_conn.secured_conn)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a connection closing meanwhile
        pass
    return None


def guard_inbound_slots(
    swarm: Swarm, refused: Callable[[str], None], *, per_source: int | None = None
) -> None:
    """Make each inbound connection's listener task end (freeing its slot) when the
    connection closes, not when ``swarm`` finishes, and let one source hold at most
    ``per_source`` slots (``None``: half of the swarm's inbound cap). ``refused(stat)`` is
    told of each connection refused for its source (``refused_connections``) and of each
    inbound upgrade, direct or relayed, cut at the swarm's timeout (``handshakes_cut``)."""
    upgrade = swarm.upgrade_inbound_raw_conn
    handle = swarm._do_handle_inbound_connection
    cap = per_source or max(1, int(swarm._inbound_limiter.total_tokens) // 2)
    listener_tasks: set[Any] = set()  # tasks the listener runs for an inbound connection
    held: Shares[str] = Shares()  # slots per source

    async def handle_until_closed(read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
        source = source_of(read_write_closer)
        if source is not None and not held.take(source, cap):
            refused("refused_connections")
            with trio.move_on_after(1.0):
                await read_write_closer.close()
            return
        task = trio.lowlevel.current_task()
        listener_tasks.add(task)
        try:
            await handle(read_write_closer, maddr, failure_event)
        finally:
            listener_tasks.discard(task)
            if source is not None:
                held.give(source)

    async def upgrade_then_wait(raw_conn: Any, maddr: Any) -> Any:
        began = trio.current_time()
        try:
            muxed = await upgrade(raw_conn, maddr)
        except SwarmException:
            # the swarm's own deadline (failures have no type of their own): closed already
            if trio.current_time() - began >= swarm.connection_config.inbound_upgrade_timeout:
                refused("handshakes_cut")
            raise
        closed = getattr(muxed, "event_closed", None)  # yamux's, the only muxer offered
        if trio.lowlevel.current_task() not in listener_tasks or closed is None:
            return muxed
        await closed.wait()
        raise _InboundEnded

    swarm._do_handle_inbound_connection = handle_until_closed  # type: ignore[method-assign]
    swarm.upgrade_inbound_raw_conn = upgrade_then_wait  # type: ignore[method-assign]
