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

**Gossip is round-synchronous**, so that a round's result does not depend on the order in
which messages arrive -- which differs between the simulator and real nodes, and between
two runs of real nodes. What a peer knows changes only when one of its rounds ends:

- round ``r``'s gossip (tagged ``r``, sent with the round's models) is built from what the
  peer knew when round ``r - 1`` ended (and, signed, its own declaration of round ``r``,
  which it alone computes);
- a received history is kept by its round tag, as models are kept in the inbox, and is
  applied only when that round ends, all senders' in the order of their ids, just before
  the scoring. A neighbour has one history per round: the first that passes the form
  checks takes its slot, whatever becomes of it (a second one is dropped and counted,
  ``sybilwall.extra_history``, before anything is verified); tags
  older than the current round are dropped (``sybilwall.late_history``), as are tags more
  than ``max_lead`` rounds ahead: what is held stays within ``neighbours x (max_lead + 1)``
  messages whatever a hostile neighbour sends;
- a model sent to a neighbour that also got a history this round says so (meta ``"hist":
  1``), and the receiver does not end the round on models alone while such a history is
  still missing (transports may reorder the two; the round timer still bounds the wait,
  and a neighbour that announces one and withholds it delays no more than by withholding
  its model);
- which history goes to which neighbour is drawn from the protocol's random stream, one
  draw per recipient in the order of ``_recipients()``, over the candidates in a fixed
  order (own, direct ones by id, far ones by id): the same draws wherever the stream is
  seeded the same. (A deterministic weighted round-robin would need no stream, but
  measured worse: peers that choose in lockstep spread far histories less, and signed
  SybilWall left a Sybil trusted after 12 rounds in 11 of 16 seeds against 5 of 16.)

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
  anything else is dropped and counted (``sybilwall.bad_history``). Both happen on
  arrival (so each neighbour costs at most one verification per round); a verified
  declaration waits for the end of its round like any history, and is checked for
  staleness once more when applied (another neighbour's, applied first, may be newer).
  Neighbours' declarations are only relayed (``declared``): direct neighbours are still
  scored by the histories the peer observed itself.

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
#: meta key of a model message: ``1`` when a history went to the same peer this round
ANNOUNCED = "hist"


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


#: a received history waiting for the end of its round: ``(subject, hops as received,
#: tensor, signed round, signed record)`` (the last two ``-1`` / ``None`` when unsigned)
Gossip = tuple[PeerId, int, Tensor, int, bytes | None]


class SybilWall(DPSGD):
    """D-PSGD whose neighbours are weighted by how unlike each other their histories are."""

    name = "sybilwall"
    #: models as in D-PSGD (with ``hist`` when a history came with them); histories (sums
    #: over rounds) about a ``subject`` from a neighbour, signed by the subject when
    #: relayed data is signed (``hr``, ``proof``)
    messages: ClassVar[Mapping[str, MessageSpec]] = {
        MODEL: MessageSpec(sender=Role.NEIGHBOUR, tensor=True, fields={ANNOUNCED: Int(lo=1, hi=1)}),
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
        #: round -> sender -> its history of that round, applied when the round ends
        #: (``None``: it came, and there is nothing to apply -- the sender's slot is used)
        self.pending: dict[int, dict[PeerId, Gossip | None]] = {}
        #: round -> neighbours whose model said a history came with it
        self.announced: dict[int, set[PeerId]] = {}
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
        # histories of rounds gone by (ended, or jumped over) will never be applied
        for stale in [r for r in self.pending if r < self.round]:
            del self.pending[stale]
        for stale in [r for r in self.announced if r < self.round]:
            del self.announced[stale]
        return super()._start_round()

    def _on_trained(self, event: TrainingDone) -> list[Effect]:
        """Send the round's gossip, then the models, flagged where a history went too.

        The gossip is built before the models go out: the base class may end the round
        right away (every neighbour's model already here), which changes what is known.
        """
        if self.phase != "training" or event.ticket != self._next_ticket:
            return []
        if self.signer is not None:
            self._sign_sent(self.round, event.params)
        gossip = self._gossip()  # tagged with the round the models are sent in
        effects = super()._on_trained(event)
        told = {effect.to for effect in gossip if isinstance(effect, Send)}
        flagged: Message | None = None
        for i, effect in enumerate(effects):
            if type(effect) is Send and effect.message.kind == MODEL and effect.to in told:
                if flagged is None:  # one object for all of them, as the base sends
                    model = effect.message
                    flagged = Message(
                        MODEL, model.round, model.params, {**model.meta, ANNOUNCED: 1}
                    )
                effects[i] = Send(effect.to, flagged)
        return gossip + effects

    def _maybe_finish(self, now: float) -> list[Effect]:
        """As the base, but not before every history announced with a model is here."""
        if self.phase == "collecting":
            announced = self.announced.get(self.round)
            if announced and not announced <= self.pending.get(self.round, {}).keys():
                return []
        return super()._maybe_finish(now)

    def _finish_round(self, now: float, *, timed_out: bool) -> list[Effect]:
        effects = self._apply_gossip(self.pending.pop(self.round, {}))
        received = self.inbox.get(self.round, {})
        senders = sorted(received)
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
    def _gossip(self) -> list[Effect]:
        """One history per recipient (none it is the subject of), as this peer knows them."""
        if self.max_known == 0:
            return []
        known: list[tuple[PeerId, int]] = []
        if self.signer is not None and self.own_proof is not None:
            known.append((self.peer_id, 0))
        direct = self.declared if self.signer is not None else self.histories
        known += [(p, 1) for p in sorted(direct)]
        known += [(p, hops) for p, (_, hops) in sorted(self.gossiped.items())]
        effects: list[Effect] = []
        for peer in self._recipients():
            candidates = [k for k in known if k[0] != peer]
            if candidates:
                weights = [self.gossip_decay**hops for _, hops in candidates]
                subject, _ = self.rng.choices(candidates, weights=weights)[0]
                effects.append(Send(peer, self._history_message(subject)))
        return effects

    def _history_message(self, subject: PeerId) -> Message:
        """The history of ``subject`` as this peer relays it (a declared sum when signed)."""
        if self.signer is None:
            if subject in self.histories:
                history, hops = self.histories[subject], 1
            else:
                history, hops = self.gossiped[subject]
            return Message(HISTORY, self.round, history, {"subject": subject, "hops": hops})
        if subject == self.peer_id:
            assert self.sent_sum is not None
            history, hops, round_, proof = self.sent_sum, 0, self.sent_upto, self.own_proof
        else:
            round_, proof = self.proofs[subject]
            if subject in self.declared:
                history, hops = self.declared[subject], 1
            else:
                history, hops = self.gossiped[subject]
        meta = {"subject": subject, "hops": hops, "hr": round_, "proof": proof}
        return Message(HISTORY, self.round, history, meta)

    def _on_history(self, event: MessageReceived) -> list[Effect]:
        """Keep a neighbour's history of a current round until that round ends."""
        message, sender = event.message, event.sender
        meta = message.meta
        subject, hops = meta.get("subject"), meta.get("hops")
        history = message.params
        if not (
            sender in self.weights
            and isinstance(subject, str)
            and isinstance(hops, int)
            and _count(hops)
            and (self.signer is not None or hops >= 1)
            and history is not None
            and history.shape == self.params.shape
        ):
            return [Record("sybilwall.bad_history", 1.0)]
        round_ = message.round
        if round_ < self.round:
            return [Record("sybilwall.late_history", 1.0)]
        if round_ > self.round + self.max_lead:
            return [Record("dropped.future_round", 1.0)]
        heard = self.pending.setdefault(round_, {})
        if sender in heard:
            return [Record("sybilwall.extra_history", 1.0)]
        effects: list[Effect] = []
        if subject == self.peer_id or (subject in self.weights and self.signer is None):
            heard[sender] = None  # our own neighbours' histories we keep ourselves
        elif self.signer is not None:
            heard[sender], effects = self._screen_signed(message, subject, hops)
        elif self.max_known == 0:
            heard[sender] = None
        else:
            heard[sender] = (subject, hops, history, -1, None)
        if round_ == self.round:
            effects += self._maybe_finish(event.now)
        return effects

    def _apply_gossip(self, heard: dict[PeerId, Gossip | None]) -> list[Effect]:
        """Take a round's histories in, senders in order: the same result however they came."""
        effects: list[Effect] = []
        for sender in sorted(heard):
            entry = heard[sender]
            if entry is None:
                continue
            subject, hops, history, claimed, proof = entry
            if proof is None:
                self._keep_gossiped(subject, history, hops + 1)
                continue
            held = self.proofs.get(subject)
            if held is not None and claimed <= held[0]:  # a newer one came first
                effects.append(Record("sybilwall.stale_history", 1.0))
                continue
            self.proofs[subject] = (claimed, proof)
            if subject in self.weights:
                self.declared[subject] = history
            else:
                self._keep_gossiped(subject, history, hops + 1)
        return effects

    def _keep_gossiped(self, subject: PeerId, history: Tensor, hops: int) -> None:
        self.gossiped.pop(subject, None)  # re-inserted last: the freshest
        self.gossiped[subject] = (history, hops)
        while len(self.gossiped) > self.max_known:
            farthest = max(self.gossiped.values(), key=lambda entry: entry[1])[1]
            victim = next(p for p, (_, h) in self.gossiped.items() if h == farthest)
            del self.gossiped[victim]
            self.proofs.pop(victim, None)

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

    def _screen_signed(
        self, message: Message, subject: PeerId, hops: int
    ) -> tuple[Gossip | None, list[Effect]]:
        """A relayed declaration that is newer than the one held and verifies, or nothing.

        Checked on arrival (the staleness test first: it costs no verification), checked
        for staleness again when its round ends (see :meth:`_apply_gossip`).
        """
        claimed, proof = message.meta.get("hr"), message.meta.get("proof")
        history = message.params
        if not (_count(claimed) and isinstance(proof, bytes) and history is not None):
            return None, [Record("sybilwall.bad_history", 1.0)]
        assert self.signer is not None and isinstance(claimed, int)
        if self.max_known == 0 and subject not in self.weights:
            return None, []
        held = self.proofs.get(subject)
        if held is not None and claimed <= held[0]:
            return None, [Record("sybilwall.stale_history", 1.0)]  # not newer: nothing verified
        opened = self.signer.verify(proof)
        if (
            opened is None
            or opened[0] != subject
            or opened[1].get("r") != claimed
            or opened[1] != history_record(history, claimed)
        ):
            return None, [Record("sybilwall.bad_history", 1.0)]
        return (subject, hops, history.to(torch.float32), claimed, proof), []

    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, MessageReceived):
            message = event.message
            if message.kind == HISTORY:
                return self._on_history(event)
            if (
                message.kind == MODEL
                and type(message.meta) is dict
                and message.meta.get(ANNOUNCED) == 1
                and event.sender in self.weights
                and self.round <= message.round <= self.round + self.max_lead
            ):
                self.announced.setdefault(message.round, set()).add(event.sender)
        return super().handle(event)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["histories"] = {p: h.clone() for p, h in self.histories.items()}
        state["gossiped"] = {p: [h.clone(), hops] for p, (h, hops) in self.gossiped.items()}
        # signed mode's sums and records (empty when unsigned); the window of recent starts
        # is not kept: after a restore, declarations align again once it has refilled.
        # Histories waiting for their round are not kept either: a round restarts on resume.
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
        self.pending, self.announced = {}, {}
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
        self.proofs = {
            p: (int(r), bytes(proof)) for p, (r, proof) in state.get("proofs", {}).items()
        }
