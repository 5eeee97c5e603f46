"""The assembly of a peer: what both drivers call to build the peers they run.

The node (one peer per process) and the simulator (thousands in one process) must run the
same peer, or what a simulation shows would not hold on a real network. So neither
assembles one itself; both go through this module, from the same configuration sections
(:mod:`p2pfl.config`: data, model, protocol, attack):

- :func:`build_commons`, once per network: the dataset cut into data shares, one
  :class:`~p2pfl.learning.LocalTrainer` (the simulator trains every peer through it, in
  batches), the start model every peer begins from (``init_params(seed)``, or Bristle's
  pre-trained shared extractor) and the aggregator the configuration names;
- :meth:`Commons.peer`, per peer: its data share, its minibatch sampler and its protocol
  inputs (Bristle's probe set), all derived from the seed and the peer's index;
- :meth:`Commons.build_protocol`, per peer: the protocol object
  (:func:`~p2pfl.protocols.registry.build_protocol`), its models sent through the
  configured codec (:mod:`p2pfl.protocols.compression`);
- :func:`wrap_attacker`, per Byzantine peer: the protocol wrapped as its attack needs.

What is the driver's own stays with it: which peers hold which share (the simulator's
relay-only and Sybil peers hold none), the neighbours and the population (a graph, or the
peers a node met), the signer of relayed data, and what an attacker knows of honest models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from p2pfl.config import (
    AttackOptions,
    BristleConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    ProtocolConfig,
    ZerothOrderConfig,
)
from p2pfl.learning import (
    BatchSampler,
    Dataset,
    LocalTrainer,
    build_model,
    load_dataset,
    partition,
    sampler_seed,
)
from p2pfl.learning.partition import PartitionError
from p2pfl.model import model_from_factory
from p2pfl.plugins import is_factory_path
from p2pfl.protocols.base import PeerId, Protocol
from p2pfl.protocols.compression import compress
from p2pfl.protocols.registry import build_protocol, make_aggregate, protocol_class

if TYPE_CHECKING:
    from p2pfl.attacks import Attack, Collusion
    from p2pfl.attacks.behaviour import Knowledge
    from p2pfl.protocols.bristle import SharedExtractor
    from p2pfl.protocols.records import RecordSigner
    from p2pfl.protocols.synchronous import AggregateFn

__all__ = [
    "Commons",
    "PeerSetup",
    "attacker_seed",
    "build_commons",
    "build_trainer",
    "wrap_attacker",
]


@dataclass(frozen=True)
class PeerSetup:
    """What one peer starts with besides its protocol: its data and its protocol inputs."""

    index: int
    #: its samples (indices into the training set); empty for a peer that holds no data
    share: np.ndarray
    #: its minibatches, seeded by ``(seed, index)``; ``None`` when it holds no data
    sampler: BatchSampler | None
    #: the per-peer inputs its protocol needs beyond the configuration (Bristle's probe set)
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def data_size(self) -> int:
        return len(self.share)


@dataclass(frozen=True)
class Commons:
    """What every peer of one network shares, built once by :func:`build_commons`."""

    protocol: ProtocolConfig
    seed: int
    batch_size: int
    dataset: Dataset
    #: the training set cut into data shares (``shares[k]``: indices of share ``k``)
    shares: list[np.ndarray]
    #: one trainer for all peers (the simulator batches their training through it)
    trainer: LocalTrainer
    #: every peer's start vector (never handed out: each peer gets a copy)
    start: torch.Tensor
    #: the aggregator the configuration names; ``None``: the protocol's own mean
    aggregate: AggregateFn | None = None
    #: Bristle's pre-trained shared feature extractor (``None`` for other protocols)
    extractor: SharedExtractor | None = None

    def never_aggregates(self, degree: int, neighbourhood: str) -> str | None:
        """One line naming ``protocol.aggregator_params`` when the configured robust rule,
        with a fixed ``f``, can never run at a peer with ``degree`` neighbours (krum with
        f = 1 needs 5 models; a ring's D-PSGD peer combines 3): every round would keep its
        own model (``too_few_to_aggregate``). ``None`` when it can. How many models one
        aggregation combines is the protocol's declaration (``most_models_aggregated``);
        ``neighbourhood`` says where ``degree`` came from, for the message. The simulator
        refuses such a scenario, a node (which meets its neighbours by discovery) warns."""
        from p2pfl.aggregation import RuleAggregator

        if not isinstance(self.aggregate, RuleAggregator):
            return None
        declared = protocol_class(self.protocol)
        most = declared.most_models_aggregated(self.protocol, degree)
        refusal = self.aggregate.refusal(most) if most is not None else None
        if refusal is None:
            return None
        key = declared.aggregation_bound
        bound = f"protocol.{key} = {getattr(self.protocol, key)}" if key else neighbourhood
        return (
            f"protocol.aggregator_params: {refusal}, but {declared.name} combines at most "
            f"{most} models a round ({bound}; its own model included), so it would never "
            "aggregate; lower f, give f_fraction, or set clamp = true"
        )

    @property
    def message_dim(self) -> int:
        """Elements of the tensor a message carries, known before any protocol is built
        (a node screens messages that arrive while it is still discovering)."""
        return self.extractor.output.numel if self.extractor is not None else self.trainer.dim

    def peer(self, index: int, share: int | None) -> PeerSetup:
        """Peer ``index`` holding data share ``share`` (``None``: it holds no data)."""
        if share is None:
            return PeerSetup(index, np.zeros(0, dtype=np.int64), None, self._extras(index, None))
        indices = self.shares[share]
        sampler = BatchSampler(indices, self.batch_size, sampler_seed(self.seed, index))
        return PeerSetup(index, indices, sampler, self._extras(index, indices))

    def _extras(self, index: int, indices: np.ndarray | None) -> dict[str, Any]:
        """Bristle's per-peer inputs: the output layer's place and the features of a probe
        set drawn from the peer's own samples (empty without data); nothing otherwise."""
        if self.extractor is None:
            return {}
        assert isinstance(self.protocol, BristleConfig)
        from p2pfl.protocols.bristle import probe_set

        if indices is None:
            return self.extractor.extras(*self.extractor.empty_probe())
        probe = probe_set(
            self.extractor,
            self.dataset.x_train,
            self.dataset.y_train,
            self.extractor.probe_source(indices),
            self.protocol.probe_samples,
            seed=self.seed,
            peer=index,
        )
        own = self.dataset.y_train[torch.from_numpy(indices.astype(np.int64))].unique()
        return self.extractor.extras(*probe, own_labels=own)

    def build_protocol(
        self,
        setup: PeerSetup,
        *,
        peer_id: PeerId,
        neighbours: list[PeerId],
        population: list[PeerId] | None = None,
        mixing_weights: Mapping[PeerId, float] | None = None,
        signer: RecordSigner | None = None,
        aggregate: AggregateFn | None = None,
        share_start: bool = False,
    ) -> Protocol:
        """The protocol of peer ``setup``, starting from the shared start vector.

        ``aggregate`` replaces the configured aggregator (the simulator's batched backend
        defers the plain means); ``None`` keeps :attr:`aggregate`. Each peer gets its own
        copy of the start vector unless ``share_start``: a driver that holds thousands of
        peers in one process and never lets a protocol write into a model (protocols
        replace ``params``, never modify it) shares one vector instead of a row per peer.
        """
        protocol = build_protocol(
            self.protocol,
            peer_id=peer_id,
            params=self.start if share_start else self.start.clone(),
            neighbours=neighbours,
            population=population,
            mixing_weights=mixing_weights,
            aggregate=aggregate if aggregate is not None else self.aggregate,
            seed=self.seed,
            # the peer's sample count: FedAvg weights a client's update by it
            extras={"data_size": setup.data_size, **setup.extras},
            signer=signer,
        )
        # the stream of peer ``index`` in both drivers (the simulator names it ``p{index}``)
        protocol.use_stream(stream_label(setup.index))
        # the models it sends, through the configured codec (``protocol.codec``): the same
        # lossy models, and the same encoded bytes, in both drivers
        return compress(protocol, self.protocol.codec)


def use_torch_threads(threads: int) -> None:
    """Run torch with ``threads`` threads (0: leave torch's default, one per core);
    ``p2pfl.config.DEFAULT_TORCH_THREADS`` says why both drivers default to one."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def stream_label(index: int) -> str:
    """The label of peer ``index``'s random stream: its simulator name, in both drivers."""
    return f"p{index}"


def build_trainer(dataset: Dataset, model: ModelConfig, data: DataConfig) -> LocalTrainer:
    """The local trainer of the configured model on ``dataset``'s training set."""
    hidden = tuple(model.hidden) if model.hidden else None
    if is_factory_path(model.name):  # the user's own (p2pfl.plugins)
        net = model_from_factory(model.name, dataset.input_shape, dataset.num_classes, model.params)
    else:
        net = build_model(model.name, dataset.input_shape, dataset.num_classes, hidden=hidden)
    return LocalTrainer(
        net,
        dataset.x_train,
        dataset.y_train,
        lr=model.lr,
        batch_size=data.batch_size,
        weight_decay=model.weight_decay,
    )


def build_commons(
    data: DataConfig,
    model: ModelConfig,
    protocol: ProtocolConfig,
    *,
    seed: int,
    shares: int,
    dataset: Dataset | None = None,
) -> Commons:
    """Everything the peers of a network seeded ``seed`` share, the training set cut into
    ``shares`` data shares; ``dataset`` is loaded from ``data`` unless given.

    Deterministic in the configuration and the seed: a node computes the same commons as
    the simulator (and as every other node), without exchanging anything.
    """
    if dataset is None:
        dataset = load_dataset(data.dataset, data_dir=data.data_dir, seed=seed)
    try:
        parts = partition(
            dataset.y_train.numpy(),
            shares,
            data.partition,
            seed=seed,
            alpha=data.alpha,
            shards_per_peer=data.shards_per_peer,
            sources=dataset.sources,
        )
    except PartitionError as error:  # the peers' count and the scheme are the user's keys
        cut = f"data.partition = {data.partition!r}"
        if data.partition == "shards":
            cut += f", data.shards_per_peer = {data.shards_per_peer}"
        raise ConfigError(
            f"data: {error} (the {data.dataset} training set; {shares} peers (topology.n, or a node's "
            f"num_peers), {cut}): use fewer peers or another partition"
        ) from None
    trainer = build_trainer(dataset, model, data)
    start = trainer.init_params(seed)
    extractor = None
    spec = protocol.start_config()
    if spec is not None:
        # a pre-trained extractor and a fresh output layer: Bristle's, or the same for any
        # protocol (protocol.shared_start); a public split of the task's own training set
        # is held out of every share
        from p2pfl.protocols.bristle import shared_start

        shared, held_out = shared_start(spec, trainer, seed=seed, data_dir=data.data_dir)
        if isinstance(protocol, BristleConfig) and protocol.probe == "iid":
            shared = shared.with_probe_pool(protocol.probe_pool, len(trainer.y), seed)
            assert shared.probe_pool is not None
            held_out = np.union1d(held_out, shared.probe_pool)
        if len(held_out):
            parts = [np.setdiff1d(part, held_out) for part in parts]
        start = shared.start
        extractor = shared if isinstance(protocol, BristleConfig) else None
    elif isinstance(protocol, ZerothOrderConfig):
        # zeroth-order fine-tuning starts from a briefly SGD-trained model (n6)
        from p2pfl.protocols.zo_start import pretrained_start

        start = pretrained_start(
            trainer,
            start,
            seed=seed,
            samples=protocol.pretrain_samples,
            steps=protocol.pretrain_steps,
        )
    return Commons(
        protocol=protocol,
        seed=seed,
        batch_size=data.batch_size,
        dataset=dataset,
        shares=list(parts),
        trainer=trainer,
        start=start,
        aggregate=make_aggregate(protocol),
        extractor=extractor,
    )


def attacker_seed(index: int, seed: int) -> int:
    """The seed of Byzantine peer ``index``'s noise (noise attacks, Sybil jitter)."""
    return index + 7919 * seed


def wrap_attacker(
    protocol: Protocol,
    attack: Attack,
    options: AttackOptions,
    *,
    index: int,
    seed: int,
    isolate: bool,
    n_total: int,
    n_byzantine: int,
    knowledge: Knowledge | None = None,
    collusion: Collusion | None = None,
    jitter: float = 0.0,
) -> Protocol:
    """Peer ``index``'s protocol as a Byzantine peer carrying out ``attack``: wrapped in
    :class:`~p2pfl.attacks.ByzantineProtocol` when the attack needs it, else unchanged.

    ``n_total``/``n_byzantine`` feed ALIE's ``z_max``; ``knowledge`` is what it knows of
    honest models (``None``: what the peer itself received); ``collusion`` and ``jitter``
    make Sybil identities send one shared vector.
    """
    from p2pfl.attacks import as_attacker

    return as_attacker(
        protocol,
        attack,
        isolate=isolate,
        knowledge=knowledge,
        delay=options.delay,
        n_total=n_total,
        n_byzantine=n_byzantine,
        collusion=collusion,
        jitter=jitter,
        seed=attacker_seed(index, seed),
    )
