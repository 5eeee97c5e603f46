"""Start-up checks of ``p2pfl node``: every input a user can get wrong, before anything runs.

A bad address, a taken port, a corrupt key file, an unknown aggregator or a state
directory that cannot be written would otherwise surface minutes later, deep inside
libp2p, torch or the first checkpoint, as a traceback (or, for a bootstrap address,
not at all). Each check here raises :class:`StartupError` with one line that names the
key or file and says what was expected; ``p2pfl node`` prints it and exits with status 2.

The checks run before the dataset is loaded and before the transport starts, so a typo
costs the user a second, not a discovery timeout.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import tempfile
import warnings
from pathlib import Path

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.identity import Identity

__all__ = ["StartupError", "check_node_inputs", "check_tracking", "load_identity", "parse_addr"]

log = logging.getLogger("p2pfl.node.startup")

#: first protocol of an address the TCP transport can use (dns*: dial only)
_DIAL_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")
_LISTEN_HOSTS = ("ip4", "ip6")
#: multiaddr's messages look like "Invalid MultiAddr 'x': <reason> (string: x)"
_REASON = re.compile(r"^Invalid MultiAddr '.*?': (?P<reason>.*?)(?: \(string: .*\))?$", re.S)


class StartupError(ConfigError):
    """An input ``p2pfl node`` cannot start with; the message is one line for the user."""


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    match = _REASON.match(text)
    return match.group("reason") if match else "not a multiaddr"


def parse_addr(key: str, addr: str, *, dial: bool) -> str:
    """Check that ``addr`` is a TCP multiaddr this node can listen on (``dial=False``:
    ``/ip4|ip6/<host>/tcp/<port>``) or dial (``/ip4|ip6|dns*/<host>/tcp/<port>/p2p/<id>``);
    returns it unchanged, or raises :class:`StartupError` naming ``key``."""
    from multiaddr import Multiaddr  # light (no libp2p); only the node needs it

    hosts = _DIAL_HOSTS if dial else _LISTEN_HOSTS
    expected = "/ip4/<address>/tcp/<port>/p2p/<peer id>" if dial else "/ip4/<address>/tcp/<port>"
    try:
        names = [proto.name for proto in Multiaddr(addr).protocols()]
    except Exception as error:  # multiaddr raises several types, all meaning "malformed"
        raise StartupError(f"{key}: {addr!r}: {_reason(error)}; expected {expected}") from None
    shape = [names[0] if names and names[0] in hosts else None, "tcp"] + (["p2p"] if dial else [])
    if names != shape:
        what = "a dialable peer address" if dial else "an address to listen on"
        raise StartupError(f"{key}: {addr!r} is not {what}; expected {expected}")
    return addr


def check_port_free(addr: str) -> None:
    """Refuse a listen address whose TCP port is taken (or whose host is not this one).

    libp2p binds with SO_REUSEPORT, so a second node on a taken port would start without
    a word and share the port's connections; a probe bound without it fails instead.
    """
    from multiaddr import Multiaddr

    parsed = Multiaddr(addr)
    names = {proto.name for proto in parsed.protocols()}
    port = int(parsed.value_for_protocol("tcp"))
    if port == 0:
        return  # the kernel picks a free one
    family, host_proto = (socket.AF_INET6, "ip6") if "ip6" in names else (socket.AF_INET, "ip4")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers
        try:
            probe.bind((parsed.value_for_protocol(host_proto), port))
        except OSError as error:
            taken = error.errno == errno.EADDRINUSE
            hint = " (another node or program has this port)" if taken else ""
            raise StartupError(
                f"network.listen: cannot listen on {addr}: {error.strerror}{hint}"
            ) from None


def load_identity(path: str | Path) -> Identity:
    """The node's identity from ``key_file`` (created if missing), or a one-line error."""
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            identity = Identity.load_or_create(path)
        for warning in caught:  # one log line, not Python's two-line warning format
            log.warning("%s", warning.message)
        return identity
    except ValueError:
        size = path.stat().st_size if path.is_file() else 0
        raise StartupError(
            f"key_file: {path}: not a libp2p Ed25519 private key ({size} bytes); expected "
            "the 36-byte key file p2pfl node writes (move it away to create a new identity)"
        ) from None
    except OSError as error:
        raise StartupError(f"key_file: {path}: {error.strerror or error}") from None


def check_state_dir(path: str | Path) -> None:
    """``state_dir`` must be a directory this process can create files in (checkpoints,
    ``status.json``): found out now rather than at the end of the first round."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".probe."):
            pass
    except OSError as error:
        raise StartupError(
            f"state_dir: {path}: cannot write there ({error.strerror or error}); "
            "expected a writable directory"
        ) from None


def check_aggregator(config: NodeConfig) -> None:
    """The aggregator's name and parameters, checked as the protocol will build them."""
    from p2pfl.aggregation.registry import AGGREGATORS
    from p2pfl.protocols.registry import make_aggregate

    protocol = config.protocol
    try:
        make_aggregate(protocol)
    except ValueError as error:
        key = "aggregator" if protocol.aggregator not in AGGREGATORS else "aggregator_params"
        raise StartupError(f"protocol.{key}: {error}") from None


def check_tracking(config: NodeConfig) -> None:
    """``tensorboard = true`` needs the optional package: said now, not after discovery
    when the first round ends (the same one line as ``p2pfl sim --tensorboard``)."""
    if not config.tensorboard:
        return
    from p2pfl.tracking import TrackingUnavailable, require_tensorboard

    try:
        require_tensorboard()
    except TrackingUnavailable as error:
        raise StartupError(f"tensorboard: {error}") from None


def check_event_loop(config: NodeConfig) -> None:
    """``event_loop = "uvloop"`` needs uvloop installed (``"auto"`` does without it)."""
    from p2pfl.eventloop import uvloop_available

    if config.event_loop == "uvloop" and not uvloop_available():
        raise StartupError(
            'event_loop: "uvloop" is not installed here (pip install uvloop; not built for '
            'Windows); set event_loop = "auto" or "asyncio"'
        )


def check_node_inputs(config: NodeConfig) -> Identity:
    """Every check above, in the order a user would fix them; returns the identity."""
    for addr in config.network.listen:
        parse_addr("network.listen", addr, dial=False)
    for addr in config.network.bootstrap:
        parse_addr("network.bootstrap", addr, dial=True)
    check_aggregator(config)
    check_tracking(config)
    check_event_loop(config)
    for addr in config.network.listen:
        check_port_free(addr)
    check_state_dir(config.state_dir)
    return load_identity(config.key_file)
