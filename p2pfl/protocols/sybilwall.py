"""SybilWall (Werthenbach and Pouwelse, 2023): Sybil-resistant decentralized learning.

A Sybil adversary's identities pursue one goal, so the updates they send point the same
way, while honest peers, each on its own non-IID data, disagree. SybilWall runs D-PSGD's
round structure (train, send to every neighbour, wait for them or the round timer) and
changes how a peer mixes:

1. **Histories.** For each direct neighbour ``j`` a peer keeps ``h_j``, the running sum of
   ``j``'s updates as it sees them: ``received model of j - own model at the start of the
   round`` (both come from the same starting point after mixing, so the difference is
   essentially what ``j``'s local training did). The sum is kept locally: a peer never
   trusts anyone else's account of its own neighbours.
2. **History gossip.** Every round a peer sends each neighbour one stored history (kind
   ``"history"``, with its subject and hop distance), drawn with probability
   ``gossip_decay ** hops``: mostly its own neighbours' (1 hop), sometimes ones it heard of
   (2, 3... hops). A received history is stored at ``hops + 1``; at most ``max_known`` such
   histories are kept (the farthest go first). This is what lets a peer see that its one
   Sybil neighbour has twins elsewhere in the network.
3. **Scoring.** All known histories -- direct and gossiped, one row per peer -- are scored
   FoolsGold-style (:func:`p2pfl.aggregation.sybilwall_weights`: cosine similarity,
   pardoning, logit), and each direct neighbour's model is weighted by its score, the
   peer's own model by 1: ``x = (x_own + sum_j w_j x_j) / (1 + sum_j w_j)``.

The weights are aligned to the models they weight by construction (the reference code
mis-aligned them once gossiped histories were present: we implement the intent).

Unsigned (``signer=None``, the default and the simulator's), gossiped histories are taken
at face value, as in the paper: a hostile relayer can fabricate the history of any honest
peer -- e.g. gossip twins of an honest neighbour's history under the names of far peers,
so that the receiver scores that neighbour as a Sybil and drops it.

**Signed histories** (``signer``: a :class:`~p2pfl.protocols.records.RecordSigner`,
issue 8). A relayed history must come from its subject, so the subject must be able to
compute -- and sign -- what is relayed about it. A history as a neighbour observes it,
``sum_r (received_j^r - start_i^r)``, mixes the subject's models with the *observer's*
own starts, which the subject never sees: no two peers compute the same bits. Splitting
it works, though: ``h_j at i = D_j - C_i`` with

- ``D_j = sum_r (model j sent in round r)``: known to ``j`` alone with certainty, so
  ``j`` declares and signs it; and
- ``C_i = sum_r (i's own model at the start of round r)``: known to ``i``, so any peer
  ``i`` turns a relayed ``D_j`` (declared up to round ``r``) into the very row it would
  have observed had ``j`` been its neighbour, ``D_j - C_i(r)``.

(Signing ``j``'s own update sum ``sum_r (trained - start_j)`` instead would compare a
different quantity with the observed rows -- measured: cosine about 0.67 between Sybil
twins instead of about 0.98, too little for FoolsGold's scoring to catch them.)

With a signer, then:

- every round a peer adds the model it sends to ``D`` and signs ``{"k":
  "sybilwall.history", "r": round, "n": numel, "d": SHA-256 of D's float32 little-endian
  bytes}``; rounds it skipped (a catch-up jump) count as sending the model it had, so
  ``D`` always covers rounds ``0..r``, as does every ``C``;
- it keeps ``C`` and its last ``history_window`` round starts, enough to get ``C(r)`` for
  any recent ``r``; an older declaration cannot be aligned and is not scored (it stays
  relayable for others);
- what is gossiped is always a declared sum with its subject's record: a peer draws, per
  neighbour and round, its own (weight ``gossip_decay ** 0``), a neighbour's (``** 1``)
  or a farther one (``** hops``); meta ``{"subject", "hops", "hr": the record's round,
  "proof": the record}``, all forwarded verbatim;
- a receiver drops (and counts, ``sybilwall.stale_history``) a declaration not newer than
  the one it holds for that subject *before* verifying anything; otherwise the record
  must verify, come from the subject, have round ``hr``, and hash to the tensor received;
  anything else is dropped and counted (``sybilwall.bad_history``). Neighbours'
  declarations are only relayed (``declared``): direct neighbours are still scored by the
  histories the peer observed itself.

What this covers: no relayer can put words in an honest peer's mouth -- fabricate its
history, alter it, or pass an old one off as new (the round is signed, the newest wins).
What it does not: a peer can still lie about *itself* (declare a ``D`` unlike the models
it sent; its direct neighbours could notice, as they hold the same models, but we do not
check); SybilWall assumes histories reflect updates, and we state that assumption here.
Sybil identities each hold a key, so they can sign twins of anyone's history as *their
own* -- which is the Sybil behaviour SybilWall is built to score. ``hops`` is not signed
(it only steers gossip and eviction), and a relayer may withhold histories. The tensor
must travel losslessly (the node sends raw float32, the simulator by reference).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Unpack

import torch
from torch import Tensor

from p2pfl.aggregation import sybilwall_weights
from p2pfl.protocols.base import (
    Effect,
    Event,
    Message,
    MessageReceived,
    PeerId,
    Record,
    Send,
    TrainingDone,
)
from p2pfl.protocols.contract import Bytes, Int, MessageSpec, PeerName, Role, RoundNumber
from p2pfl.protocols.dpsgd import DPSGD
from p2pfl.protocols.synchronous import MODEL, RoundSettings

if TYPE_CHECKING:
    from p2pfl.protocols.records import RecordSigner

HISTORY = "history"
#: the ``"k"`` of a signed history record
HISTORY_RECORD = "sybilwall.history"


def history_digest(history: Tensor) -> bytes:
    """SHA-256 of a history's float32 little-endian bytes (what its subject signs)."""
    array = history.detach().to(torch.float32).cpu().contiguous().reshape(-1).numpy()
    if sys.byteorder == "big":
        array = array.astype("<f4")
    return hashlib.sha256(array.data).digest()


def history_record(history: Tensor, round_: int) -> dict[str, Any]:
    """What a peer signs about its own history at ``round_``."""
    return {"k": HISTORY_RECORD, "r": round_, "n": history.numel(), "d": history_digest(history)}


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


class SybilWall(DPSGD):
    """D-PSGD whose neighbours are weighted by how unlike each other their histories are."""

    name = "sybilwall"
    #: models as in D-PSGD; histories (sums over rounds) about a ``subject`` from a
    #: neighbour, signed by the subject when relayed data is signed (``hr``, ``proof``)
    messages: ClassVar[Mapping[str, MessageSpec]] = {
        MODEL: MessageSpec(sender=Role.NEIGHBOUR, tensor=True),
        HISTORY: MessageSpec(
            sender=Role.NEIGHBOUR,
            tensor=True,
            accumulates=True,
            fields={
                "subject": PeerName(),
                "hops": Int(lo=0, hi=1 << 16),
                "hr": RoundNumber(),
                "proof": Bytes(max_len=4096),
            },
            required=frozenset({"subject", "hops"}),
        ),
    }

    def __init__(
        self,
        peer_id: PeerId,
        params: Tensor,
        neighbours: list[PeerId],
        *,
        gossip_decay: float = 0.5,
        max_known: int = 16,
        kappa: float = 1.0,
        round_timeout: float = 10.0,
        signer: RecordSigner | None = None,
        history_window: int = 8,
        **settings: Unpack[RoundSettings],
    ) -> None:
        super().__init__(peer_id, params, neighbours, round_timeout=round_timeout, **settings)
        if not 0 < gossip_decay <= 1:
            raise ValueError(f"gossip_decay must be in (0, 1], got {gossip_decay}")
        if max_known < 0:
            raise ValueError(f"max_known must be >= 0, got {max_known}")
        if not kappa > 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        if history_window < 1:
            raise ValueError(f"history_window must be >= 1, got {history_window}")
        self.gossip_decay = float(gossip_decay)
        self.max_known = int(max_known)
        self.kappa = float(kappa)
        #: direct neighbours' histories, kept locally
        self.histories: dict[PeerId, Tensor] = {}
        #: farther peers' histories heard by gossip: subject -> (history, hops)
        self.gossiped: dict[PeerId, tuple[Tensor, int]] = {}
        #: the weight of each sender in the round being mixed
        self.trust: dict[PeerId, float] = {}
        self.round_start: Tensor = params
        # signed mode (see the module docstring)
        self.signer = signer
        self.history_window = int(history_window)
        #: ``D``: the sum of the models this peer sent, rounds ``0..sent_upto``, and its record
        self.sent_sum: Tensor | None = None
        self.sent_upto = -1
        self.own_proof: bytes | None = None
        #: ``C``: the sum of this peer's round starts, rounds ``0..start_upto``
        self.start_sum: Tensor | None = None
        self.start_upto = -1
        self._recent_starts: dict[int, Tensor] = {}  # the last ``history_window`` of them
        #: neighbours' declared sums (relayed, never scored; gossiped ones are in ``gossiped``)
        self.declared: dict[PeerId, Tensor] = {}
        #: subject -> (round, record) of every declared sum held (declared or gossiped)
        self.proofs: dict[PeerId, tuple[int, bytes]] = {}

    # -- rounds -----------------------------------------------------------------------------
    def _start_round(self) -> list[Effect]:
        self.round_start = self.params
        if self.signer is not None:
            self._note_start(self.round, self.params)
        return super()._start_round()

    def _on_trained(self, event: TrainingDone) -> list[Effect]:
        if self.phase != "training" or event.ticket != self._next_ticket:
            return []
        if self.signer is not None:
            self._sign_sent(self.round, event.params)
        gossip = self._gossip()  # tagged with the round the models are sent in
        return gossip + super()._on_trained(event)

    def _finish_round(self, now: float, *, timed_out: bool) -> list[Effect]:
        received = self.inbox.get(self.round, {})
        senders = sorted(received)
        effects: list[Effect] = []
        if senders:
            start = self.round_start
            for peer in senders:
                update = (received[peer] - start).to(torch.float32)
                previous = self.histories.get(peer)
                # out of place: a history already gossiped must not change under the receiver
                self.histories[peer] = update if previous is None else previous + update
            scores = self._score(senders)
            self.trust = dict(zip(senders, scores.tolist(), strict=True))
            effects.append(Record("sybilwall.zero_weight", float((scores == 0).sum())))
        return effects + super()._finish_round(now, timed_out=timed_out)

    def _score(self, senders: list[PeerId]) -> Tensor:
        """SybilWall weights of ``senders``, scored against every history known."""
        others = sorted(p for p in self.histories if p not in set(senders))
        rows = [self.histories[p] for p in senders] + [self.histories[p] for p in others]
        rows += self._far_rows()
        return sybilwall_weights(
            torch.stack(rows), direct=list(range(len(senders))), kappa=self.kappa
        )

    def _mixing_weights(self, senders: list[PeerId]) -> Tensor:
        """Own model weight 1, each sender its score; normalised to sum to 1."""
        weights = torch.tensor(
            [1.0, *(self.trust.get(p, 0.0) for p in senders)], dtype=torch.float32
        )
        return weights / weights.sum()

    # -- history gossip ------------------------------------------------------------------
    def _known(self) -> list[tuple[PeerId, Tensor, int]]:
        direct = [(p, self.histories[p], 1) for p in sorted(self.histories)]
        far = [(p, h, hops) for p, (h, hops) in sorted(self.gossiped.items())]
        return direct + far

    def _gossip(self) -> list[Effect]:
        if self.max_known == 0:
            return []
        if self.signer is not None:
            return self._signed_gossip()
        known = self._known()
        effects: list[Effect] = []
        for peer in self._recipients():
            candidates = [k for k in known if k[0] != peer]
            if not candidates:
                continue
            weights = [self.gossip_decay**hops for _, _, hops in candidates]
            subject, history, hops = self.rng.choices(candidates, weights=weights)[0]
            meta = {"subject": subject, "hops": hops}
            effects.append(Send(peer, Message(HISTORY, self.round, history, meta)))
        return effects

    def _on_history(self, event: MessageReceived) -> list[Effect]:
        message = event.message
        subject, hops = message.meta.get("subject"), message.meta.get("hops")
        history = message.params
        if not (
            event.sender in self.weights
            and isinstance(subject, str)
            and isinstance(hops, int)
            and not isinstance(hops, bool)
            and hops >= 1
            and history is not None
            and history.shape == self.params.shape
        ):
            return [Record("sybilwall.bad_history", 1.0)]
        if subject == self.peer_id or subject in self.weights or self.max_known == 0:
            return []  # our own neighbours' histories we keep ourselves
        self.gossiped.pop(subject, None)  # re-inserted last: the freshest
        self.gossiped[subject] = (history, hops + 1)
        while len(self.gossiped) > self.max_known:
            farthest = max(self.gossiped.values(), key=lambda entry: entry[1])[1]
            victim = next(p for p, (_, h) in self.gossiped.items() if h == farthest)
            del self.gossiped[victim]
        return []

    # -- signed histories ----------------------------------------------------------------
    def _note_start(self, round_: int, start: Tensor) -> None:
        """Count this round's start in ``C`` (and skipped rounds in ``C`` and ``D``)."""
        if round_ <= self.start_upto:
            return  # a round started again (resume): counted already
        start = start.to(torch.float32)
        skipped = round_ - 1 - self.sent_upto  # rounds no model went out for (jumps)
        if skipped > 0:
            filler = start * skipped if skipped > 1 else start
            self.sent_sum = filler if self.sent_sum is None else self.sent_sum + filler
            self.sent_upto = round_ - 1
        count = round_ - self.start_upto
        added = start * count if count > 1 else start
        self.start_sum = added if self.start_sum is None else self.start_sum + added
        for t in range(max(self.start_upto + 1, round_ - self.history_window + 1), round_ + 1):
            self._recent_starts[t] = start
        self.start_upto = round_
        while len(self._recent_starts) > self.history_window:
            del self._recent_starts[min(self._recent_starts)]

    def _sign_sent(self, round_: int, sent: Tensor) -> None:
        if round_ <= self.sent_upto:
            return
        sent = sent.to(torch.float32)
        # out of place: a sum already gossiped must not change under the receiver
        self.sent_sum = sent if self.sent_sum is None else self.sent_sum + sent
        self.sent_upto = round_
        assert self.signer is not None
        self.own_proof = self.signer.sign(history_record(self.sent_sum, round_))

    def _starts_until(self) -> dict[int, Tensor]:
        """``C(r)`` for every round ``r`` it can be had for (the window, and one before)."""
        if self.start_sum is None:
            return {}
        sums = {self.start_upto: self.start_sum}
        total = self.start_sum
        for t in sorted(self._recent_starts, reverse=True):
            total = total - self._recent_starts[t]
            sums[t - 1] = total
        return sums

    def _far_rows(self) -> list[Tensor]:
        """Rows of the gossiped histories, as this peer would have observed them."""
        if self.signer is None:
            return [history for history, _ in self.gossiped.values()]
        starts = self._starts_until()
        rows = []
        for subject, (declared, _) in self.gossiped.items():
            base = starts.get(self.proofs[subject][0])
            if base is not None:  # else too old (or ahead of us) to align: not scored
                rows.append(declared - base)
        return rows

    def _history_message(self, subject: PeerId) -> Message:
        """The declared sum of ``subject`` as this peer relays it (signed mode)."""
        if subject == self.peer_id:
            history, hops, round_, proof = self.sent_sum, 0, self.sent_upto, self.own_proof
        else:
            round_, proof = self.proofs[subject]
            if subject in self.declared:
                history, hops = self.declared[subject], 1
            else:
                history, hops = self.gossiped[subject]
        meta = {"subject": subject, "hops": hops, "hr": round_, "proof": proof}
        return Message(HISTORY, self.round, history, meta)

    def _signed_gossip(self) -> list[Effect]:
        known: list[tuple[PeerId, int]] = []
        if self.own_proof is not None:
            known.append((self.peer_id, 0))
        known += [(p, 1) for p in sorted(self.declared)]
        known += [(p, hops) for p, (_, hops) in sorted(self.gossiped.items())]
        effects: list[Effect] = []
        for peer in self._recipients():
            candidates = [k for k in known if k[0] != peer]
            if not candidates:
                continue
            weights = [self.gossip_decay**hops for _, hops in candidates]
            subject, _ = self.rng.choices(candidates, weights=weights)[0]
            effects.append(Send(peer, self._history_message(subject)))
        return effects

    def _on_signed_history(self, event: MessageReceived) -> list[Effect]:
        message = event.message
        meta = message.meta
        subject, hops, claimed, proof = (meta.get(k) for k in ("subject", "hops", "hr", "proof"))
        history = message.params
        if not (
            event.sender in self.weights
            and isinstance(subject, str)
            and isinstance(hops, int)
            and _count(hops)
            and isinstance(claimed, int)
            and _count(claimed)
            and isinstance(proof, bytes)
            and history is not None
            and history.shape == self.params.shape
        ):
            return [Record("sybilwall.bad_history", 1.0)]
        assert self.signer is not None
        direct = subject in self.weights
        if subject == self.peer_id or (self.max_known == 0 and not direct):
            return []
        held = self.proofs.get(subject)
        if held is not None and claimed <= held[0]:
            return [Record("sybilwall.stale_history", 1.0)]  # not newer: nothing verified
        opened = self.signer.verify(proof)
        if (
            opened is None
            or opened[0] != subject
            or opened[1].get("r") != claimed
            or opened[1] != history_record(history, claimed)
        ):
            return [Record("sybilwall.bad_history", 1.0)]
        history = history.to(torch.float32)
        self.proofs[subject] = (claimed, proof)
        if direct:
            self.declared[subject] = history
        else:
            self._keep_gossiped(subject, history, hops + 1)
        return []

    def _keep_gossiped(self, subject: PeerId, history: Tensor, hops: int) -> None:
        self.gossiped.pop(subject, None)  # re-inserted last: the freshest
        self.gossiped[subject] = (history, hops)
        while len(self.gossiped) > self.max_known:
            farthest = max(self.gossiped.values(), key=lambda entry: entry[1])[1]
            victim = next(p for p, (_, h) in self.gossiped.items() if h == farthest)
            del self.gossiped[victim]
            self.proofs.pop(victim, None)

    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, MessageReceived) and event.message.kind == HISTORY:
            if self.signer is not None:
                return self._on_signed_history(event)
            return self._on_history(event)
        return super().handle(event)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["histories"] = {p: h.clone() for p, h in self.histories.items()}
        state["gossiped"] = {p: [h.clone(), hops] for p, (h, hops) in self.gossiped.items()}
        # signed mode's sums and records (empty when unsigned); the window of recent starts
        # is not kept: after a restore, declarations align again once it has refilled
        sent, starts = self.sent_sum, self.start_sum
        state["sent"] = None if sent is None else [sent.clone(), self.sent_upto, self.own_proof]
        state["starts"] = None if starts is None else [starts.clone(), self.start_upto]
        state["declared"] = {p: h.clone() for p, h in self.declared.items()}
        state["proofs"] = {p: [r, proof] for p, (r, proof) in self.proofs.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.histories = {p: h.clone() for p, h in state.get("histories", {}).items()}
        self.gossiped = {
            p: (h.clone(), int(hops)) for p, (h, hops) in state.get("gossiped", {}).items()
        }
        self.round_start = self.params
        sent, starts = state.get("sent"), state.get("starts")
        self.sent_sum, self.sent_upto, self.own_proof = None, -1, None
        if sent is not None:
            self.sent_sum, self.sent_upto, self.own_proof = sent[0].clone(), int(sent[1]), sent[2]
        self.start_sum, self.start_upto = None, -1
        if starts is not None:
            self.start_sum, self.start_upto = starts[0].clone(), int(starts[1])
        self._recent_starts = {}
        self.declared = {p: h.clone() for p, h in state.get("declared", {}).items()}
        self.proofs = {p: (int(r), bytes(proof)) for p, (r, proof) in state.get("proofs", {}).items()}
