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
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from p2pfl.config import (
    DEFAULT_TORCH_THREADS,
    UNION_TAGS,
    DataConfig,
    DPSGDConfig,
    ModelConfig,
    ProtocolConfig,
    Strict,
    apply_overrides,
    describe_validation_error,
)
from sim.attack_config import AttackConfig
from sim.conditions import LinkOverride, RegionConditions
from sim.disruptions.config import DISRUPTION_KINDS, DisruptionList
from sim.errors import ScenarioError

__all__ = [
    "SCENARIO_UNION_TAGS",
    "NetworkConfig",
    "Scenario",
    "ScenarioError",
    "SimConfig",
    "TopologyConfig",
    "load_scenario",
    "scenario_from_dict",
]


class TopologyConfig(Strict):
    kind: str = "ring"
    n: int = Field(16, ge=2)
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
    threads: int = Field(DEFAULT_TORCH_THREADS, ge=0, description="torch threads; 0 leaves torch's default")
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

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError("expected 'cpu', 'cuda' or 'cuda:N'")
        return value


class Scenario(Strict):
    name: str = "scenario"
    seed: int = 0
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
        error = self.protocol.population_error(self.topology.n)
        if error is not None:
            raise ValueError(error)
        return self


# ---------------------------------------------------------------------- loading


#: the scenario's unions: protocols, and the kinds of ``[[disruptions]]``
SCENARIO_UNION_TAGS = {**UNION_TAGS, "disruptions": DISRUPTION_KINDS}


def scenario_from_dict(raw: dict[str, Any]) -> Scenario:
    try:
        return Scenario.model_validate(raw)
    except ValidationError as error:
        raise ScenarioError(describe_validation_error(error, SCENARIO_UNION_TAGS)) from None


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"{path}: not valid TOML: {error}") from None
    return scenario_from_dict(apply_overrides(raw, overrides or []))
