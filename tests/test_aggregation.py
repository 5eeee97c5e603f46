"""Aggregation rules against hand-computed results, breakdown points and properties."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from p2pfl.aggregation import (
    AGGREGATORS,
    Aggregator,
    bristle_class_weights,
    bristle_integrate,
    bristle_select,
    bulyan,
    centered_clipping,
    coordinate_median,
    foolsgold_weights,
    geometric_median,
    get_aggregator,
    krum,
    krum_scores,
    mean,
    multi_krum,
    nnm,
    pack_output_layer,
    sybilwall_weights,
    trimmed_mean,
    unpack_output_layer,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Five vectors in 2-D used by several hand-computed cases.
FIVE = t([[1, 3], [2, 40], [3, 20], [100, -5], [-7, 1]])

# Squared distances of KRUM_X (worked by hand):
#   0-1: 1   0-2: 4   0-3: 50   0-4: 20000   1-2: 5   1-3: 41   1-4: 19801
#   2-3: 34  2-4: 19604   3-4: 18050
# Krum scores with f = 1 (n - f - 2 = 2 nearest): 5, 6, 9, 75, 37654.
KRUM_X = t([[0, 0], [1, 0], [0, 2], [5, 5], [100, 100]])


# ---------------------------------------------------------------- averaging


def test_mean_uniform() -> None:
    assert torch.equal(mean(t([[1, 2], [3, 4], [5, 9]])), t([[3, 5]])[0])


def test_mean_metropolis_hastings_weights() -> None:
    # Peer of degree 1 next to a peer of degree 3: w = 1 / (max(1, 3) + 1) = 1/4, own = 3/4.
    stack = t([[4, 0], [0, 8]])
    assert torch.equal(mean(stack, torch.tensor([0.75, 0.25])), torch.tensor([3.0, 2.0]))


def test_mean_normalises_raw_weights() -> None:
    stack = t([[4, 0], [0, 8]])
    assert torch.equal(mean(stack, torch.tensor([3.0, 1.0])), torch.tensor([3.0, 2.0]))


@pytest.mark.parametrize(
    "weights, message",
    [([1.0], "shape"), ([-1.0, 2.0], "non-negative"), ([0.0, 0.0], "sum to zero")],
)
def test_mean_rejects_bad_weights(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mean(t([[1, 2], [3, 4]]), torch.tensor(weights))


def test_stack_must_be_2d_and_non_empty() -> None:
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        mean(torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        coordinate_median(torch.zeros(0, 3))


# ---------------------------------------------------------------- coordinate-wise


def test_median_odd_n() -> None:
    # column 0 sorted: -7 1 2 3 100; column 1 sorted: -5 1 3 20 40
    assert torch.equal(coordinate_median(FIVE), torch.tensor([2.0, 3.0]))


def test_median_even_n_averages_the_middle_pair() -> None:
    x = t([[1, 4], [2, 3], [10, 1], [7, 2]])  # columns sorted: 1 2 7 10 | 1 2 3 4
    assert torch.equal(coordinate_median(x), torch.tensor([4.5, 2.5]))


def test_trimmed_mean_drops_f_each_side() -> None:
    # column 0 keeps 1 2 3 -> 2; column 1 keeps 1 3 20 -> 8
    assert torch.equal(trimmed_mean(FIVE, 1), torch.tensor([2.0, 8.0]))
    assert torch.allclose(trimmed_mean(FIVE, 0), FIVE.mean(dim=0))
    assert torch.equal(trimmed_mean(FIVE, 2), coordinate_median(FIVE))


def test_trimmed_mean_needs_n_above_2f() -> None:
    with pytest.raises(ValueError, match=r"n > 2f.*largest f it supports for n = 5 is 2"):
        trimmed_mean(FIVE, 3)


# ---------------------------------------------------------------- Krum family


def test_krum_scores_by_hand() -> None:
    scores = krum_scores(KRUM_X, 1)
    assert scores.tolist() == [5.0, 6.0, 9.0, 75.0, 37654.0]


def test_krum_selects_lowest_score_as_a_copy() -> None:
    out = krum(KRUM_X, 1)
    assert torch.equal(out, torch.tensor([0.0, 0.0]))
    out += 1
    assert torch.equal(KRUM_X[0], torch.tensor([0.0, 0.0]))


def test_multi_krum_averages_best_m() -> None:
    assert torch.equal(multi_krum(KRUM_X, 1), torch.tensor([1.5, 1.75]))  # rows 0-3
    assert torch.equal(multi_krum(KRUM_X, 1, m=2), torch.tensor([0.5, 0.0]))  # rows 0-1
    assert torch.equal(multi_krum(KRUM_X, 1, m=1), krum(KRUM_X, 1))
    with pytest.raises(ValueError, match=r"m must be an int in \[1, n\]"):
        multi_krum(KRUM_X, 1, m=6)


def test_krum_requirement_is_explained() -> None:
    with pytest.raises(ValueError, match=r"n > 2f \+ 2.*got n = 5.*largest f .* is 1"):
        krum(KRUM_X, 2)


def test_bulyan_by_hand() -> None:
    # 1-D values 0 2 3 7 8 12 50 with f = 1: theta = 5, beta = 3.
    # Repeated Krum picks 3 (score 51), then 7 (51), then 2 (40), then 8 (16, tie with 12
    # broken by index), then 0. Median of {0 2 3 7 8} is 3; its 3 closest are 3 2 0 -> 5/3.
    v = torch.tensor([0.0, 2, 3, 7, 8, 12, 50])
    x = torch.stack([v, -2 * v], dim=1)
    assert torch.allclose(bulyan(x, 1), torch.tensor([5 / 3, -10 / 3]))


def test_bulyan_f0_is_mean_and_requirement_is_explained() -> None:
    assert torch.allclose(bulyan(FIVE, 0), FIVE.mean(dim=0))
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3.*got n = 6"):
        bulyan(torch.zeros(6, 2), 1)


def _bulyan_reference(x: torch.Tensor, f: int) -> torch.Tensor:
    """A loop-by-loop Bulyan, written straight from the paper, to check the vectorised one."""
    n = len(x)
    remaining = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        r = len(remaining)
        k = min(max(r - f - 2, 1), r - 1)
        best, best_score = None, math.inf
        for i in remaining:
            dists = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in remaining if j != i)
            score = sum(dists[:k])
            if score < best_score:
                best, best_score = i, score
        assert best is not None
        chosen.append(best)
        remaining.remove(best)
    sel = x[chosen].numpy().astype(np.float64)
    beta = n - 4 * f
    out = []
    for col in sel.T:
        med = np.median(col)
        out.append(np.mean(sorted(col, key=lambda v: abs(v - med))[:beta]))
    return torch.tensor(out, dtype=torch.float32)


def test_bulyan_matches_a_loop_reference() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 6, generator=g)
    x[:2] += 5.0
    assert torch.allclose(bulyan(x, 2), _bulyan_reference(x, 2), atol=1e-6)


# ---------------------------------------------------------------- NNM


def test_nnm_by_hand() -> None:
    # n - f = 2 nearest (itself included): {0, 1} -> 0.5, {1, 0} -> 0.5, {10, 1} -> 5.5
    out = nnm(t([[0], [1], [10]]), 1)
    assert torch.equal(out, t([[0.5], [0.5], [5.5]]))


def test_nnm_f0_is_the_mean_everywhere() -> None:
    out = nnm(FIVE, 0)
    assert torch.allclose(out, FIVE.mean(dim=0).expand(5, -1))


# ---------------------------------------------------------------- geometric median


def test_geometric_median_of_a_symmetric_set_is_its_centre() -> None:
    centre = torch.tensor([3.0, 4.0])
    x = centre + t([[1, 0], [-1, 0], [0, 1], [0, -1], [2, 2], [-2, -2]])
    assert torch.allclose(geometric_median(x), centre, atol=1e-6)


def test_geometric_median_of_three_collinear_points_is_the_middle_one() -> None:
    x = t([[0, 0], [1, 0], [10, 0]])
    assert torch.allclose(geometric_median(x), torch.tensor([1.0, 0.0]), atol=1e-4)


def test_weighted_geometric_median_follows_a_majority_weight() -> None:
    x = t([[0, 0], [1, 0], [10, 0]])
    out = geometric_median(x, torch.tensor([1.0, 1.0, 5.0]))
    assert torch.allclose(out, torch.tensor([10.0, 0.0]), atol=1e-4)


def test_geometric_median_is_robust_to_outliers() -> None:
    honest = t([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]])
    x = torch.cat([honest, t([[1e20, 1e20], [-1e20, 3e20]])])
    out = geometric_median(x)
    assert torch.all(out >= -0.1) and torch.all(out <= 1.1)


# ---------------------------------------------------------------- centered clipping


def test_centered_clipping_by_hand() -> None:
    # Around (0, 0) with tau = 1: (3, 4) is clipped to (0.6, 0.8); the others are within tau.
    x = t([[0, 0], [3, 4], [0, 1]])
    out = centered_clipping(x, torch.zeros(2), tau=1.0)
    assert torch.allclose(out, torch.tensor([0.2, 0.6]))


def test_centered_clipping_two_iterations_recentre() -> None:
    x = t([[0, 0], [3, 4], [0, 1]])
    v = torch.tensor([0.2, 0.6], dtype=torch.float64)
    far = torch.tensor([3.0, 4.0], dtype=torch.float64) - v  # only this one is clipped
    step = (-v + far / far.norm() + (torch.tensor([0.0, 1.0], dtype=torch.float64) - v)) / 3
    out = centered_clipping(x, torch.zeros(2), tau=1.0, iters=2)
    assert torch.allclose(out.double(), v + step, atol=1e-6)


def test_centered_clipping_with_infinite_tau_is_the_mean() -> None:
    out = centered_clipping(FIVE, torch.tensor([50.0, -50.0]), tau=math.inf)
    assert torch.allclose(out, FIVE.mean(dim=0))
    w = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])
    out = centered_clipping(FIVE, FIVE[0], tau=math.inf, weights=w)
    assert torch.allclose(out, mean(FIVE, w))


def test_centered_clipping_bounds_outliers() -> None:
    honest = t([[0, 0], [0.1, 0], [0, 0.1], [0.1, 0.1]])
    x = torch.cat([honest, t([[1e6, -1e6], [1e30, 1e30]])])
    out = centered_clipping(x, honest[0], tau=0.5)
    # Each vector moves the centre by at most tau / n, so the result is within tau of it.
    assert float((out - honest[0]).norm()) <= 0.5 + 1e-6
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- breakdown points


def _honest(n: int, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


def test_median_stays_in_honest_range_with_f_below_half() -> None:
    honest = _honest(4)
    x = torch.cat([honest, torch.full((3, 4), 1e30)])  # f = 3 < 7 / 2
    out = coordinate_median(x)
    assert torch.all(out >= honest.min(dim=0).values)
    assert torch.all(out <= honest.max(dim=0).values)


def test_krum_selects_an_honest_vector_with_f_below_n_minus_2_over_2() -> None:
    honest = _honest(6)
    outliers = torch.tensor([[1e15] * 4, [-1e15] * 4, [1e15, -1e15, 1e15, -1e15]])
    x = torch.cat([outliers, honest])  # n = 9, f = 3 < (9 - 2) / 2
    out = krum(x, 3)
    assert any(torch.equal(out, row) for row in honest)


def test_trimmed_mean_with_f_outliers_is_the_trimmed_honest_mean() -> None:
    honest = _honest(6)
    f = 2
    x = torch.cat([honest, torch.full((f, 4), 1e30)])
    # The f outliers are the f largest of every coordinate; the f smallest are honest.
    expected = torch.sort(honest, dim=0).values[f:].mean(dim=0)
    assert torch.allclose(trimmed_mean(x, f), expected)


# ---------------------------------------------------------------- FoolsGold / SybilWall


def test_foolsgold_zeroes_identical_sybils_and_keeps_diverse_honest() -> None:
    h = t([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert foolsgold_weights(h).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_foolsgold_logit_by_hand() -> None:
    # cos(a, b) = 3/5: w = 1 - 0.6 = 0.4 for a and b, 1 for c; rescaled by 1;
    # logit: ln(0.4 / 0.6) + 0.5 = 0.0945..., and c: 0.99 -> clipped to 1.
    h = t([[1, 0, 0], [3, 4, 0], [0, 0, 1]])
    expected = math.log(0.4 / 0.6) + 0.5
    assert torch.allclose(foolsgold_weights(h), torch.tensor([expected, expected, 1.0]).double())


def test_foolsgold_pardons_an_honest_peer_resembling_a_sybil() -> None:
    # h is 0.6-similar to two identical sybils. Pardoned: 0.6 * (0.6 / 1) = 0.36, so
    # w_h = 0.64 -> logit ln(0.64 / 0.36) + 0.5 = 1.075 -> 1. Unpardoned it would be 0.0945.
    h = t([[1, 0, 0], [0, 4, 3], [0, 0, 1], [0, 0, 1]])
    assert foolsgold_weights(h).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_foolsgold_edge_cases() -> None:
    assert foolsgold_weights(t([[1, 2]])).tolist() == [1.0]  # alone: trusted
    assert foolsgold_weights(t([[1, 2], [2, 4]])).tolist() == [0.0, 0.0]  # all alike
    assert foolsgold_weights(t([[0, 0], [1, 0]])).tolist() == [1.0, 1.0]  # nothing sent yet


def test_sybilwall_uses_gossiped_histories_to_score_direct_neighbours() -> None:
    # Rows 0 and 1 are direct neighbours; rows 2 and 3 came by gossip. Row 2 is the twin
    # of neighbour 1, which only the gossiped history reveals.
    h = t([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]])
    assert sybilwall_weights(h, direct=[0, 1]).tolist() == [1.0, 0.0]
    assert sybilwall_weights(h[:2], direct=[0, 1]).tolist() == [1.0, 1.0]
    assert sybilwall_weights(h, direct=[1, 0]).tolist() == [0.0, 1.0]  # order is kept
    with pytest.raises(ValueError, match="direct indices"):
        sybilwall_weights(h, direct=[4])


# ---------------------------------------------------------------- Bristle


def test_bristle_select_closest_then_random() -> None:
    own = torch.zeros(2, 3)
    others = torch.stack([own + c for c in (3.0, 1.0, 4.0, 0.5, 2.0)])
    assert bristle_select(own, others, keep_closest=2).tolist() == [3, 1]
    # The rest in index order is [0, 2, 4]; random.Random(0).sample(range(3), 1) == [1].
    picked = bristle_select(own, others, 2, n_random=1, rng=random.Random(0))
    assert picked.tolist() == [3, 1, 2]
    # torch.randperm(3, generator seeded 0) == [2, 0, 1]
    picked = bristle_select(own, others, 2, 2, torch.Generator().manual_seed(0))
    assert picked.tolist() == [3, 1, 4, 0]
    assert bristle_select(own, others, 10, 3, random.Random(0)).tolist() == [3, 1, 4, 0, 2]
    with pytest.raises(ValueError, match="needs an rng"):
        bristle_select(own, others, 1, 1)


def test_bristle_class_weights_formula() -> None:
    own = torch.tensor([0.9, 0.0, 0.5])
    peers = torch.tensor([[0.95, 0.8, 0.45], [0.5, 0.0, 0.3]])
    w = bristle_class_weights(own, peers, tolerance=0.1)
    assert torch.allclose(w, torch.tensor([[1.0, 1.0, 0.5], [0.0, 1.0, 0.0]]).double(), atol=1e-6)
    hard = bristle_class_weights(own, peers, tolerance=0.0)
    assert hard.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def test_bristle_integrate_per_class() -> None:
    own = t([[1, 1], [2, 2]])
    peers = torch.stack([t([[3, 3], [4, 4]]), t([[5, 5], [6, 6]])])
    w = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    # class 0: (1 + 3 + 0.5 * 5) / 2.5 = 2.6; class 1: nobody else counts -> own row.
    out = bristle_integrate(own, peers, w)
    assert torch.allclose(out, t([[2.6, 2.6], [2, 2]]))
    out = bristle_integrate(own, peers, torch.zeros(2, 2), own_weight=0.0)
    assert torch.equal(out, own)


def test_output_layer_packing_round_trips() -> None:
    weight, bias = torch.arange(6.0).reshape(2, 3), torch.tensor([10.0, 20.0])
    rows = pack_output_layer(weight, bias)
    assert rows.tolist() == [[0, 1, 2, 10], [3, 4, 5, 20]]
    w2, b2 = unpack_output_layer(rows)
    assert torch.equal(w2, weight) and torch.equal(b2, bias)


# ---------------------------------------------------------------- registry


def test_registry_lists_every_name_with_its_params() -> None:
    for name in ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"):
        assert name in AGGREGATORS and f"nnm+{name}" in AGGREGATORS
    assert "geometric_median" in AGGREGATORS and "centered_clipping" in AGGREGATORS
    assert set(AGGREGATORS["krum"]) == {"f", "f_fraction", "clamp", "nnm"}
    assert "tau" in AGGREGATORS["centered_clipping"]


def test_registry_errors_name_the_accepted_values() -> None:
    with pytest.raises(ValueError, match=r"unknown aggregator 'avg'; accepted: .*krum"):
        get_aggregator("avg")
    with pytest.raises(ValueError, match=r"does not accept beta; accepted parameters: f, "):
        get_aggregator("krum", f=1, beta=2)
    with pytest.raises(ValueError, match="needs f"):
        get_aggregator("krum")
    with pytest.raises(ValueError, match="either f or f_fraction"):
        get_aggregator("krum", f=1, f_fraction=0.1)
    with pytest.raises(ValueError, match="does not accept f"):
        get_aggregator("median", f=1)
    with pytest.raises(ValueError, match="tau must be a number > 0"):
        get_aggregator("centered_clipping", tau=0)


def test_registry_results_match_the_functions() -> None:
    assert isinstance(get_aggregator("mean"), Aggregator)
    assert torch.equal(get_aggregator("median")(FIVE), coordinate_median(FIVE))
    assert torch.equal(get_aggregator("krum", f=1)(KRUM_X), krum(KRUM_X, 1))
    assert torch.equal(get_aggregator("multi_krum", f=1, m=2)(KRUM_X), multi_krum(KRUM_X, 1, 2))
    w = torch.tensor([0.75, 0.25])
    assert torch.equal(get_aggregator("mean")(t([[4, 0], [0, 8]]), w), torch.tensor([3.0, 2.0]))


def test_registry_centered_clipping_centres_on_own_row() -> None:
    x = t([[0, 0], [3, 4], [0, 1]])
    agg = get_aggregator("centered_clipping", tau=1.0)
    assert torch.allclose(agg(x, own=0), torch.tensor([0.2, 0.6]))
    assert torch.allclose(agg(x, own=1), centered_clipping(x, x[1], 1.0))
    with pytest.raises(ValueError, match="own must be a row index"):
        agg(x, own=3)


def test_f_fraction_rounds_down_and_clamp_lowers_f() -> None:
    agg = get_aggregator("krum", f_fraction=0.29)
    assert agg.effective_f(100) == 29  # 0.29 * 100 is 28.999... in binary
    assert get_aggregator("trimmed_mean", f_fraction=0.2).effective_f(9) == 1
    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
        get_aggregator("krum", f=2)(KRUM_X)
    clamped = get_aggregator("krum", f=2, clamp=True)
    assert clamped.effective_f(5) == 1
    assert torch.equal(clamped(KRUM_X), krum(KRUM_X, 1))
    # Krum cannot run on 2 rows even with f = 0: clamp falls back to the mean.
    assert clamped.effective_f(2) == -1
    assert torch.equal(clamped(t([[0, 0], [2, 4]])), torch.tensor([1.0, 2.0]))


def test_nnm_composition_by_name_and_by_option() -> None:
    x = t([[0], [1], [10]])
    assert torch.equal(get_aggregator("nnm+median", f=1)(x), torch.tensor([0.5]))
    assert torch.equal(get_aggregator("median", nnm=True, f=1)(x), torch.tensor([0.5]))
    assert get_aggregator("mean", nnm=True, f=1).name == "nnm+mean"
    with pytest.raises(ValueError, match="needs f"):
        get_aggregator("nnm+mean")


# ---------------------------------------------------------------- properties

_FLOATS = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def stack_and_perm(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    n = draw(st.integers(5, 9))
    d = draw(st.integers(1, 4))
    x = draw(arrays(np.float32, (n, d), elements=_FLOATS))
    return x, draw(st.permutations(range(n)))


@settings(max_examples=40, deadline=None)
@given(stack_and_perm())
def test_median_and_trimmed_mean_are_permutation_invariant(
    case: tuple[np.ndarray, list[int]],
) -> None:
    x, perm = torch.from_numpy(case[0]), case[1]
    assert torch.equal(coordinate_median(x[perm]), coordinate_median(x))
    assert torch.allclose(trimmed_mean(x[perm], 1), trimmed_mean(x, 1), rtol=1e-5, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(stack_and_perm())
def test_krum_is_permutation_invariant(case: tuple[np.ndarray, list[int]]) -> None:
    x, perm = torch.from_numpy(case[0]), case[1]
    scores = krum_scores(x, 1)
    best = scores.min()
    assume(int((scores <= best * (1 + 1e-9) + 1e-9).sum()) == 1)  # a unique winner
    assert torch.equal(krum(x[perm], 1), krum(x, 1))


_EVERY_AGGREGATOR = [
    (name, {"f": 1} if "f" in params else {}) for name, params in sorted(AGGREGATORS.items())
]


@settings(max_examples=15, deadline=None)
@given(arrays(np.float32, (5,), elements=_FLOATS))
def test_every_aggregator_returns_the_vector_shared_by_all_rows(v: np.ndarray) -> None:
    vector = torch.from_numpy(v)
    stack = vector.expand(7, -1).clone()  # n = 7 suits Bulyan with f = 1
    weights = torch.tensor([0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    for name, params in _EVERY_AGGREGATOR:
        out = get_aggregator(name, **params)(stack, weights=weights, own=2)
        assert torch.allclose(out, vector, rtol=1e-6, atol=1e-6), name


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda n: arrays(np.float32, (n, 3), elements=st.integers(-3, 3).map(float))
    )
)
def test_median_matches_numpy_with_ties_and_even_n(x: np.ndarray) -> None:
    expected = torch.from_numpy(np.median(x, axis=0).astype(np.float32))
    assert torch.equal(coordinate_median(torch.from_numpy(x)), expected)


# ---------------------------------------------------------------- fast paths vs float64 references
#
# Stacks large enough (``use_fast_gram``) for the memory-bound paths: column
# blocks, the centred float32 Gram matrix with its exact re-check, direct clipping.


def _fl_like(n: int = 24, d: int = 12_000, seed: int = 5) -> torch.Tensor:
    """Models of norm ~30 that differ by ~0.07, two sign-flipped, two far outliers, one tiny."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g) * (30 / d**0.5)
    x = common + torch.randn(n, d, generator=g) * (0.05 / d**0.5)
    x[1] = -x[1]
    x[2] = -x[2]
    x[3] = 1e20 * torch.randn(d, generator=g)  # its float32 squares overflow
    x[4] = x[4] * 1e3
    x[5] = x[5] * 1e-25  # its float32 squares underflow
    return x


def _exact_sq(x: torch.Tensor) -> torch.Tensor:
    """Squared distances by explicit float64 differences (exact for float32 input, up to sums)."""
    x64 = x.double()
    return torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def _exact_krum_order(x: torch.Tensor, f: int) -> torch.Tensor:
    d2 = _exact_sq(x)
    d2.fill_diagonal_(math.inf)
    k = len(x) - f - 2
    scores = torch.sort(d2, dim=1).values[:, :k].sum(dim=1)
    return torch.sort(scores, stable=True).indices


from p2pfl.aggregation.distance import krum_best  # noqa: E402


def test_fast_paths_are_taken_on_these_stacks() -> None:
    from p2pfl.aggregation._linalg import centred_gram, use_fast_gram

    x = _fl_like()
    assert use_fast_gram(x)
    cg = centred_gram(x)
    assert cg.unit == 2.0**-24  # float32 products
    assert cg.reference not in (1, 2, 3, 4, 5)  # centred among the ordinary rows


@pytest.mark.parametrize("n", [7, 8, 100])
def test_median_and_trimmed_mean_match_float64_references(n: int) -> None:
    x = torch.randn(n, 4_000, generator=torch.Generator().manual_seed(n))  # several blocks
    x[0] = 1e30
    expected = torch.from_numpy(np.median(x.numpy(), axis=0))
    assert torch.equal(coordinate_median(x), expected)
    f = (n - 1) // 3
    kept = torch.sort(x.double(), dim=0).values[f : n - f]
    assert torch.equal(trimmed_mean(x, f), kept.mean(dim=0).float())  # correctly rounded
    x64 = x.double()
    assert torch.equal(coordinate_median(x64), torch.from_numpy(np.median(x64.numpy(), axis=0)))


def test_median_of_half_precision_stacks_uses_torch_sort() -> None:
    x = torch.randn(9, 300, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(coordinate_median(x), torch.sort(x, dim=0).values[4])
    assert coordinate_median(x).dtype == torch.bfloat16


def test_krum_and_multi_krum_choose_as_exact_distances_do() -> None:
    for seed in range(2):
        x = _fl_like(seed=seed)
        for f in (2, 5):
            order = _exact_krum_order(x, f)
            assert torch.equal(krum(x, f), x[order[0]])
            for m in (1, 5, len(x) - f):
                assert torch.equal(krum_best(x, f, m), torch.sort(order[:m]).values)
            chosen = torch.sort(order[:5]).values
            assert torch.equal(multi_krum(x, f, 5), x[chosen].sum(dim=0) / 5)


def test_krum_exact_ties_are_broken_by_index_on_the_fast_path() -> None:
    # Entries in {-1, 0, 1}: every float32 product and block sum is exact, so the float32
    # Gram matrix equals the float64 one, scores tie exactly, and only the re-check with
    # the index rule decides (rows 6 and 9 are copies of the most central row 2).
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-1, 2, (16, 17_000), generator=g).float()
    x[6] = x[2]
    x[9] = x[2]
    x[10:] = x[2]
    x[10:, :40] = torch.randint(-1, 2, (6, 40), generator=g).float()
    order = _exact_krum_order(x, 3)
    assert torch.equal(krum(x, 3), x[order[0]])
    for m in (2, 3, 4, 8):
        assert torch.equal(krum_best(x, 3, m), torch.sort(order[:m]).values)


def _float64_geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld on explicit float64 vectors, as ByzFL and RFA run it (no Gram matrix)."""
    x64 = x.double()
    z = x64.mean(dim=0)
    for _ in range(iters):
        beta = 1.0 / torch.linalg.vector_norm(x64 - z, dim=1).clamp_min(eps)
        new = (beta / beta.sum()) @ x64
        moved = float(torch.linalg.vector_norm(new - z))
        z = new
        if moved <= 1e-7 * max(float(torch.linalg.vector_norm(z)), eps):
            break
    return z


def test_geometric_median_matches_a_float64_weiszfeld() -> None:
    x = _fl_like()
    # No overflowing row: the reference squares in float64 but sums its norms naively.
    x = x[torch.tensor([0] + list(range(6, 24)) + [1, 4])]
    got = geometric_median(x).double()
    expected = _float64_geometric_median(x)
    spread = float(torch.linalg.vector_norm(x[2].double() - x[3].double()))  # two honest rows
    assert float(torch.linalg.vector_norm(got - expected)) <= 1e-4 * spread
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


def _float64_centered_clipping(
    x: torch.Tensor, centre: torch.Tensor, tau: float, iters: int, w: torch.Tensor | None = None
) -> torch.Tensor:
    """ByzFL's algorithm (differences, norms, clip, weighted mean per iteration) in float64."""
    x64 = x.double()
    v = centre.double()
    weights = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64) if w is None else w.double()
    weights = weights / weights.sum()
    for _ in range(iters):
        diff = x64 - v
        scale = (tau / torch.linalg.vector_norm(diff, dim=1)).clamp(max=1.0)
        v = v + (weights * scale) @ diff
    return v


@pytest.mark.parametrize("iters", [1, 3, 4, 9])  # 4 and 9 take the Gram-matrix form
def test_centered_clipping_matches_a_float64_reference(iters: int) -> None:
    x = _fl_like()
    centre = x[0]
    w = torch.rand(len(x), generator=torch.Generator().manual_seed(iters))
    for tau, weights in ((0.02, None), (0.02, w), (1e30, None)):
        got = centered_clipping(x, centre, tau, iters, weights).double()
        expected = _float64_centered_clipping(x, centre, tau, iters, weights)
        scale = float(expected.abs().max())
        assert torch.allclose(got, expected, rtol=0, atol=2e-6 * scale), (tau, iters)


def test_torch_products_give_the_same_choices_as_numpy_blas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where numpy's BLAS cannot be pinned to one thread (or off CPU) torch multiplies."""
    from p2pfl.aggregation import _threads

    x = _fl_like(seed=4)
    with_numpy = (krum_best(x, 3, 7), geometric_median(x), centered_clipping(x, x[0], 0.02, 9))
    monkeypatch.setattr(_threads, "_setter", None)
    assert not _threads.pinned_blas()
    with_torch = (krum_best(x, 3, 7), geometric_median(x), centered_clipping(x, x[0], 0.02, 9))
    assert torch.equal(with_numpy[0], with_torch[0])
    for a, b in zip(with_numpy[1:], with_torch[1:], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(a.abs().max()))


def test_every_aggregator_takes_a_stack_that_requires_grad() -> None:
    """Stacks of flattened parameters may carry requires_grad; the in-place fast paths detach."""
    from p2pfl.aggregation._linalg import use_fast_gram

    x = _fl_like(seed=6)[6:]  # the 18 ordinary rows
    x = torch.cat([x, x + 0.01])
    assert use_fast_gram(x)
    for name, params in _EVERY_AGGREGATOR:
        out = get_aggregator(name, **params)(x.detach().clone().requires_grad_(), own=1)
        assert out.shape == (x.shape[1],) and bool(torch.isfinite(out).all()), name
