"""MoDeST: decentralized sampling of trainers and aggregators for every round.

``view`` holds the population view and the hash order of candidates, ``sampling`` the
ping-down-the-order resolution of a round's sample, ``protocol`` the state machine.
"""

from p2pfl.protocols.modest.protocol import Aggregate, ModestProtocol, weighted_mean
from p2pfl.protocols.modest.sampling import Liveness, SampleResolver
from p2pfl.protocols.modest.view import (
    PopulationView,
    ViewEntry,
    derive_candidates,
    sample_key,
)

__all__ = [
    "Aggregate",
    "Liveness",
    "ModestProtocol",
    "PopulationView",
    "SampleResolver",
    "ViewEntry",
    "derive_candidates",
    "sample_key",
    "weighted_mean",
]
