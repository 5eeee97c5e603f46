"""MoDeST's signed membership: view entries proven by their subjects' records.

Signed view entries (``signer``, issue 8). Views are relayed: what a peer says about a
third one reached it through others. Unsigned (the default, and the simulator's), any
relayer can rewrite any entry -- mark an honest peer as left, or bump its round. With a
:class:`~p2pfl.protocols.records.RecordSigner` every entry about a peer ``P`` travels
with ``P``'s own signature:

- ``P`` signs its own entry (a record ``{"k": "modest.entry", "r", "l", "c"}``) whenever
  it changes it (activity at a round, leave, rejoin); the signature is made lazily, when
  the entry next goes out;
- on the wire an entry is ``[round, left, counter, record]``; peers store the record with
  the entry and relay it verbatim;
- a receiver first compares the *claim* (the three numbers) with what it knows, and only
  verifies records that would change its view: the record must verify, its origin must be
  the peer the entry is about, and its content must be the claim. So a message costs one
  comparison per entry and one verification per *new* entry, not one per entry. Entries
  that fail are dropped and counted (``Record("modest.bad_entry", n)``); after
  ``MAX_BAD_ENTRIES`` failures in one message, its remaining new entries are dropped
  unverified (a forger cannot buy one verification per entry);
- entries about ``P`` are ordered by ``(counter, left, round)`` and the newest record
  wins whole (honest entries grow in both round and counter, so this agrees with the
  unsigned max-merge); a replayed older record is simply not newer and changes nothing,
  and an old record cannot be passed off as newer since the claim must match it;
- every peer signs its own entry, the bottom ``[0, 0, 0]`` too; the one unsigned entry
  taken is a bottom entry about the sender itself (its connection proves who it is): an
  unsigned bottom entry about anyone else is refused and counted
  (``modest.entries_refused``), or made-up names would inflate the view. Entries about
  members a peer knows already cost nothing (not newer: not checked), so the initial
  population (the driver's configuration, which nobody signed) still travels as bare
  ``[0, 0, 0]`` between peers that have it;
- a sender's activity comes from its own signed entry in the view it sends (it raised
  its round before sending), not from ``touch(sender, round)``, which would be an
  unsigned claim.

What signing does not cover: ``P`` can still lie about itself (e.g. claim a round it did
not take part in), and a relayer can withhold entries (a view is a set of independent
records, not one signed whole); both only delay, views still converge through others.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from p2pfl.protocols.base import PeerId
from p2pfl.protocols.modest.membership import MAX_NEW_MEMBERS, MEMBER_BUDGET, Membership
from p2pfl.protocols.modest.view import ViewEntry

if TYPE_CHECKING:
    from p2pfl.protocols.records import RecordSigner

#: the ``"k"`` of a signed view entry record
ENTRY_RECORD = "modest.entry"
#: after this many forged entries in one message, its other new entries are refused
#: unverified: a forger cannot make a peer spend a verification on each of 60k entries
MAX_BAD_ENTRIES = 16
_BOTTOM = ViewEntry()

#: a view entry and the signed record that proves it (signed mode)
Proven = tuple[ViewEntry, bytes]
#: what admission makes of a signed entry: the entry and its record (``None`` for the
#: sender's own unsigned bottom entry), or why it was not taken
Admitted = Proven | tuple[ViewEntry, None] | Literal["stale", "bad", "unproven"]


def entry_record(entry: ViewEntry) -> dict[str, Any]:
    """What a peer signs about itself: its own view entry."""
    return {"k": ENTRY_RECORD, "r": entry.round, "l": int(entry.left), "c": entry.counter}


def _rank(entry: ViewEntry) -> tuple[int, bool, int]:
    """The order of signed entries about one peer: newer status first, then newer round."""
    return (entry.counter, entry.left, entry.round)


def _claim_part(raw: Any) -> Any:
    """The ``[round, left, counter]`` of a signed entry's wire form (``None`` if malformed)."""
    if isinstance(raw, list | tuple) and len(raw) in (3, 4):
        return raw[:3]
    return None


def _proofs_to_state(proofs: dict[PeerId, Proven]) -> dict[PeerId, list[Any]]:
    return {p: [*e.to_wire(), b] for p, (e, b) in proofs.items()}


def _proofs_from_state(value: Any) -> dict[PeerId, Proven]:
    proofs: dict[PeerId, Proven] = {}
    for peer, raw in (value or {}).items():
        entry = ViewEntry.from_wire(_claim_part(raw))
        if entry is not None and len(raw) == 4 and isinstance(raw[3], bytes):
            proofs[str(peer)] = (entry, raw[3])
    return proofs


class SignedMembership(Membership):
    """Entries proven by their subjects' records (see the module docstring): the newest proven record about a peer wins whole; records are
    verified only when they would change the view, at most ``MAX_BAD_ENTRIES`` failures
    per message."""

    def __init__(
        self,
        me: PeerId,
        members: Iterable[PeerId],
        signer: RecordSigner,
        *,
        max_new_members: int = MAX_NEW_MEMBERS,
        member_budget: int = MEMBER_BUDGET,
    ) -> None:
        super().__init__(me, members, max_new_members=max_new_members, member_budget=member_budget)
        self.signer = signer
        #: the records proving view entries and pending joins
        self.proofs: dict[PeerId, Proven] = {}
        self.join_proofs: dict[PeerId, Proven] = {}

    # -- what goes out -----------------------------------------------------------------
    def view_wire(self) -> dict[str, Any]:
        proofs = self.proofs
        return {p: self._entry_wire(p, e, proofs) for p, e in self.view.items()}

    def own_wire(self) -> Any:
        return self._entry_wire(self.me, self.view[self.me], self.proofs)

    def joins_wire(self) -> dict[str, Any]:
        proofs = self.join_proofs
        return {p: self._entry_wire(p, e, proofs) for p, e in self.pending_joins.items()}

    def _entry_wire(self, peer: PeerId, entry: ViewEntry, proofs: dict[PeerId, Proven]) -> Any:
        """``[round, left, counter, record]``; ``[0, 0, 0]`` for an entry nobody proved.

        This peer's own entry is (re-)signed here when it changed since it was last signed.
        """
        held = proofs.get(peer)
        if held is None or held[0] != entry:
            if peer != self.me:
                # never relay a claim we cannot prove; an unproven bottom entry is taken
                # only by peers that know the member already (or from the member itself)
                return [0, 0, 0]
            held = (entry, self.signer.sign(entry_record(entry)))
            proofs[peer] = held
        return [entry.round, int(entry.left), entry.counter, held[1]]

    # -- what comes in -----------------------------------------------------------------
    def merge_joins(self, sender: PeerId, raw: Any) -> None:
        if isinstance(raw, dict):
            for peer, raw_entry in raw.items():
                if peer != self.me and self._may_grow(sender, peer):
                    self._admit_join(peer, raw_entry, sender)

    def take_join(self, sender: PeerId, raw: Any) -> bool:
        return self._admit_join(sender, raw, sender)

    def _entries(self, raw: Any) -> Iterable[tuple[Any, Any]] | None:
        return raw.items() if isinstance(raw, dict) else None

    def _take(self, sender: PeerId, peer: Any, raw: Any, solicited: bool) -> ViewEntry | None:
        if not self._may_grow(sender, peer, solicited=solicited):
            return None
        admitted = self._admit(peer, raw, sender, self.view.get(peer))
        if isinstance(admitted, str):
            return None
        if peer != self.me:  # our own record, newer than our entry (lost state): see below
            self._set_proven(peer, admitted)
        return admitted[0]

    def _own_seen(self, own: ViewEntry, theirs: ViewEntry) -> None:
        # only the round is newer: catch up with what we signed before
        self.view.set(self.me, ViewEntry(theirs.round, own.left, own.counter))

    def _leave(self, sender: PeerId, raw: Any) -> bool:
        entry = ViewEntry.from_wire(_claim_part(raw))
        if entry is None or not entry.left:
            return False
        admitted = self._admit(sender, raw, sender, self.view.get(sender))
        if admitted == "bad" or admitted == "unproven":
            return False
        if not isinstance(admitted, str):
            self._set_proven(sender, admitted)
        return True

    def _apply_joins(self) -> None:
        for peer, entry in self.pending_joins.items():
            known = self.view.get(peer)
            if known is None or _rank(entry) > _rank(known):
                held = self.join_proofs.get(peer)
                self._set_proven(peer, (entry, None if held is None else held[1]))
        self.join_proofs.clear()

    def _known(self, known: ViewEntry, pending: ViewEntry) -> bool:
        return _rank(pending) <= _rank(known)

    def _forget_join(self, peer: PeerId) -> None:
        self.join_proofs.pop(peer, None)

    # -- admission ---------------------------------------------------------------------
    def _admit(self, peer: Any, raw: Any, sender: PeerId, *known: ViewEntry | None) -> Admitted:
        """Check an entry about ``peer``, relayed by ``sender``, against the ``known``
        entries about it.

        ``"stale"`` when it is not newer than every known one (nothing verified: the
        common case), ``"bad"`` (counted) when it is malformed or its record does not
        prove it, ``"unproven"`` (counted as refused) for an unsigned bottom entry about
        a peer other than the sender: a fresh name nobody proved would let any relayer
        inflate the view. Else the entry and its record (``None`` for the sender's own
        unsigned bottom entry: its connection proves who it is).
        """
        claim = ViewEntry.from_wire(_claim_part(raw))
        if claim is None or not isinstance(peer, str) or not peer:
            self._bad += 1
            return "bad"
        rank = _rank(claim)
        if any(k is not None and rank <= _rank(k) for k in known):
            return "stale"
        if claim == _BOTTOM and len(raw) == 3:
            if peer == sender:
                return claim, None  # membership only, of the peer we hear it from
            self._refused += 1
            return "unproven"
        if self._bad >= MAX_BAD_ENTRIES:
            self._bad += 1
            return "bad"
        proof = raw[3] if len(raw) == 4 else None
        opened = self.signer.verify(proof)
        if opened is None or opened[0] != peer or opened[1] != entry_record(claim):
            self._bad += 1
            return "bad"
        return claim, proof

    def _set_proven(self, peer: PeerId, admitted: tuple[ViewEntry, bytes | None]) -> None:
        entry, proof = admitted
        self.view.set(peer, entry)
        if proof is None:
            self.proofs.pop(peer, None)
        else:
            self.proofs[peer] = (entry, proof)

    def _admit_join(self, peer: Any, raw: Any, sender: PeerId) -> bool:
        """Hold a proven join of ``peer`` back until the next send; ``False`` if refused."""
        claim = ViewEntry.from_wire(_claim_part(raw))
        if claim is None or claim.left:
            return False
        known = (self.view.get(peer), self.pending_joins.get(peer))
        admitted = self._admit(peer, raw, sender, *known)
        if admitted == "bad" or admitted == "unproven":
            return False
        if not isinstance(admitted, str):
            entry, proof = admitted
            self.pending_joins[peer] = entry
            if proof is None:
                self.join_proofs.pop(peer, None)
            else:
                self.join_proofs[peer] = (entry, proof)
        return True

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["proofs"] = _proofs_to_state(self.proofs)
        state["join_proofs"] = _proofs_to_state(self.join_proofs)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.proofs = _proofs_from_state(state.get("proofs"))
        self.join_proofs = _proofs_from_state(state.get("join_proofs"))
