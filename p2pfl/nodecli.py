"""Loading a node's configuration and running it with the libp2p transport.

Kept apart from ``p2pfl.node`` so that the agent itself stays transport-neutral (tests
drive it over the in-memory transport).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from p2pfl import eventloop, gcstartup
from p2pfl.config import (
    ConfigError,
    NodeConfig,
    describe_validation_error,
    parse_override,
    read_toml,
)
from p2pfl.errors import P2PFLError

if TYPE_CHECKING:
    from p2pfl.identity import Identity
    from p2pfl.transport.libp2p import Libp2pTransport


class NodeConfigError(ConfigError):
    """A node configuration that cannot run; the message is one line for the user."""


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise NodeConfigError(f"{dotted}: {part!r} is not a table")
        node = child
    node[parts[-1]] = value


def load_node_config(
    path: Path | None, overrides: list[str], flags: dict[str, Any] | None = None
) -> NodeConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        # missing, a folder, unreadable, not UTF-8, not TOML: one line naming the file
        raw = read_toml(path, "config", NodeConfigError)
    for dotted, value in (flags or {}).items():
        _set_path(raw, dotted, value)
    for item in overrides:
        try:
            keys, value = parse_override(item)
        except ConfigError as error:
            raise NodeConfigError(str(error)) from None
        _set_path(raw, ".".join(keys), value)
    protocol = raw.get("protocol")
    if isinstance(protocol, dict) and "name" not in protocol:
        # a [protocol] table (or --set protocol.x=...) without a name tunes the default
        # protocol, as no table at all runs it
        protocol["name"] = NodeConfig.model_fields["protocol"].get_default(
            call_default_factory=True
        ).name
    try:
        return NodeConfig.model_validate(raw)
    except ValidationError as error:
        raise NodeConfigError(describe_validation_error(error)) from None


class StopRequested(P2PFLError):
    """SIGINT or SIGTERM arrived before the node's event loop took over the signals."""


def _stop_requested(signum: int, frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


def run_node(config: NodeConfig) -> dict[str, Any]:
    """Check the inputs, build identity, libp2p transport and node; run until done or
    signalled.

    Bad input raises :class:`~p2pfl.startup.StartupError` (one line) before anything
    starts. A signal while the dataset loads raises :class:`StopRequested`; from then on
    the node handles signals itself (it stops within a second or two in every phase).
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _stop_requested)
    try:
        return _build_and_run(config)
    finally:  # the caller's handlers again (a test runner's, an embedding program's)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: a level name (DEBUG, INFO, WARNING, ERROR) to see py-libp2p's own log at, the loggers
#: it is otherwise quiet on included (``NOISY_LOGGERS`` in p2pfl/transport/libp2p.py): for
#: diagnosing a network problem
LIBP2P_LOG_ENV = "P2PFL_LIBP2P_LOG"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def libp2p_logging() -> None:
    """py-libp2p's log into this process's handlers: warnings and worse, its loggers of a
    network's ordinary events quiet; ``P2PFL_LIBP2P_LOG=LEVEL`` shows all of it at that
    level. A value that is no level name is a ``ConfigError`` (one line, exit 2)."""
    from p2pfl.transport.libp2p import configure_libp2p_logging

    wanted = os.environ.get(LIBP2P_LOG_ENV, "").strip().upper()
    if not wanted:
        configure_libp2p_logging(logging.WARNING)
        return
    if wanted not in _LEVELS:
        raise NodeConfigError(f"{LIBP2P_LOG_ENV} = {wanted!r}: expected one of {', '.join(_LEVELS)}")
    configure_libp2p_logging(getattr(logging, wanted), quiet=False)


def make_transport(config: NodeConfig, identity: Identity) -> Libp2pTransport:
    """The node's libp2p transport, with the ``[network]`` table's addresses, sizes and
    resource limits (streams, buffered bytes, the frame deadline)."""
    from p2pfl.transport.libp2p import Libp2pTransport
    from p2pfl.transport.limits import TransportLimits

    libp2p_logging()
    net = config.network
    return Libp2pTransport(
        identity.libp2p_keypair,
        listen_addrs=net.listen,
        max_message_size=net.max_message_bytes,
        mdns=net.mdns,
        limits=TransportLimits.from_config(net),
        dht=net.dht,
        run=net.run or None,
        dht_interval=net.dht_interval,
        nat=nat_settings(config),
    )


def nat_settings(config: NodeConfig) -> Any:
    """The transport's NAT traversal settings (``_nat.NatSettings``), or ``None`` when
    ``network.reachability = "off"`` and the node is no relay."""
    net = config.network
    if net.reachability == "off" and not net.relay:
        return None
    from libp2p.relay.circuit_v2.resources import RelayLimits

    from p2pfl.transport._nat import NODE_RELAY_LINGER, NatSettings

    return NatSettings(
        reachability="auto" if net.reachability == "off" else net.reachability,
        relay=net.relay,
        hole_punching=net.hole_punching,
        linger=NODE_RELAY_LINGER,  # a relaying node outlives the circuits of the run's last models
        limits=RelayLimits(
            duration=net.relay_circuit_seconds,
            data=net.relay_circuit_bytes,
            max_circuit_conns=net.relay_max_circuits,
            max_reservations=net.relay_max_reservations,
        ),
    )


def _build_and_run(config: NodeConfig) -> dict[str, Any]:
    from p2pfl.startup import check_node_inputs
    from p2pfl.transport import _slim_imports  # noqa: F401  (before the key loads py-libp2p)

    identity = check_node_inputs(config)

    from p2pfl.node import Node

    transport = make_transport(config, identity)
    node = Node(config, transport, identity)
    gcstartup.started(freeze=True)
    return eventloop.run(node.run(), config.event_loop)


def run_relay(
    listen: list[str],
    key_file: Path,
    *,
    limits: dict[str, int],
    ready: Any,
) -> None:
    """Run a relay / bootstrap / DHT node until SIGINT or SIGTERM (``p2pfl relay``).

    It trains nothing and joins no run: it serves the DHT (every run's peers may use it
    as their bootstrap address), answers AutoNAT dial-back requests and relays for peers
    behind NAT within ``limits`` (``max_reservations``, ``max_circuits``,
    ``circuit_bytes``, ``circuit_seconds``). ``ready(addrs)`` is told the addresses to
    give to nodes as ``network.bootstrap`` once it listens. Bad input raises
    :class:`~p2pfl.startup.StartupError` (one line) before anything starts.
    """
    from p2pfl.startup import check_port_free, load_identity, parse_addr
    from p2pfl.transport import _slim_imports  # noqa: F401  (before the key loads py-libp2p)

    for addr in listen:
        parse_addr("--listen", addr, dial=False)
        check_port_free(addr)
    identity = load_identity(key_file)

    from libp2p.relay.circuit_v2.resources import RelayLimits

    from p2pfl.transport._nat import NatSettings
    from p2pfl.transport.libp2p import Libp2pTransport

    libp2p_logging()
    nat = NatSettings(
        reachability="public",
        relay=True,
        hole_punching=False,
        limits=RelayLimits(
            duration=limits["circuit_seconds"],
            data=limits["circuit_bytes"],
            max_circuit_conns=limits["max_circuits"],
            max_reservations=limits["max_reservations"],
        ),
    )
    transport = Libp2pTransport(identity.libp2p_keypair, listen_addrs=listen, dht=True, nat=nat)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await transport.start()
        try:
            ready(list(transport.listen_addrs))
            await stop.wait()
        finally:
            await transport.close()

    gcstartup.started(freeze=True)
    eventloop.run(serve())
