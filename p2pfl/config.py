"""Typed, validated configuration shared by the node and the simulator.

Data, model and protocol settings mean the same thing on a real node and in a simulated
peer, so they are defined once here. Every model forbids unknown keys, so a typo is an
error that names the key rather than a setting silently ignored.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from p2pfl.errors import P2PFLError
from p2pfl.eventloop import EventLoopChoice
from p2pfl.wire.framing import DEFAULT_MAX_FRAME_BYTES

if TYPE_CHECKING:
    from p2pfl.attacks.registry import Attack


class ConfigError(P2PFLError, ValueError):
    """A configuration that cannot be used; the message is one line meant for the user."""


#: the largest seed: NumPy's legacy seeding and scikit-learn's ``random_state`` (the
#: train/test split) take seeds in [0, 2**32 - 1]; a larger or negative one is refused when
#: the configuration is read, not as a traceback from inside the data loading
MAX_SEED = 2**32 - 1

#: more torch threads than this is a typo: torch crashed (SIGSEGV) asked for 100000, and no
#: machine this runs on has a thousand cores for one peer
MAX_TORCH_THREADS = 1024


def read_toml(path: str | Path, what: str, error: type[ConfigError] | None = None) -> dict[str, Any]:
    """The table of TOML file ``path`` (a ``what`` file: "scenario", "sweep", "config").

    Every way reading it can fail is one line naming the file, raised as ``error``
    (default :class:`ConfigError`): missing, a folder, unreadable, not UTF-8, not TOML.
    """
    kind = error or ConfigError
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise kind(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise kind(f"{path}: is a folder; expected a {what} TOML file") from None
    except UnicodeDecodeError:
        raise kind(f"{path}: not a text file (not UTF-8); expected a {what} TOML file") from None
    except tomllib.TOMLDecodeError as problem:
        raise kind(f"{path}: not valid TOML: {problem}") from None
    except OSError as problem:  # permissions, a dangling link, an I/O error
        raise kind(f"{path}: cannot read it ({problem.strerror or problem})") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is read as TOML, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set has an empty key: {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a table")
            node = child
        node[path[-1]] = value
    return raw


#: field types a TOML boolean must not silently fill (pydantic's lax mode reads
#: ``true`` as 1: ``rounds = true`` ran one round)
_NUMBER_TYPES: tuple[Any, ...] = (int, float, int | None, float | None)


class Strict(BaseModel):
    """Every configuration table: unknown keys refused, values immutable once read.

    ``allow_inf_nan=False``: no setting means anything as NaN or infinity (``lr = inf``
    trained every model into NaN without a word), so they are refused with the key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not any(isinstance(v, bool) for v in value.values()):
            return value
        fields = cls.model_fields
        return {
            key: _TomlBool(item)
            if isinstance(item, bool) and key in fields and fields[key].annotation in _NUMBER_TYPES
            else item
            for key, item in value.items()
        }


class _TomlBool:
    """A boolean where a number belongs, kept so that pydantic refuses it with the key:
    ``rounds: Input should be a valid integer (got true)``. (A field validator cannot do
    it on every field: pydantic forbids one on a union's discriminator.)"""

    def __init__(self, value: bool) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "true" if self.value else "false"


BUILTIN_DATASETS = ("digits", "mnist", "fashion_mnist", "synthetic")
BUILTIN_MODELS = ("logreg", "mlp", "cnn")


def _builtin_or_factory(value: Any, builtin: tuple[str, ...]) -> Any:
    """A built-in name as it is; ``module:factory`` checked as far as can be without running
    it (p2pfl.plugins): the module imports and the factory is callable."""
    if not isinstance(value, str) or value in builtin:
        return value
    if ":" not in value:
        names = ", ".join(repr(name) for name in builtin)
        raise ValueError(f"expected one of {names}, or a factory as module:factory")
    from p2pfl.plugins import load_factory

    load_factory(value)  # pydantic's error names the key and the value
    return value


class DataConfig(Strict):
    #: a built-in dataset, or your own: ``module:factory`` / ``path/file.py:factory``
    #: (what it must return: ``p2pfl.plugins.DATASET_CONTRACT``)
    dataset: str = "digits"
    data_dir: str | None = None
    partition: Literal["iid", "dirichlet", "shards", "by_source"] = "iid"
    alpha: float = Field(0.5, gt=0)
    shards_per_peer: int = Field(2, ge=1)
    #: at most 65536: a larger batch is a typo (no training set here is that big, and the
    #: sampler holds a few batches of indices: 10**9 asked it for 60 GiB)
    batch_size: int = Field(32, ge=1, le=1 << 16)
    #: relay-only peers hold no data (disaster studies); a fraction of all peers
    relay_fraction: float = Field(0.0, ge=0, lt=1)

    @field_validator("dataset", mode="after")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        return _builtin_or_factory(value, BUILTIN_DATASETS)

    @model_validator(mode="after")
    def _check_partition(self) -> DataConfig:
        if self.partition == "by_source" and self.dataset in _NO_SOURCES:
            raise PydanticCustomError(
                "partition",
                "partition = 'by_source' needs a dataset that says which source each sample "
                "comes from (synthetic, or your own factory's 'sources'); {dataset} has none",
                {"dataset": repr(self.dataset)},
            )
        return self


#: built-in datasets without per-sample sources (``by_source`` cannot split them)
_NO_SOURCES = ("digits", "mnist", "fashion_mnist")


class ModelConfig(Strict):
    #: a built-in model, or your own: ``module:factory`` / ``path/file.py:factory``
    #: (what it must return: ``p2pfl.plugins.MODEL_CONTRACT``)
    name: str = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] | None = None
    #: keyword arguments of your own model's factory
    params: dict[str, Any] = Field(default_factory=dict)
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("name", mode="after")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _builtin_or_factory(value, BUILTIN_MODELS)

    @model_validator(mode="after")
    def _check_params(self) -> ModelConfig:
        if self.params and ":" not in self.name:
            raise ValueError(f"params apply to a model factory (module:factory), not {self.name}")
        return self


class CodecConfig(Strict):
    """How every model a peer sends is compressed (``p2pfl.codecs``), in both drivers.

    ``protocol.codec = "fp16"`` is short for ``[protocol.codec] name = "fp16"``. Top-k sends
    the change of a model since the receiver's copy of it (``k`` values, or a ``fraction``
    of them); ``error_feedback`` keeps what was left out and sends it later (EF-SGD).
    """

    name: Literal["fp32", "fp16", "int8", "topk"] = "fp32"
    #: top-k: values kept per message (or ``fraction`` of the model; default 1%)
    k: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    #: top-k: keep the residual per receiver and add it to the next message
    error_feedback: bool = False
    #: top-k: every ``refresh``-th message to a peer travels whole (0: only after a
    #: failed send), which resynchronises the pair's copies after a silent loss
    refresh: int = Field(0, ge=0)
    #: int8: values per float32 scale
    chunk: int = Field(256, ge=1, le=1 << 24)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_options(self) -> CodecConfig:
        if self.name != "topk":
            given = [key for key in ("k", "fraction") if getattr(self, key) is not None]
            given += [key for key in ("error_feedback", "refresh") if getattr(self, key)]
            if given:
                raise ValueError(f"{', '.join(given)} apply to codec topk only, not {self.name}")
        elif self.k is not None and self.fraction is not None:
            raise ValueError("give topk either k or fraction, not both")
        return self


class SharedStartConfig(Strict):
    """A start model every peer computes alike: a feature extractor pre-trained on a public
    dataset, then a freshly initialised output layer (``p2pfl.protocols.bristle``).

    Bristle's extractor is one; any protocol can start from the same one
    (``protocol.shared_start``), so a comparison with Bristle starts level.
    """

    #: the public dataset ("task": a split of the task's training set that no peer holds)
    dataset: str = "task"
    #: pre-training draws its minibatches from this many samples of ``dataset``
    samples: int = Field(1000, ge=1)
    #: SGD steps of pre-training (0: the freshly initialised model)
    steps: int = Field(200, ge=0)

    @field_validator("dataset", mode="after")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        return value if value == "task" else _builtin_or_factory(value, BUILTIN_DATASETS)


class _ProtocolBase(Strict):
    local_steps: int = Field(1, ge=1)
    aggregator: str = "mean"
    aggregator_params: dict[str, Any] = Field(default_factory=dict)
    #: compression of the models this peer sends (all peers must agree)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    #: start from a pre-trained extractor (Bristle's, see ``BristleConfig.pretrain_*``)
    shared_start: SharedStartConfig | None = None

    def start_config(self) -> SharedStartConfig | None:
        """The shared pre-trained start these settings ask for (``None``: a fresh model)."""
        return self.shared_start

    def population_error(self, peers: int) -> str | None:
        """Why these settings cannot run on ``peers`` peers (``None``: they can)."""
        return None


class DPSGDConfig(_ProtocolBase):
    name: Literal["dpsgd"]
    mixing: Literal["metropolis_hastings", "uniform"] = "metropolis_hastings"
    round_timeout: float = Field(5.0, gt=0)


class EpidemicConfig(_ProtocolBase):
    name: Literal["epidemic"]
    fanout: int = Field(3, ge=1)
    round_timeout: float = Field(0.5, gt=0)
    peer_sampling: Literal["neighbours", "population"] = "population"


class GossipConfig(_ProtocolBase):
    name: Literal["gossip"]
    period: float = Field(0.2, gt=0)


class ModestConfig(_ProtocolBase):
    name: Literal["modest"]
    sample_size: int = Field(10, ge=1)
    num_aggregators: int = Field(1, ge=1)
    success_fraction: float = Field(0.6, gt=0, le=1)
    ping_timeout: float = Field(0.5, gt=0)
    aggregation_timeout: float = Field(5.0, gt=0)
    min_aggregation_count: int = Field(1, ge=1)
    #: period of the idle watchdog that restarts a lost round; default 4 * aggregation_timeout
    idle_timeout: float | None = Field(None, gt=0)

    def population_error(self, peers: int) -> str | None:
        if self.sample_size > peers:
            return f"protocol.sample_size={self.sample_size} exceeds topology.n={peers}"
        return None


class SybilWallConfig(_ProtocolBase):
    """D-PSGD rounds; neighbours weighted by SybilWall scores of their update histories."""

    name: Literal["sybilwall"]
    round_timeout: float = Field(5.0, gt=0)
    #: a stored history ``hops`` away is gossiped with weight ``gossip_decay ** hops``
    gossip_decay: float = Field(0.5, gt=0, le=1)
    #: gossiped (non-neighbour) histories kept; 0 turns history gossip off
    max_known: int = Field(16, ge=0)
    kappa: float = Field(1.0, gt=0)


class BristleConfig(_ProtocolBase):
    """D-PSGD rounds over the output layer only, on a shared frozen feature extractor."""

    name: Literal["bristle"]
    round_timeout: float = Field(5.0, gt=0)
    keep_closest: int = Field(4, ge=0)
    n_random: int = Field(1, ge=0)
    #: recall gap (absolute) at which a peer's class weight reaches 0
    tolerance: float = Field(0.1, ge=0)
    #: size of each peer's local test set, its probe
    probe_samples: int = Field(50, ge=1)
    #: where a probe is drawn from: "own" (the peer's own samples, so only its own classes
    #: can be checked) or "iid" (the paper's "small set of i.i.d. test samples": drawn from
    #: a pool of ``probe_pool`` samples of the task's training set held out of every share)
    probe: Literal["own", "iid"] = "own"
    probe_pool: int = Field(2000, ge=1)
    #: the shared feature extractor: ``pretrain_steps`` SGD steps on ``pretrain_samples``
    #: samples of the public dataset ``pretrain_dataset`` (a dataset name, e.g.
    #: "fashion_mnist" for an MNIST task; "task": a split of the task's training set that
    #: is then held out of every peer's share); the output layer is then freshly initialised
    pretrain_dataset: str = "task"
    pretrain_samples: int = Field(1000, ge=1)
    pretrain_steps: int = Field(200, ge=0)
    @field_validator("pretrain_dataset", mode="after")
    @classmethod
    def _check_pretrain_dataset(cls, value: str) -> str:
        return value if value == "task" else _builtin_or_factory(value, BUILTIN_DATASETS)

    @model_validator(mode="after")
    def _one_extractor(self) -> BristleConfig:
        if self.shared_start is not None:
            raise ValueError(
                "bristle's extractor is set by pretrain_dataset/pretrain_samples/pretrain_steps,"
                " not shared_start"
            )
        return self

    def start_config(self) -> SharedStartConfig:
        """Bristle's shared extractor, from its ``pretrain_*`` settings."""
        return SharedStartConfig(
            dataset=self.pretrain_dataset,
            samples=self.pretrain_samples,
            steps=self.pretrain_steps,
        )


class FedAvgConfig(_ProtocolBase):
    """Federated averaging: one server peer samples ``clients_per_round`` of its neighbours
    each round, they train and send back, it averages by sample counts (the FL baseline)."""

    name: Literal["fedavg"]
    #: the server: the peer of this index (simulator: peer ``server``; a node: the
    #: ``server``-th smallest of the peer ids it met), unless ``server_id`` names it
    server: int = Field(0, ge=0)
    #: the server's peer id (nodes: what every client is told); overrides ``server``
    server_id: str | None = None
    clients_per_round: int = Field(10, ge=1)
    round_timeout: float = Field(5.0, gt=0)
    #: fewer updates than this when the round times out: the global model is kept
    min_updates: int = Field(1, ge=1)
    #: an update's share of the mean: its declared sample count (FedAvg's n_k / n), or equal
    weighting: Literal["samples", "uniform"] = "samples"

    def population_error(self, peers: int) -> str | None:
        if self.server >= peers:
            return f"protocol.server={self.server} must be < topology.n={peers}"
        if self.clients_per_round > peers - 1:
            return (
                f"protocol.clients_per_round={self.clients_per_round} exceeds the "
                f"{peers - 1} clients of topology.n={peers}"
            )
        return None


class FoolsGoldConfig(FedAvgConfig):
    """Federated averaging whose server weights each client's update by FoolsGold scores
    of the client's update history (cosine similarity, pardoning, logit)."""

    name: Literal["foolsgold"]  # type: ignore[assignment]
    #: confidence of the logit (the paper's kappa)
    kappa: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _own_weighting(self) -> FoolsGoldConfig:
        if self.aggregator != "mean" or self.aggregator_params:
            raise ValueError(
                f"foolsgold weights the updates itself: aggregator must be 'mean', "
                f"not {self.aggregator!r}"
            )
        return self


class ZerothOrderConfig(_ProtocolBase):
    """Zeroth-order fine-tuning with shared randomness (``p2pfl.protocols.zeroth_order``):
    each step a peer sends its neighbours one byte, an SPSA projected gradient."""

    name: Literal["zeroth_order"]
    round_timeout: float = Field(5.0, gt=0)
    #: the SPSA learning rate (``model.lr`` is the pre-training's SGD rate)
    lr: float = Field(0.05, gt=0)
    #: the perturbation's scale: losses at ``x +- eps * z``
    eps: float = Field(1e-3, gt=0)
    #: the byte's grid: a projected gradient ``g`` travels as ``round(g / grad_scale)``,
    #: clipped to [-127, 127]
    grad_scale: float = Field(0.02, gt=0)
    #: the shared start model: ``pretrain_steps`` SGD steps on a public split of
    #: ``pretrain_samples`` training samples (0: the freshly initialised model)
    pretrain_steps: int = Field(0, ge=0)
    pretrain_samples: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _one_probe(self) -> ZerothOrderConfig:
        if self.local_steps != 1:
            raise ValueError("zeroth_order takes one SPSA probe per round: local_steps must be 1")
        if self.aggregator != "mean" or self.aggregator_params:
            raise ValueError("zeroth_order sends no models to aggregate: aggregator must be 'mean'")
        if self.codec.name != "fp32":
            raise ValueError("zeroth_order sends one byte, no model: codec must be 'fp32'")
        if self.pretrain_steps and self.start_config() is not None:
            raise ValueError("give zeroth_order either pretrain_steps or shared_start, not both")
        return self


ProtocolConfig = Annotated[
    DPSGDConfig
    | EpidemicConfig
    | GossipConfig
    | ModestConfig
    | SybilWallConfig
    | BristleConfig
    | FedAvgConfig
    | FoolsGoldConfig
    | ZerothOrderConfig,
    Field(discriminator="name"),
]

PROTOCOL_NAMES = (
    "dpsgd",
    "epidemic",
    "gossip",
    "modest",
    "sybilwall",
    "bristle",
    "fedavg",
    "foolsgold",
    "zeroth_order",
)

#: discriminated unions of the configs: top-level key -> tag values pydantic puts in
#: error locations (``protocol.dpsgd.fanout``), which the user never wrote
UNION_TAGS: Mapping[str, Collection[str]] = {"protocol": PROTOCOL_NAMES}


def describe_validation_error(
    error: ValidationError, union_tags: Mapping[str, Collection[str]] = UNION_TAGS
) -> str:
    """One line for the user: the key as written in the file, the problem, the value."""
    first = error.errors()[0]
    tags = union_tags.get(str(first["loc"][0]), ()) if first["loc"] else ()
    loc = ".".join(str(part) for part in first["loc"] if part not in tags)
    value = first.get("input")
    shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
    more = f" [+{error.error_count() - 1} more]" if error.error_count() > 1 else ""
    where = f"{loc}: " if loc else ""
    message = str(first["msg"])
    if first.get("type") in ("value_error", "assertion_error"):
        # our own validators' words, without pydantic's "Value error, " in front of them
        message = message.split(", ", 1)[1] if ", " in message else message
    return f"{where}{message}{shown}{more}"


#: ``num_classes`` filled in while validating an attack's parameters, before the data is known
PLACEHOLDER_CLASSES = 10


class AttackOptions(Strict):
    """An attack of :mod:`p2pfl.attacks` by name, its parameters, and the Byzantine wrapper's
    options: what the simulator's ``[attack]`` table (``sim.adversary.AttackConfig``, which
    adds who is Byzantine) and a node's ``[attack]`` section (:class:`NodeAttackConfig`)
    have in common. The name and parameters are checked here, with the attack's registry.
    """

    name: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)
    #: replace every model the Byzantine peer receives by its own last one
    isolate: bool | None = None
    #: model attacks: seconds between the end of training and sending (rushing attacker)
    delay: float = Field(1e-3, ge=0)
    #: the schedule (p2pfl.attacks.schedule): attack in rounds [start_round, stop_round),
    #: and with ``period``/``duty`` only in the first ``duty`` rounds of every ``period``;
    #: honest in every other round
    start_round: int = Field(0, ge=0)
    stop_round: int | None = Field(None, ge=1)
    period: int | None = Field(None, ge=1)
    duty: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_attack(self) -> AttackOptions:
        from p2pfl.attacks.registry import ATTACKS

        if self.name not in ATTACKS:
            raise ValueError(
                f"unknown attack {self.name!r}; accepted: {', '.join(sorted(ATTACKS))}"
            )
        self.build(PLACEHOLDER_CLASSES)  # the parameters: unknown, missing or invalid ones
        return self

    def build(self, num_classes: int) -> Attack:
        """The configured :class:`p2pfl.attacks.Attack`; ``num_classes`` fills in a missing
        ``num_classes`` parameter (label flips)."""
        from p2pfl.attacks.registry import ATTACKS, get_attack
        from p2pfl.attacks.schedule import AttackSchedule

        params = dict(self.params)
        if "num_classes" in ATTACKS[self.name] and "num_classes" not in params:
            params["num_classes"] = num_classes
        attack = get_attack(self.name, **params)
        schedule = AttackSchedule(self.start_round, self.stop_round, self.period, self.duty)
        return attack if schedule.always else attack.scheduled(schedule)


class NodeAttackConfig(AttackOptions):
    """A node's ``[attack]`` section: this node runs an attack (test networks only).

    Data attacks (``label_flip``, ``targeted_flip``, ``backdoor``) poison this node's
    training batches; model attacks (``sign_flip``, ``gaussian``, ``scaling``, ``alie``,
    ``ipm``, ``free_rider``) wrap its protocol in :class:`p2pfl.attacks.ByzantineProtocol`,
    which rewrites the models it sends, knowing the models this node received. A Sybil
    attack needs several identities per process and runs in the simulator only.
    """

    isolate: bool = False
    delay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check_node_attack(self) -> NodeAttackConfig:
        if self.build(PLACEHOLDER_CLASSES).sybil is not None:
            raise ValueError(
                f"{self.name} speaks through several identities: the simulator runs it "
                "(a node has one identity); on nodes use label_flip or targeted_flip"
            )
        if self.build(PLACEHOLDER_CLASSES).omniscient:
            raise ValueError(
                f"params.knowledge = 'omniscient': {self.name} would need every honest "
                "model, which only the simulator sees; a node knows what it received "
                "('received')"
            )
        return self


class NodeNetworkConfig(Strict):
    """Where a real node listens, whom it dials first, and how long it waits."""

    listen: list[str] = Field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = Field(default_factory=list)
    #: start learning once this many other peers are known (or at ``discovery_timeout``)
    min_peers: int = Field(1, ge=0)
    discovery_timeout: float = Field(30.0, gt=0)
    #: 0: every discovered peer is a neighbour; k > 0: k of them, chosen by the seed
    max_neighbours: int = Field(0, ge=0)
    #: an edge list of peer ids shared by all peers: neighbours are the graph's, and
    #: D-PSGD mixes with weights from its degrees (overrides ``max_neighbours``)
    topology_file: str | None = None
    #: find peers on the LAN by mDNS (libp2p's ``_p2p._udp.local`` service), besides bootstrap
    mdns: bool = False
    #: beyond a LAN: ``dht = true`` joins the Kademlia DHT (bootstrap addresses seed it),
    #: advertises this node under a key derived from the run's name ``run`` and dials
    #: the other peers advertised there (looked up again every ``dht_interval`` seconds
    #: at most, sooner while new ones turn up)
    dht: bool = False
    run: str = Field("", max_length=200)
    dht_interval: float = Field(30.0, ge=1)
    #: a hello lists the addresses of the peers we know (false: only our own)
    peer_exchange: bool = True
    #: behind home routers (NAT): "off" (LAN / one machine), "auto" (AutoNAT asks the peers
    #: we reach whether they can reach us; if not, reserve a slot on a relay and advertise
    #: the address through it), "public" / "private" (known: a public box; a test of a
    #: node behind NAT). ``relay = true`` serves as a circuit relay for others when
    #: reachable (with reachability "off" it means "auto"), within the relay_* limits
    #: (reservations, circuits at once, bytes and seconds per circuit); DCUtR hole
    #: punching turns relayed connections direct where the NATs allow it
    reachability: Literal["off", "auto", "public", "private"] = "off"
    relay: bool = False
    hole_punching: bool = True
    relay_max_reservations: int = Field(64, ge=1)
    relay_max_circuits: int = Field(64, ge=1)
    relay_circuit_bytes: int = Field(256 << 20, ge=1 << 20)
    relay_circuit_seconds: int = Field(3600, ge=10)
    #: ping every neighbour this often (seconds; 0: never); ``ping_failures`` misses in a
    #: row report it down to the protocol, the next answer reports it up again
    ping_interval: float = Field(5.0, ge=0)
    ping_timeout: float = Field(3.0, gt=0)
    ping_failures: int = Field(2, ge=1)
    send_timeout: float = Field(10.0, gt=0)
    #: the project's one default cap (``p2pfl.wire.framing.DEFAULT_MAX_FRAME_BYTES``, 64 MiB):
    #: every transport's and every decoder's too
    max_message_bytes: int = Field(DEFAULT_MAX_FRAME_BYTES, gt=1024)
    #: how many rounds ahead of ours a message may be (a restarted peer catches up)
    max_round_lead: int = Field(1000, ge=1)
    #: transport resource bounds (p2pfl.transport.limits), checked before a frame's body
    #: is read: concurrent inbound streams of one peer / of all; own frames in flight to
    #: one peer; bytes of inbound frames held for one peer / for all (0: max_message_bytes
    #: + 1 MiB / twice that); a frame must be whole within frame_timeout + size /
    #: min_frame_rate seconds
    max_streams_per_peer: int = Field(32, ge=1)
    max_streams: int = Field(1024, ge=1)
    max_sends_per_peer: int = Field(8, ge=1)
    max_buffered_bytes_per_peer: int = Field(0, ge=0)
    max_buffered_bytes: int = Field(0, ge=0)
    frame_timeout: float = Field(20.0, gt=0)
    min_frame_rate: float = Field(float(1 << 20), gt=0)
    #: bytes streams may hold unread outside admitted frames (yamux's initial windows),
    #: all peers together, half of it per source address; over it a stream is reset
    max_unread_bytes: int = Field(64 << 20, ge=1 << 20)

    @model_validator(mode="after")
    def _check_transport_limits(self) -> NodeNetworkConfig:
        if self.dht and not self.run:
            raise ValueError("dht = true needs the run's name: set network.run")
        if self.run and not self.dht:
            raise ValueError("network.run is looked up in the DHT: set network.dht = true")
        if self.max_streams < self.max_streams_per_peer:
            raise ValueError(
                f"max_streams={self.max_streams} must be >= max_streams_per_peer="
                f"{self.max_streams_per_peer}"
            )
        for key in ("max_buffered_bytes_per_peer", "max_buffered_bytes"):
            value = getattr(self, key)
            if 0 < value < self.max_message_bytes:
                raise ValueError(
                    f"{key}={value} must be 0 (default) or >= max_message_bytes="
                    f"{self.max_message_bytes}, or no message of the largest size is ever read"
                )
        return self


#: torch threads of a peer's process, simulator and node alike. One: torch's OpenMP
#: threads spin-wait for each other, and on a machine busy with anything else a 0.15 s
#: simulated round became 2-6.5 s with two threads on two cores; a node's per-round work
#: is small. The same count in both drivers also keeps their float rounding the same
#: (a matrix product's blocking depends on it).
DEFAULT_TORCH_THREADS = 1


class NodeConfig(Strict):
    """One real peer: its identity, data share, model, protocol and network."""

    name: str = "node"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    rounds: int = Field(50, ge=1)
    key_file: str = "node.key"
    state_dir: str = "node-state"
    #: checkpoint every this many rounds (written off the event loop; also at exit)
    checkpoint_every: int = Field(1, ge=1)
    #: torch threads (0: torch's default); as in the simulator (see DEFAULT_TORCH_THREADS)
    threads: int = Field(DEFAULT_TORCH_THREADS, ge=0, le=MAX_TORCH_THREADS)
    #: this node trains on share ``peer_index`` of the dataset cut into ``num_peers`` shares
    peer_index: int = Field(0, ge=0)
    num_peers: int = Field(1, ge=1)
    eval_every: int = Field(1, ge=1)
    eval_test_samples: int = Field(0, ge=0)
    #: pacing: local training starts at most once per this many seconds (saves battery
    #: and bandwidth on small devices; 0 trains as fast as the protocol allows)
    min_round_interval: float = Field(0.0, ge=0)
    #: per-round measurements also as TensorBoard scalars in ``<state_dir>/tensorboard/``
    #: (needs the optional extra ``p2pfl-gossip[tracking]``; checked at start-up)
    tensorboard: bool = False
    #: the asyncio event loop: "auto" is uvloop where installed (a dependency on Linux and
    #: macOS; less CPU a round), else asyncio's own; "uvloop" or "asyncio" insist
    #: (``p2pfl.eventloop``)
    event_loop: EventLoopChoice = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    protocol: ProtocolConfig = Field(default_factory=lambda: DPSGDConfig(name="dpsgd"))
    network: NodeNetworkConfig = Field(default_factory=NodeNetworkConfig)
    #: run as an attacker (experiments on a test network); name "none": honest
    attack: NodeAttackConfig = Field(default_factory=NodeAttackConfig)

    @model_validator(mode="after")
    def _check_share(self) -> NodeConfig:
        if self.peer_index >= self.num_peers:
            raise ValueError(f"peer_index={self.peer_index} must be < num_peers={self.num_peers}")
        return self
