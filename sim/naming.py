"""How the simulator names its peers, and the keys they sign with.

By default simulated peer ``i`` is ``p{i}``: short, readable in logs and results. A node
is named by its key (a libp2p peer id). Whatever a protocol orders by peer id -- MoDeST
ranks a round's candidates by a hash of ``(round, peer id)`` -- then differs between a
simulation and nodes, though every computation is the same. ``peer_names = "keys"``
names each simulated peer by the peer id of the key the simulator's keyring derives for
it, so nodes that run those keys (``Keyring.derive`` is deterministic) see the very same
names, and the two drivers make the very same choices.
"""

from __future__ import annotations

from typing import Literal

from p2pfl.protocols.records import Keyring

PeerNames = Literal["index", "keys"]


def index_label(index: int) -> str:
    """The name (and keyring label) of simulated peer ``index``: ``p{index}``."""
    return f"p{index}"


def name_peers(
    n: int, seed: int, *, names: PeerNames = "index", signed: bool = True
) -> tuple[list[str], Keyring | None]:
    """The ``n`` peers' names, and their keyring when they sign (or are named by key).

    The keys are derived from the index labels either way, so a peer's key does not
    depend on how it is named.
    """
    labels = [index_label(i) for i in range(n)]
    if names == "index":
        return labels, Keyring.derive(labels, seed) if signed else None
    derived = Keyring.derive(labels, seed)
    identities = [derived.identities[label] for label in labels]
    keyring = Keyring({identity.peer_id: identity for identity in identities})
    return [identity.peer_id for identity in identities], keyring
