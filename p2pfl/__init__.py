"""p2pfl: fully decentralized peer-to-peer learning.

The names a notebook or a script needs are importable from here; each is loaded on first
use, so ``import p2pfl`` stays cheap (a node's command line imports only what it runs)::

    from p2pfl import NodeConfig, Node, build_protocol, check_message
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from topologies.lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    # errors: every error of the project derives from P2PFLError
    "P2PFLError": "p2pfl.errors",
    # configuration
    "ConfigError": "p2pfl.config",
    "NodeConfig": "p2pfl.config",
    "ProtocolConfig": "p2pfl.config",
    # protocols and their contract
    "Protocol": "p2pfl.protocols.base",
    "Message": "p2pfl.protocols.base",
    "build_protocol": "p2pfl.protocols.registry",
    "MessageSpec": "p2pfl.protocols.contract",
    "Refusal": "p2pfl.protocols.contract",
    "Role": "p2pfl.protocols.contract",
    "check_message": "p2pfl.protocols.contract",
    # aggregation and attacks
    "get_aggregator": "p2pfl.aggregation",
    "get_attack": "p2pfl.attacks",
    # the real node
    "Identity": "p2pfl.identity",
    "Node": "p2pfl.node",
}

__all__ = [
    "ConfigError",
    "Identity",
    "Message",
    "MessageSpec",
    "Node",
    "NodeConfig",
    "P2PFLError",
    "Protocol",
    "ProtocolConfig",
    "Refusal",
    "Role",
    "__version__",
    "build_protocol",
    "check_message",
    "get_aggregator",
    "get_attack",
]

if TYPE_CHECKING:
    from p2pfl.aggregation import get_aggregator
    from p2pfl.attacks import get_attack
    from p2pfl.config import ConfigError, NodeConfig, ProtocolConfig
    from p2pfl.errors import P2PFLError
    from p2pfl.identity import Identity
    from p2pfl.node import Node
    from p2pfl.protocols.base import Message, Protocol
    from p2pfl.protocols.contract import MessageSpec, Refusal, Role, check_message
    from p2pfl.protocols.registry import build_protocol


if not TYPE_CHECKING:  # a type checker reads the imports above (and so catches a typo)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
