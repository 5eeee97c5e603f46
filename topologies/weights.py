"""The Metropolis-Hastings rule, once, for a whole graph and for one peer alike.

``W_ij = 1 / (max(deg_i, deg_j) + 1)``: the simulator builds whole matrices from it
(:func:`topologies.mixing.metropolis_hastings`), a node its own row from a topology file
(:class:`p2pfl.neighbours.PeerGraph`), and D-PSGD each weight from the degree its
neighbour declares. All three call this function, so they cannot disagree. It takes ints
or NumPy arrays of degrees, and imports nothing heavy: a node that needs one weight does
not load a graph library.
"""

from __future__ import annotations

from typing import Any, overload

__all__ = ["metropolis_hastings_weight"]


@overload
def metropolis_hastings_weight(own_degree: int, other_degree: int) -> float: ...
@overload
def metropolis_hastings_weight(own_degree: Any, other_degree: Any) -> Any: ...
def metropolis_hastings_weight(own_degree: Any, other_degree: Any) -> Any:
    """``1 / (max(deg_i, deg_j) + 1)``: the same number on both ends of an edge.

    Elementwise on NumPy arrays (``max`` is then ``numpy.maximum``).
    """
    if isinstance(own_degree, int) and isinstance(other_degree, int):
        return 1.0 / (max(own_degree, other_degree) + 1.0)
    import numpy as np

    return 1.0 / (np.maximum(own_degree, other_degree) + 1.0)
