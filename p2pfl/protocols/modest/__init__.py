"""MoDeST: decentralized sampling of trainers and aggregators for every round.

``view`` holds the population view and the hash order of candidates, ``sampling`` the
ping-down-the-order resolution of a round's sample, ``membership`` the view's upkeep (what
is taken from others' views and joins; ``signed`` the variant with signed entries), and
``protocol`` the round logic's state machine.
"""

from p2pfl.protocols.modest.membership import Membership, PlainMembership
from p2pfl.protocols.modest.protocol import Aggregate, ModestProtocol, weighted_mean
from p2pfl.protocols.modest.sampling import Liveness, SampleResolver
from p2pfl.protocols.modest.signed import SignedMembership
from p2pfl.protocols.modest.view import (
    PopulationView,
    ViewEntry,
    derive_candidates,
    sample_key,
)

__all__ = [
    "Aggregate",
    "Liveness",
    "Membership",
    "ModestProtocol",
    "PlainMembership",
    "PopulationView",
    "SampleResolver",
    "SignedMembership",
    "ViewEntry",
    "derive_candidates",
    "sample_key",
    "weighted_mean",
]
