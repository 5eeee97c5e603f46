"""Typed, validated configuration shared by the node and the simulator.

Data, model and protocol settings mean the same thing on a real node and in a simulated
peer, so they are defined once here. Every model forbids unknown keys, so a typo is an
error that names the key rather than a setting silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    dataset: Literal["digits", "mnist", "fashion_mnist", "synthetic"] = "digits"
    data_dir: str | None = None
    partition: Literal["iid", "dirichlet", "shards", "by_source"] = "iid"
    alpha: float = Field(0.5, gt=0)
    shards_per_peer: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    #: relay-only peers hold no data (disaster studies); a fraction of all peers
    relay_fraction: float = Field(0.0, ge=0, lt=1)


class ModelConfig(Strict):
    name: Literal["logreg", "mlp", "cnn"] = "mlp"
    hidden: list[int] | None = None
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class _ProtocolBase(Strict):
    local_steps: int = Field(1, ge=1)
    aggregator: str = "mean"
    aggregator_params: dict[str, Any] = Field(default_factory=dict)


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


ProtocolConfig = Annotated[
    DPSGDConfig | EpidemicConfig | GossipConfig | ModestConfig, Field(discriminator="name")
]

PROTOCOL_NAMES = ("dpsgd", "epidemic", "gossip", "modest")
