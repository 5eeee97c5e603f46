"""Aggregation rules: pure, vectorised torch functions over a stack of parameter vectors.

Every rule takes ``x`` of shape ``(n, d)`` (one flat model or update per row, float32 as a
rule) and returns a ``(d,)`` tensor, except the pre-aggregation :func:`nnm` (``(n, d)``)
and the scoring functions (weights). Pairwise distances come from one Gram-matrix
product, never from a Python loop over pairs: exact float64 for Bulyan, NNM and the
reputation scores; for Krum, the geometric median and centered clipping with many
iterations, float32 products of rows centred on a central row, summed in float64, with
Krum's close calls re-checked exactly (``_linalg``). Coordinate-wise rules sort column
blocks transposed to rows, with numpy's vectorised sort (``coordinatewise``).

Protocols use the uniform interface: ``get_aggregator(name, **params)`` returns an
:class:`Aggregator`, called as ``agg(stack, weights=None, own=0)``; :data:`AGGREGATORS`
lists the names and their parameters. SybilWall and Bristle need per-neighbour state, so
only their pure scoring parts live here (``sybilwall_weights``, ``bristle_*``); the
protocols keep the state.

Inputs are assumed finite: the wire layer rejects NaN and infinite tensors before a
model reaches an aggregator.

This package imports only torch, numpy (its small-row sort, and its BLAS: about twice
torch's sgemm on AMD cores), the standard library and the project's error base
(``p2pfl.errors``, for ``TooFewVectors``).
"""

from p2pfl.aggregation._checks import TooFewVectors
from p2pfl.aggregation.averaging import mean
from p2pfl.aggregation.bristle import (
    bristle_class_weights,
    bristle_integrate,
    bristle_select,
    pack_output_layer,
    unpack_output_layer,
)
from p2pfl.aggregation.clipping import centered_clipping
from p2pfl.aggregation.coordinatewise import coordinate_median, trimmed_mean
from p2pfl.aggregation.distance import bulyan, krum, krum_scores, multi_krum, nnm
from p2pfl.aggregation.geomedian import geometric_median, geometric_median_coefficients
from p2pfl.aggregation.registry import AGGREGATORS, Aggregator, RuleAggregator, get_aggregator
from p2pfl.aggregation.reputation import cosine_similarities, foolsgold_weights, sybilwall_weights

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "RuleAggregator",
    "TooFewVectors",
    "bristle_class_weights",
    "bristle_integrate",
    "bristle_select",
    "bulyan",
    "centered_clipping",
    "coordinate_median",
    "cosine_similarities",
    "foolsgold_weights",
    "geometric_median",
    "geometric_median_coefficients",
    "get_aggregator",
    "krum",
    "krum_scores",
    "mean",
    "multi_krum",
    "nnm",
    "pack_output_layer",
    "sybilwall_weights",
    "trimmed_mean",
    "unpack_output_layer",
]
