"""Scenario files: a typed, validated description of one simulation run.

A scenario is a TOML file (see ``examples/``). It is validated with pydantic so that a
mistake is reported as one line that names the key, the value and what was expected,
instead of a traceback from deep inside the run. ``--set key=value`` overrides use dotted
keys (``protocol.local_steps=2``) and TOML values.

Configuration only: this module imports the configuration classes of attacks
(:mod:`sim.attack_config`) and disruptions (:mod:`sim.disruptions.config`), never the
runtime modules that carry them out, which import it (imports in ``sim`` run one way).
``ScenarioError`` is defined in :mod:`sim.errors` and re-exported here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from p2pfl.config import (
    DEFAULT_TORCH_THREADS,
    MAX_SEED,
    MAX_TORCH_THREADS,
    PLACEHOLDER_CLASSES,
    UNION_TAGS,
    ConfigError,
    DataConfig,
    DPSGDConfig,
    ModelConfig,
    ProtocolConfig,
    Strict,
    apply_overrides,
    describe_validation_error,
    read_toml,
)
from sim.attack_config import AttackConfig
from sim.conditions import LinkOverride, RegionConditions
from sim.disruptions.config import DISRUPTION_KINDS, DisruptionList
from sim.errors import ScenarioError

__all__ = [
    "MAX_PEERS",
    "SCENARIO_UNION_TAGS",
    "NetworkConfig",
    "Scenario",
    "ScenarioError",
    "SimConfig",
    "TopologyConfig",
    "load_scenario",
    "scenario_from_dict",
]


#: more peers than this is a typo: ten times the largest run measured (100 000 peers,
#: BENCHMARKS.md); ``topology.n = 100000000`` spent minutes building a ring before the
#: data split refused it
MAX_PEERS = 1_000_000


class TopologyConfig(Strict):
    kind: str = "ring"
    n: int = Field(16, ge=2, le=MAX_PEERS)
    params: dict[str, Any] = Field(default_factory=dict)


class NetworkConfig(Strict):
    latency: float = Field(0.01, ge=0, description="one-way link latency, seconds")
    latency_jitter: float = Field(0.0, ge=0, description="uniform +- jitter fraction")
    bandwidth: float = Field(12.5e6, gt=0, description="uplink bytes per second")
    loss: float = Field(0.0, ge=0, lt=1, description="probability a message is lost")
    step_time: float = Field(0.005, gt=0, description="seconds per local SGD step")
    speed_spread: float = Field(0.0, ge=0, lt=1, description="peer compute speed in 1 +- spread")
    #: "graph": peers talk over topology edges only; "overlay": anyone reaches anyone
    mode: Literal["graph", "overlay"] = "graph"
    #: peers whose uplink, access latency and loss differ (sim.conditions)
    regions: list[RegionConditions] = Field(default_factory=list)
    #: links whose latency, loss or rate differ (sim.conditions)
    links: list[LinkOverride] = Field(default_factory=list)


class SimConfig(Strict):
    backend: Literal["batched", "per_peer"] = "batched"
    eval_every: int = Field(5, ge=1)
    eval_peers: int = Field(0, ge=0, description="0: every peer; else a fixed random sample")
    eval_test_samples: int = Field(0, ge=0, description="0: the whole test set")
    max_virtual_time: float = Field(1e9, gt=0)
    output_dir: str = "runs"
    #: torch threads (see p2pfl.config.DEFAULT_TORCH_THREADS: one, and why)
    threads: int = Field(
        DEFAULT_TORCH_THREADS, ge=0, le=MAX_TORCH_THREADS, description="torch threads; 0 leaves torch's default"
    )
    #: connectivity columns (components, accuracy per component); on when there are disruptions
    connectivity: bool = False
    #: sign relayed data (MoDeST view entries, SybilWall histories) with per-peer keys, as
    #: nodes do, so that both drivers run the same code (see p2pfl.protocols.records);
    #: ``false`` is faster and lets any relayer rewrite what it relays
    sign_relayed: bool = True
    #: "index": peer ``i`` is ``p{i}``; "keys": named by the peer id of its keyring key,
    #: as a node running that key is, so protocols that order peers by id choose as
    #: those nodes do (see sim.naming)
    peer_names: Literal["index", "keys"] = "index"
    #: where the batched path keeps its rows, training and evaluation: "cpu" (the
    #: numpy/scipy path) or "cuda" / "cuda:N" (sim.device, docs/gpu.md; checked for
    #: CUDA and for what the device path covers when the run is built)
    device: str = "cpu"
    #: wall-clock seconds between run checkpoints (sim.checkpoint: ``--resume`` continues
    #: a killed run from the last one), taken when the system's progress advances, and
    #: spaced out further when they are slow (at most 5% of the run's time); 0: none.
    #: It does not change the results, so it is left out of what makes two runs the same.
    checkpoint_every: float = Field(
        60.0, ge=0, allow_inf_nan=False, description="seconds between run checkpoints; 0: none"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError("expected 'cpu', 'cuda' or 'cuda:N'")
        return value


class Scenario(Strict):
    name: str = "scenario"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    rounds: int = Field(20, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    protocol: ProtocolConfig = Field(default_factory=lambda: DPSGDConfig(name="dpsgd"))
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    #: ``[[disruptions]]`` tables: crashes, outages, partitions, batteries... (sim.disruptions)
    disruptions: DisruptionList = Field(default_factory=list)
    #: ``[attack]``: Byzantine peers, Sybil identities and what they do (sim.adversary)
    attack: AttackConfig = Field(default_factory=AttackConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> Scenario:
        error = self.protocol.population_error(self.topology.n) or self._population_error()
        if error is not None:  # pydantic's own form: no "Value error, " before the key
            raise PydanticCustomError("population", "{error}", {"error": error})
        _check_aggregator(self.protocol)
        return self

    def _population_error(self) -> str | None:
        """Settings that leave no peer to learn or to measure: every peer a data-less relay
        (the data split then failed with a traceback), or every peer Byzantine (the run
        went on and reported an honest accuracy of NaN)."""
        n = self.topology.n
        relays = int(round(self.data.relay_fraction * n))
        if relays >= n:
            return (
                f"data.relay_fraction={self.data.relay_fraction:g} makes all {n} peers relays "
                "without data; expected a smaller fraction"
            )
        attack = self.attack
        if attack.name != "none" and attack.identities is None and (attack.count or attack.fraction):
            byzantine = attack.count if attack.count is not None else int(round((attack.fraction or 0) * n))
            if byzantine >= n and not attack.build(PLACEHOLDER_CLASSES).sybil:
                key = "count" if attack.count is not None else "fraction"
                return (
                    f"attack.{key}={getattr(attack, key):g} makes all {n} peers Byzantine; "
                    "expected at least one honest peer"
                )
        return None


def _check_aggregator(protocol: ProtocolConfig) -> None:
    """The aggregator's name and parameters, built now as every peer will build them: a
    typo is one line naming the key when the scenario is read, not a traceback (or, in a
    sweep, a failed cell) once the run has started. The node checks the same at start-up
    (``p2pfl.startup.check_aggregator``)."""
    from p2pfl.aggregation.registry import AGGREGATORS  # torch: only when validating
    from p2pfl.protocols.registry import make_aggregate

    try:
        make_aggregate(protocol)
    except (ValueError, TypeError) as error:
        key = "aggregator" if protocol.aggregator not in AGGREGATORS else "aggregator_params"
        raise PydanticCustomError("aggregator", "protocol.{key}: {error}", {"key": key, "error": str(error)}) from None


# ---------------------------------------------------------------------- loading


#: the scenario's unions: protocols, and the kinds of ``[[disruptions]]``
SCENARIO_UNION_TAGS = {**UNION_TAGS, "disruptions": DISRUPTION_KINDS}


def scenario_from_dict(raw: dict[str, Any]) -> Scenario:
    try:
        return Scenario.model_validate(raw)
    except ValidationError as error:
        raise ScenarioError(describe_validation_error(error, SCENARIO_UNION_TAGS)) from None


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    raw = read_toml(path, "scenario", ScenarioError)
    if "base" in raw and ("attacks" in raw or "defences" in raw):  # the other command's file
        raise ScenarioError(f"{path}: a sweep file (base, attacks, defences); run it with: p2pfl sweep {path}")
    try:
        raw = apply_overrides(raw, overrides or [])
    except ConfigError as error:  # "--set rounds" (no '='), "--set rounds.x=1"
        raise ScenarioError(str(error)) from None
    return scenario_from_dict(raw)
