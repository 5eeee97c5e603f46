"""Byzantine and Sybil behaviours, usable by simulated peers and real nodes alike.

- :mod:`~p2pfl.attacks.data_poisoning`: batch transforms ``(x, y) -> (x, y)`` (label flip,
  targeted flip, backdoor trigger) and the attack-success-rate measure;
- :mod:`~p2pfl.attacks.model_poisoning`: pure functions of honest vectors giving what a
  Byzantine peer sends (sign flip, Gaussian, scaling, ALIE, IPM, free rider);
- :mod:`~p2pfl.attacks.sybil`: one adversary with ``k`` identities;
- :mod:`~p2pfl.attacks.registry`: ``get_attack(name, **params)``, each attack tagged with
  ``kind`` "data" or "model" so a driver knows where to apply it;
- :mod:`~p2pfl.attacks.behaviour`: :class:`ByzantineProtocol`, a sans-I/O wrapper that
  turns an honest protocol object into a Byzantine peer (crafted sends, rushing,
  isolation, colluding Sybil identities); :func:`as_attacker` wraps a protocol when the
  attack needs it. The simulator (``sim.adversary``) and a node started with an
  ``[attack]`` section (``p2pfl.node``) both go through it.
"""

from p2pfl.attacks.behaviour import (
    MODEL_KINDS,
    ByzantineProtocol,
    Collusion,
    as_attacker,
    needs_wrapper,
)
from p2pfl.attacks.data_poisoning import (
    Backdoor,
    LabelFlip,
    TargetedLabelFlip,
    Trigger,
    apply_trigger,
    attack_success_rate,
    backdoor,
    label_flip,
    targeted_label_flip,
)
from p2pfl.attacks.model_poisoning import (
    alie,
    alie_z,
    free_rider,
    gaussian,
    ipm,
    scaling,
    sign_flip,
)
from p2pfl.attacks.registry import (
    ATTACK_KINDS,
    ATTACKS,
    Attack,
    AttackKind,
    ModelAttackContext,
    get_attack,
)
from p2pfl.attacks.sybil import SybilGroup

__all__ = [
    "ATTACKS",
    "ATTACK_KINDS",
    "MODEL_KINDS",
    "Attack",
    "AttackKind",
    "Backdoor",
    "ByzantineProtocol",
    "Collusion",
    "LabelFlip",
    "ModelAttackContext",
    "SybilGroup",
    "TargetedLabelFlip",
    "Trigger",
    "alie",
    "alie_z",
    "apply_trigger",
    "as_attacker",
    "attack_success_rate",
    "backdoor",
    "free_rider",
    "gaussian",
    "get_attack",
    "ipm",
    "label_flip",
    "needs_wrapper",
    "scaling",
    "sign_flip",
    "targeted_label_flip",
]
