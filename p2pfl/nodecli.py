"""Loading a node's configuration and running it with the libp2p transport.

Kept apart from ``p2pfl.node`` so that the agent itself stays transport-neutral (tests
drive it over the in-memory transport).
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from p2pfl.config import ConfigError, NodeConfig, describe_validation_error, parse_override


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
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise NodeConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as error:
            raise NodeConfigError(f"{path}: not valid TOML: {error}") from None
    for dotted, value in (flags or {}).items():
        _set_path(raw, dotted, value)
    for item in overrides:
        try:
            keys, value = parse_override(item)
        except ConfigError as error:
            raise NodeConfigError(str(error)) from None
        _set_path(raw, ".".join(keys), value)
    try:
        return NodeConfig.model_validate(raw)
    except ValidationError as error:
        raise NodeConfigError(describe_validation_error(error)) from None


def run_node(config: NodeConfig) -> dict[str, Any]:
    """Build identity, libp2p transport and node; run until done or signalled."""
    from p2pfl.identity import Identity
    from p2pfl.node import Node
    from p2pfl.transport.libp2p import Libp2pTransport, configure_libp2p_logging

    configure_libp2p_logging(logging.WARNING)
    # A dial to a peer that is down is expected (peers crash, restart, leave); the node
    # reports it in its own terms, so libp2p's per-attempt error lines are noise.
    logging.getLogger("libp2p.transport.tcp").setLevel(logging.CRITICAL)
    identity = Identity.load_or_create(config.key_file)
    transport = Libp2pTransport(
        identity.libp2p_keypair,
        listen_addrs=config.network.listen,
        max_message_size=config.network.max_message_bytes,
        mdns=config.network.mdns,
    )
    node = Node(config, transport, identity)
    return asyncio.run(node.run())
