"""Bristle's pure parts (Verbraeken, de Vos and Pouwelse, 2021): prioritiser and integrator.

Bristle freezes a pre-trained feature extractor and exchanges only the output layer, a
linear map from ``h`` features to ``C`` classes. Here that layer is handled as a
``(C, h + 1)`` matrix of *class rows*: row ``c`` is ``[weight[c, :], bias[c]]`` of the final
``nn.Linear(h, C)`` (see :func:`pack_output_layer`). Class rows can be mixed per class
because each one only drives the logit of its own class.

Two steps, both pure (the protocol keeps the per-peer state and measures recalls):

1. :func:`bristle_select` (distance-based prioritiser): of the output layers received,
   keep the ``keep_closest`` nearest to one's own by L2 distance, plus ``n_random`` others
   drawn at random so that a peer can still discover useful but distant models (e.g.
   peers that know classes it has never seen).
2. :func:`bristle_class_weights` + :func:`bristle_integrate` (performance-based
   integrator): every kept peer's layer is evaluated on a small local test set, giving a
   per-class recall; for each class, a peer's row is weighted by how its recall compares
   with one's own, then rows are averaged class by class.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor


def pack_output_layer(weight: Tensor, bias: Tensor) -> Tensor:
    """``nn.Linear(h, C)`` parameters -> class rows ``(C, h + 1)`` (bias as the last column)."""
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(
            f"expected weight (C, h) and bias (C,), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    return torch.cat([weight, bias[:, None]], dim=1)


def unpack_output_layer(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Class rows ``(C, h + 1)`` -> ``(weight (C, h), bias (C,))``, the inverse of packing."""
    if rows.dim() != 2 or rows.shape[1] < 2:
        raise ValueError(f"expected class rows of shape (C, h + 1), got {tuple(rows.shape)}")
    return rows[:, :-1], rows[:, -1]


def bristle_select(
    own_out: Tensor,
    others_out: Tensor,
    keep_closest: int,
    n_random: int = 0,
    rng: random.Random | torch.Generator | None = None,
) -> Tensor:
    """Indices (into ``others_out``) of the output layers to integrate; ``int64``.

    ``own_out`` is the peer's own output layer, any shape (e.g. ``(C, h + 1)``); ``others_out``
    stacks ``k`` received layers of that shape, ``(k, *own_out.shape)``. Returned first: the
    ``keep_closest`` nearest by L2 distance, nearest first (ties by index); then up to
    ``n_random`` of the remaining indices drawn uniformly without replacement, in draw
    order. ``rng`` (a ``random.Random`` or a ``torch.Generator``) makes the draw
    reproducible and is required when ``n_random > 0``.
    """
    if others_out.shape[1:] != own_out.shape:
        raise ValueError(
            f"bristle_select: others_out must have shape (k, {', '.join(map(str, own_out.shape))}),"
            f" got {tuple(others_out.shape)}"
        )
    for name, value in (("keep_closest", keep_closest), ("n_random", n_random)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"bristle_select: {name} must be an int >= 0, got {value!r}")
    k = others_out.shape[0]
    flat = others_out.reshape(k, -1).to(torch.float64)
    dist = (flat - own_out.reshape(1, -1).to(torch.float64)).square().sum(dim=1)
    order = torch.sort(dist, stable=True).indices
    closest, rest = order[:keep_closest], order[keep_closest:]
    n_draw = min(n_random, rest.numel())
    if n_draw == 0:
        return closest
    if rng is None:
        raise ValueError("bristle_select: n_random > 0 needs an rng for a reproducible draw")
    candidates = torch.sort(rest).values  # draw from a canonical order, not distance order
    if isinstance(rng, random.Random):
        picks = torch.tensor(rng.sample(range(candidates.numel()), n_draw), dtype=torch.long)
    else:
        picks = torch.randperm(candidates.numel(), generator=rng)[:n_draw]
    return torch.cat([closest, candidates[picks.to(candidates.device)]])


def bristle_class_weights(
    own_recall: Tensor,
    peer_recalls: Tensor,
    tolerance: float = 0.1,
) -> Tensor:
    """Per-class weight of every peer, ``(k, C)`` in ``[0, 1]``.

    ``own_recall`` (C,) is the recall of one's own output layer on each class of the local
    test set; ``peer_recalls`` (k, C) the same for each peer's layer. The formula:

        w[p, c] = clip(1 + (peer_recalls[p, c] - own_recall[c]) / tolerance, 0, 1)

    A peer at least as good as us on class ``c`` gets weight 1 for that class; one that is
    worse fades linearly to 0 when it is ``tolerance`` (absolute recall) worse; ``tolerance
    = 0`` is the hard rule "no worse than us". So a peer can help on the classes it knows
    (including those we never saw, where our recall is 0) without being trusted on the
    rest, which is what lets Bristle cope with non-IID classes.

    Caveat: recall alone rewards a layer that predicts one class for everything (recall 1
    on that class). The prioritiser's distance filter removes blatant cases; passing a
    per-class F1 score here instead of recall closes that door at the price of needing
    precision too. Any per-class score in ``[0, 1]`` works with this formula.
    """
    if own_recall.dim() != 1:
        raise ValueError(
            f"bristle_class_weights: own_recall must be (C,), got {tuple(own_recall.shape)}"
        )
    if peer_recalls.dim() != 2 or peer_recalls.shape[1] != own_recall.shape[0]:
        raise ValueError(
            f"bristle_class_weights: peer_recalls must be (k, {own_recall.shape[0]}), "
            f"got {tuple(peer_recalls.shape)}"
        )
    if not tolerance >= 0:
        raise ValueError(f"bristle_class_weights: tolerance must be >= 0, got {tolerance!r}")
    gap = peer_recalls.to(torch.float64) - own_recall.to(torch.float64)[None, :]
    if tolerance == 0:
        return (gap >= 0).to(torch.float64)
    return (1.0 + gap / tolerance).clamp(0.0, 1.0)


def bristle_integrate(
    own_out: Tensor,
    peers_out: Tensor,
    class_weights: Tensor,
    own_weight: float = 1.0,
) -> Tensor:
    """Class-by-class weighted average of output layers; shape ``(C, h + 1)``.

    ``own_out`` (C, h + 1) are one's own class rows, ``peers_out`` (k, C, h + 1) the kept
    peers', ``class_weights`` (k, C) from :func:`bristle_class_weights`. Row ``c`` is

        (own_weight * own_out[c] + sum_p w[p, c] * peers_out[p, c]) / (own_weight + sum_p w[p, c])

    and stays ``own_out[c]`` when that denominator is 0.
    """
    if own_out.dim() != 2:
        raise ValueError(
            f"bristle_integrate: own_out must be (C, h + 1), got {tuple(own_out.shape)}"
        )
    c, width = own_out.shape
    k = peers_out.shape[0] if peers_out.dim() == 3 else -1
    if peers_out.shape != (k, c, width):
        raise ValueError(
            f"bristle_integrate: peers_out must be (k, {c}, {width}), got {tuple(peers_out.shape)}"
        )
    if class_weights.shape != (k, c):
        raise ValueError(
            f"bristle_integrate: class_weights must be ({k}, {c}), got {tuple(class_weights.shape)}"
        )
    if not own_weight >= 0:
        raise ValueError(f"bristle_integrate: own_weight must be >= 0, got {own_weight!r}")
    w = class_weights.to(own_out.dtype)
    total = w.sum(dim=0) + own_weight  # (C,)
    mixed = own_weight * own_out + torch.einsum("kc,kcj->cj", w, peers_out.to(own_out.dtype))
    out = mixed / total.clamp_min(torch.finfo(own_out.dtype).tiny)[:, None]
    return torch.where((total > 0)[:, None], out, own_out)
