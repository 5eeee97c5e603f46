"""Sybil attacks: one adversary speaking through ``k`` identities.

Identities are cheap in an open peer-to-peer network, so one adversary can outvote honest
peers by sheer numbers. Its identities all serve one goal and send the same update (or the
same update plus a little noise to look distinct): exactly the similarity that FoolsGold
and SybilWall look for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SybilGroup:
    """An adversary with ``identities`` peer ids that send colluding updates.

    ``jitter`` is the standard deviation of Gaussian noise added to each identity's copy
    (absolute, per coordinate); 0 sends identical copies.
    """

    identities: int
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.identities, bool) or not isinstance(self.identities, int):
            raise ValueError(f"identities must be an int >= 1, got {self.identities!r}")
        if self.identities < 1:
            raise ValueError(f"identities must be an int >= 1, got {self.identities!r}")
        if isinstance(self.jitter, bool) or not self.jitter >= 0:
            raise ValueError(f"jitter must be a number >= 0, got {self.jitter!r}")

    def replicate(self, vector: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The ``(identities, d)`` vectors the identities send, from one malicious ``vector`` (d,).

        Rows are independent copies (never views of ``vector`` or of each other).
        """
        copies = vector.unsqueeze(0).repeat(self.identities, *([1] * vector.dim()))
        if self.jitter > 0:
            noise = torch.randn(
                copies.shape, generator=generator, dtype=copies.dtype, device=copies.device
            )
            copies += self.jitter * noise
        return copies
