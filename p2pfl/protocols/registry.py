"""Building a protocol object from its configuration, for the node and the simulator alike.

The one place that maps a protocol's configuration to its code: :func:`protocol_class`
(whose class attributes tell a driver how rounds progress, whether the guard's round
window applies, whether the graph must be connected) and :func:`build_protocol`.
Drivers ask these instead of branching on a protocol's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from p2pfl.config import (
    BristleConfig,
    DPSGDConfig,
    EpidemicConfig,
    FedAvgConfig,
    FoolsGoldConfig,
    GossipConfig,
    ModestConfig,
    ProtocolConfig,
    SybilWallConfig,
    ZerothOrderConfig,
)
from p2pfl.protocols.base import PeerId, Protocol
from p2pfl.protocols.dpsgd import DPSGD
from p2pfl.protocols.epidemic import EpidemicLearning
from p2pfl.protocols.gossip import GossipLearning
from p2pfl.protocols.synchronous import AggregateFn

if TYPE_CHECKING:
    from p2pfl.protocols.records import RecordSigner


def protocol_class(config: ProtocolConfig) -> type[Protocol]:
    """The class of the protocol ``config`` describes: what a driver reads the protocol's
    declarations from (``progress``, ``max_round_lag``, ``needs_connected_graph``) before
    any peer is built."""
    if isinstance(config, DPSGDConfig):
        return DPSGD
    if isinstance(config, EpidemicConfig):
        return EpidemicLearning
    if isinstance(config, GossipConfig):
        return GossipLearning
    if isinstance(config, ModestConfig):
        from p2pfl.protocols.modest import ModestProtocol

        return ModestProtocol
    if isinstance(config, SybilWallConfig):
        from p2pfl.protocols.sybilwall import SybilWall

        return SybilWall
    if isinstance(config, BristleConfig):
        from p2pfl.protocols.bristle import Bristle

        return Bristle
    if isinstance(config, FoolsGoldConfig):
        from p2pfl.protocols.foolsgold import FoolsGold

        return FoolsGold
    if isinstance(config, FedAvgConfig):
        from p2pfl.protocols.fedavg import FedAvg

        return FedAvg
    if isinstance(config, ZerothOrderConfig):
        from p2pfl.protocols.zeroth_order import ZerothOrder

        return ZerothOrder
    raise ValueError(f"unknown protocol config {config!r}")


def mixing_scheme(config: ProtocolConfig) -> str | None:
    """The scheme of the mixing weights a driver derives from its graph for this protocol
    (``"metropolis_hastings"`` or ``"uniform"``); ``None``: it takes no given weights."""
    return config.mixing if isinstance(config, DPSGDConfig) else None


def make_aggregate(config: ProtocolConfig) -> AggregateFn | None:
    """The robust aggregator the config names; ``None`` for the protocol's own mean."""
    if config.aggregator == "mean" and not config.aggregator_params:
        return None
    from p2pfl.aggregation import get_aggregator

    return get_aggregator(config.aggregator, **config.aggregator_params)


def build_protocol(
    config: ProtocolConfig,
    *,
    peer_id: PeerId,
    params: torch.Tensor,
    neighbours: list[PeerId],
    population: list[PeerId] | None = None,
    mixing_weights: Mapping[PeerId, float] | None = None,
    aggregate: AggregateFn | None = None,
    seed: int = 0,
    extras: Mapping[str, Any] | None = None,
    signer: RecordSigner | None = None,
) -> Protocol:
    """The protocol object ``config`` describes, for one peer.

    ``extras`` are driver-supplied inputs some protocols need beyond the config: Bristle
    needs ``output`` (an ``OutputLayer``), ``probe_features`` and ``probe_labels``.
    ``signer`` signs and checks the data a protocol relays for others (MoDeST's view
    entries, SybilWall's histories; see ``p2pfl.protocols.records``); protocols that
    relay nothing ignore it. ``None``: relayed data travels unsigned.
    """
    steps = config.local_steps
    if isinstance(config, DPSGDConfig):
        return DPSGD(
            peer_id,
            params,
            neighbours,
            weights=mixing_weights,
            mixing=config.mixing,
            round_timeout=config.round_timeout,
            aggregate=aggregate,
            local_steps=steps,
            seed=seed,
        )
    if isinstance(config, EpidemicConfig):
        candidates = neighbours
        if config.peer_sampling == "population" and population is not None:
            candidates = [p for p in population if p != peer_id]
        return EpidemicLearning(
            peer_id,
            params,
            candidates,
            fanout=config.fanout,
            round_timeout=config.round_timeout,
            aggregate=aggregate,
            local_steps=steps,
            seed=seed,
        )
    if isinstance(config, GossipConfig):
        return GossipLearning(peer_id, params, neighbours, period=config.period, local_steps=steps, seed=seed)
    if isinstance(config, ModestConfig):
        from p2pfl.protocols.modest import ModestProtocol

        return ModestProtocol(
            peer_id,
            params,
            neighbours,
            population=list(population or [peer_id, *neighbours]),
            sample_size=config.sample_size,
            num_aggregators=config.num_aggregators,
            success_fraction=config.success_fraction,
            ping_timeout=config.ping_timeout,
            aggregation_timeout=config.aggregation_timeout,
            min_aggregation_count=config.min_aggregation_count,
            idle_timeout=config.idle_timeout,
            aggregate=aggregate,
            signer=signer,
            local_steps=steps,
            seed=seed,
        )
    if isinstance(config, SybilWallConfig):
        from p2pfl.protocols.sybilwall import SybilWall

        return SybilWall(
            peer_id,
            params,
            neighbours,
            gossip_decay=config.gossip_decay,
            max_known=config.max_known,
            kappa=config.kappa,
            round_timeout=config.round_timeout,
            aggregate=aggregate,
            signer=signer,
            local_steps=steps,
            seed=seed,
        )
    if isinstance(config, BristleConfig):
        from p2pfl.protocols.bristle import Bristle

        needed = ("output", "probe_features", "probe_labels")
        missing = [key for key in needed if key not in (extras or {})]
        if missing:
            raise ValueError(
                f"bristle needs the driver to supply {', '.join(missing)} "
                "(the frozen extractor's output layer and the peer's probe set)"
            )
        assert extras is not None
        return Bristle(
            peer_id,
            params,
            neighbours,
            output=extras["output"],
            probe_features=extras["probe_features"],
            probe_labels=extras["probe_labels"],
            keep_closest=config.keep_closest,
            n_random=config.n_random,
            tolerance=config.tolerance,
            round_timeout=config.round_timeout,
            local_steps=steps,
            seed=seed,
        )
    if isinstance(config, FedAvgConfig):
        return _fedavg(config, peer_id, params, neighbours, population, aggregate, seed, extras)
    if isinstance(config, ZerothOrderConfig):
        from p2pfl.protocols.zeroth_order import ZerothOrder

        return ZerothOrder(
            peer_id,
            params,
            neighbours,
            lr=config.lr,
            eps=config.eps,
            grad_scale=config.grad_scale,
            round_timeout=config.round_timeout,
            seed=seed,
        )
    raise ValueError(f"unknown protocol config {config!r}")


def fedavg_server(config: FedAvgConfig, peer_id: PeerId, population: list[PeerId] | None) -> PeerId:
    """The server's peer id: ``server_id`` if given, else the peer of index ``server``.

    The simulator passes its population in index order (``p0, p1, ...``); a node passes
    the sorted ids of the peers it met, so there index ``server`` is the ``server``-th
    smallest id: give ``server_id`` on real nodes.
    """
    if config.server_id is not None:
        return config.server_id
    members = list(population) if population else [peer_id]
    if config.server >= len(members):
        raise ValueError(
            f"protocol.server={config.server} is not among the {len(members)} known peers; "
            "give protocol.server_id"
        )
    return members[config.server]


def _fedavg(
    config: FedAvgConfig,
    peer_id: PeerId,
    params: torch.Tensor,
    neighbours: list[PeerId],
    population: list[PeerId] | None,
    aggregate: AggregateFn | None,
    seed: int,
    extras: Mapping[str, Any] | None,
) -> Protocol:
    from p2pfl.protocols.fedavg import FedAvg

    settings: dict[str, Any] = {
        "server": fedavg_server(config, peer_id, population),
        "clients_per_round": config.clients_per_round,
        "round_timeout": config.round_timeout,
        "min_updates": config.min_updates,
        # a peer's weight is its number of training samples, when the assembly says it
        "samples": int((extras or {}).get("data_size", 1)),
        "weighting": config.weighting,
        "aggregate": aggregate,
        "local_steps": config.local_steps,
        "seed": seed,
    }
    if isinstance(config, FoolsGoldConfig):
        from p2pfl.protocols.foolsgold import FoolsGold

        return FoolsGold(peer_id, params, neighbours, kappa=config.kappa, **settings)
    return FedAvg(peer_id, params, neighbours, **settings)
