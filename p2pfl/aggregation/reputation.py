"""Similarity-based reputation: FoolsGold and SybilWall scores from update histories.

A Sybil adversary's identities pursue one goal, so the running sums of their updates
(their *histories*) point the same way, while honest peers on their own data disagree.
FoolsGold (Fung et al., 2020) turns that into weights; SybilWall (Werthenbach and
Pouwelse, 2023) applies the same scoring in a decentralised network, to the histories a
peer knows: its neighbours' plus the ones gossiped to it from farther away.

Scoring, for ``k`` histories ``h_i`` (rows of a ``(k, d)`` tensor):

1. ``cs_ij`` = cosine similarity of ``h_i`` and ``h_j`` (0 when either is the zero vector);
   ``v_i = max(0, max_{j != i} cs_ij)``, each peer's strongest similarity.
2. Pardoning: when ``v_j > v_i``, ``cs_ij *= v_i / v_j``. An honest peer that merely looks
   like a suspect (but is less similar to anyone than the suspect is) is not punished for it.
3. ``w_i = 1 - max(0, max_{j != i} cs_ij)``, in ``[0, 1]``.
4. Rescale ``w /= max(w)``, so the most distinct peer has weight 1. A ``w_i`` below 1e-12
   is set to 0 first: cosines are rounded in float64, and identical histories must score
   0 even when every history is identical (then all weights are 0).
5. Logit: ``w_i = kappa * (ln(w_i / (1 - w_i)) + 0.5)`` with ``w_i = 1`` taken as 0.99, then
   clipped to ``[0, 1]``. Weights above about 0.62 saturate at 1 (``kappa = 1``), weights
   near 0 go to exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from p2pfl.aggregation._checks import check_stack
from p2pfl.aggregation._linalg import gram

_IDENTICAL = 1e-12


def cosine_similarities(histories: Tensor) -> Tensor:
    """Pairwise cosine similarities of the rows of ``histories`` (k, d); float64 ``(k, k)``.

    A zero row has similarity 0 with everything (a peer that has sent nothing yet is
    neither trusted for resembling anyone nor suspected).
    """
    g = gram(histories)
    norms = g.diagonal().clamp_min(0.0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cs = torch.where(denom > 0, g / denom.clamp_min(1e-300), 0.0)
    return cs.clamp(-1.0, 1.0)


def foolsgold_weights(histories: Tensor, kappa: float = 1.0) -> Tensor:
    """FoolsGold weights of ``k`` peers from their update histories ``(k, d)``; float64 ``(k,)``.

    Identical (Sybil) histories get weight 0, mutually dissimilar (honest, non-IID) ones
    get weight 1. See the module docstring for the five steps. ``kappa`` is the
    confidence parameter of the logit.
    """
    check_stack(histories, "foolsgold")
    if not kappa > 0:
        raise ValueError(f"foolsgold: kappa must be > 0, got {kappa!r}")
    k = histories.shape[0]
    cs = cosine_similarities(histories)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=cs.device)

    def row_max(m: Tensor) -> Tensor:
        return m.masked_fill(~off_diagonal, -torch.inf).amax(dim=1).clamp_min(0.0)

    v = row_max(cs)
    # pardon[i, j] = v_i / v_j where v_j > v_i, else 1
    ratio = v[:, None] / v[None, :].clamp_min(1e-300)
    pardoned = torch.where(v[None, :] > v[:, None], cs * ratio, cs)
    w = 1.0 - row_max(pardoned)
    w = torch.where(w < _IDENTICAL, 0.0, w)
    top = w.max()
    if top <= 0:
        return torch.zeros(k, dtype=torch.float64, device=cs.device)
    w = (w / top).clamp_max(0.99)
    logit = kappa * (torch.log(w / (1.0 - w)) + 0.5)  # log(0) = -inf clips to 0 below
    return logit.clamp(0.0, 1.0)


def sybilwall_weights(
    histories: Tensor,
    direct: Sequence[int] | Tensor | None = None,
    kappa: float = 1.0,
) -> Tensor:
    """SybilWall trust weights of a peer's direct neighbours; float64 ``(len(direct),)``.

    ``histories`` (k, d) holds one row per *distinct* known peer: the direct neighbours'
    histories (kept locally: running sums of the updates each sent) and the histories
    gossiped from farther peers. ``direct`` lists the rows of direct neighbours, whose
    models will be aggregated (default: all rows).

    Differences from :func:`foolsgold_weights`, which it calls:

    - The scored set is wider than the set aggregated. A Sybil identity that is this
      peer's only contact with the adversary still scores 0 because its twins' histories
      reached this peer by gossip.
    - Only the direct neighbours' weights are returned; the caller gives its own model
      weight 1 and averages (``mean(stack, weights=cat([1], w))``). Rows must be one per
      peer: a peer's history present twice would look like its own Sybil.
    - Row positions are kept exactly as given (the reference implementation misaligned
      weights and models once gossiped histories were present; here ``result[i]`` is the
      weight of the peer in row ``direct[i]``).
    """
    scores = foolsgold_weights(histories, kappa=kappa)
    if direct is None:
        return scores
    index = torch.as_tensor(direct, dtype=torch.long, device=scores.device)
    if index.dim() != 1:
        raise ValueError(f"sybilwall: direct must be a 1-D list of row indices, got {direct!r}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= scores.shape[0]):
        raise ValueError(
            f"sybilwall: direct indices must lie in [0, {scores.shape[0]}), got {index.tolist()}"
        )
    return scores[index]
