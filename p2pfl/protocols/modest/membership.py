"""MoDeST's membership: who takes part, as one peer knows it, and what it takes from others.

The round logic (``protocol.py``) samples from a population view; this module owns that
view and everything that changes it: the pending joins (held back until the next model
send), the merge of received views and joins, leaves, the growth caps that keep a sender
from flooding the view, and the peer's own entry. It produces no effects: it answers the
round logic's questions and tells it, through :class:`Merged`, when a received view says
this peer left (the round logic then announces a rejoin).

Two implementations of one interface, chosen once, when the protocol is built:
:class:`PlainMembership` (no signer) merges bare entries field by field with
:meth:`ViewEntry.merge`; :class:`~p2pfl.protocols.modest.signed.SignedMembership` takes
only entries proven by their subject's record (``signed.py``). Both share :meth:`Membership.merge_view` (one walk over the received
entries; what an entry must prove to be taken is each implementation's ``_take``) and the
growth caps (``max_new_members`` per message, ``member_budget`` per sender; see "A hostile
peer" in ``protocol.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from enum import Enum
from typing import Any

from p2pfl.protocols.base import PeerId
from p2pfl.protocols.modest.view import PopulationView, ViewEntry

#: new members one message may add to the view (or to the pending joins)
MAX_NEW_MEMBERS = 4
#: new members one sender may add in all (besides itself): honest joiners announce
#: themselves, and the answers to this peer's own join are not limited by it
MEMBER_BUDGET = 8


class Merged(Enum):
    """What merging a received view did, as far as the round logic cares."""

    #: no view to merge (signed mode: the field was not a map); nothing changed
    IGNORED = "ignored"
    MERGED = "merged"
    #: the sender holds a newer leave of this peer (an old leave, a lost checkpoint):
    #: this peer's entry was bumped to a rejoin, which the round logic must announce
    DISOWNED = "disowned"


class Membership(ABC):
    """One peer's population view and pending joins, and the rules for changing them.

    Counters of the message being handled (entries refused by the growth caps, forged
    entries) accumulate until the round logic collects them with :meth:`take_counts`.
    """

    def __init__(
        self,
        me: PeerId,
        members: Iterable[PeerId],
        *,
        max_new_members: int = MAX_NEW_MEMBERS,
        member_budget: int = MEMBER_BUDGET,
    ) -> None:
        self.me = me
        self.view = PopulationView.of(sorted(set(members) | {me}))
        #: joins announced to this peer, applied to the view after its next model send
        #: (so they do not reorder the sample a round is in the middle of using)
        self.pending_joins: dict[PeerId, ViewEntry] = {}
        self.max_new_members = max_new_members
        self.member_budget = member_budget
        self._growth: dict[PeerId, int] = {}  # new members taken from each sender
        self._message_growth = 0  # new members taken from the message being handled
        self._refused = 0  # entries refused in the message being handled
        self._bad = 0  # forged or malformed signed entries in the message being handled

    # -- per message -------------------------------------------------------------------
    def begin_message(self) -> None:
        """A new message arrives: its own ``max_new_members`` cap starts afresh."""
        self._message_growth = 0

    def take_counts(self) -> tuple[int, int]:
        """``(bad, refused)`` entries seen since the last call, and reset them."""
        counts = (self._bad, self._refused)
        self._bad = self._refused = 0
        return counts

    # -- what goes out -----------------------------------------------------------------
    @abstractmethod
    def view_wire(self) -> dict[str, Any]:
        """The view as sent with a model, a view answer."""

    @abstractmethod
    def own_wire(self) -> Any:
        """This peer's own entry as sent in a join or leave announcement."""

    @abstractmethod
    def joins_wire(self) -> dict[str, Any]:
        """The pending joins as sent with the next model."""

    # -- what comes in -----------------------------------------------------------------
    def merge_view(self, sender: PeerId, raw: Any, *, solicited: bool = False) -> Merged:
        """Take what the implementation accepts of a view received from ``sender``.

        ``solicited``: the view answers this peer's own join announcement, so the growth
        caps do not apply (the joiner chose whom to ask).
        """
        entries = self._entries(raw)
        if entries is None:
            return Merged.IGNORED
        own = self.view[self.me]
        theirs: ViewEntry | None = None
        for peer, raw_entry in entries:
            entry = self._take(sender, peer, raw_entry, solicited)
            if entry is not None and peer == self.me:
                theirs = entry
        if theirs is None:
            return Merged.MERGED
        if (theirs.counter, theirs.left) > (own.counter, own.left):
            # others think we left (an old leave, or a lost checkpoint): we are here
            rejoined = ViewEntry(max(own.round, theirs.round), False, theirs.counter + 1)
            self.view.set(self.me, rejoined)
            return Merged.DISOWNED
        self._own_seen(own, theirs)
        return Merged.MERGED

    def note_activity(self, sender: PeerId, round_: int) -> None:  # noqa: B027
        """``sender`` sent a model of ``round_``: whether that raises its entry is the
        implementation's call (an unsigned claim is taken; a signed view carries it)."""

    @abstractmethod
    def merge_joins(self, sender: PeerId, raw: Any) -> None:
        """Hold back the joins a model message from ``sender`` relays."""

    @abstractmethod
    def take_join(self, sender: PeerId, raw: Any) -> bool:
        """``sender`` announces its own join; ``False`` if refused (not answered)."""

    def take_leave(self, sender: PeerId, raw: Any) -> bool:
        """``sender`` announces its leave (applied at once); ``False`` if refused."""
        if not self._leave(sender, raw):
            return False
        self.drop_known_joins()
        return True

    def apply_joins(self) -> None:
        """After a model send: the pending joins take effect (and travelled with it)."""
        if self.pending_joins:
            self._apply_joins()
            self.pending_joins.clear()

    def drop_known_joins(self) -> None:
        """Forget pending joins the view already holds (or holds newer)."""
        for peer, entry in list(self.pending_joins.items()):
            known = self.view.get(peer)
            if known is not None and self._known(known, entry):
                del self.pending_joins[peer]
                self._forget_join(peer)

    # -- this peer ---------------------------------------------------------------------
    def leave(self) -> Any:
        """Mark this peer as left (a new status of its own); its entry as announced."""
        own = self.view[self.me]
        self.view.set(self.me, ViewEntry(own.round, True, own.counter + 1))
        return self.own_wire()

    def withhold(self, absent: set[PeerId]) -> None:
        """Drop peers not there yet from the view (they will announce themselves)."""
        self.view = PopulationView({p: e for p, e in self.view.items() if p not in absent})

    # -- growth caps -------------------------------------------------------------------
    def _may_grow(self, sender: PeerId, peer: Any, *, solicited: bool = False) -> bool:
        """Whether an entry about ``peer`` from ``sender`` may be taken, as far as growth
        goes: known peers and the sender itself always; another new one within
        ``max_new_members`` per message and ``member_budget`` per sender in all, so no
        sender can flood the view (refusals are counted). A view that answers this peer's
        own join is bounded by the contract's ``max_view_entries`` only: the joiner chose
        whom to ask."""
        if peer in self.view or peer in self.pending_joins or peer == sender or solicited:
            return True
        used = self._growth.get(sender, 0)
        if self._message_growth >= self.max_new_members or used >= self.member_budget:
            self._refused += 1
            return False
        self._message_growth += 1
        self._growth[sender] = used + 1
        return True

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys ``view``, ``pending_joins``, ``proofs``, ``join_proofs``."""
        return {
            "view": self.view.to_wire(),
            "pending_joins": {p: e.to_wire() for p, e in self.pending_joins.items()},
            "proofs": {},
            "join_proofs": {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.view = PopulationView.from_wire(state["view"])
        self.pending_joins = dict(PopulationView.from_wire(state["pending_joins"]))
        self._growth.clear()

    # -- what the implementations decide -----------------------------------------------
    @abstractmethod
    def _entries(self, raw: Any) -> Iterable[tuple[Any, Any]] | None:
        """The ``(peer, raw entry)`` pairs of a received view; ``None``: nothing to merge."""

    @abstractmethod
    def _take(self, sender: PeerId, peer: Any, raw: Any, solicited: bool) -> ViewEntry | None:
        """Check one received entry and, unless it is about this peer, apply it; the entry
        when it was taken (or, about this peer, would be), else ``None``."""

    def _own_seen(self, own: ViewEntry, theirs: ViewEntry) -> None:  # noqa: B027
        """A received entry about this peer, not a newer status than ``own``."""

    @abstractmethod
    def _leave(self, sender: PeerId, raw: Any) -> bool:
        """Apply ``sender``'s leave entry; ``False`` if refused."""

    @abstractmethod
    def _apply_joins(self) -> None:
        """Move the pending joins into the view."""

    @abstractmethod
    def _known(self, known: ViewEntry, pending: ViewEntry) -> bool:
        """Whether ``known`` (in the view) already covers the ``pending`` join."""

    def _forget_join(self, peer: PeerId) -> None:  # noqa: B027
        """A pending join of ``peer`` was dropped."""


class PlainMembership(Membership):
    """Unsigned entries, merged field by field: any relayer can rewrite any entry; growth
    is bounded by the caps only."""

    def view_wire(self) -> dict[str, Any]:
        return self.view.to_wire()

    def own_wire(self) -> Any:
        return self.view[self.me].to_wire()

    def joins_wire(self) -> dict[str, Any]:
        return {p: e.to_wire() for p, e in self.pending_joins.items()}

    def note_activity(self, sender: PeerId, round_: int) -> None:
        self.view.touch(sender, round_)

    def merge_joins(self, sender: PeerId, raw: Any) -> None:
        for peer, entry in PopulationView.from_wire(raw).items():
            if peer != self.me and not entry.left and self._may_grow(sender, peer):
                self._hold_join(peer, entry)
        self.drop_known_joins()

    def take_join(self, sender: PeerId, raw: Any) -> bool:
        entry = ViewEntry.from_wire(raw)
        if entry is None or entry.left:
            return False
        known = self.view.get(sender)
        if known is None or known.merge(entry) != known:
            self._hold_join(sender, entry)
        return True

    def _entries(self, raw: Any) -> Iterable[tuple[Any, Any]]:
        # a missing view merges as an empty one: stale suspicions are dropped all the same
        return raw.items() if isinstance(raw, dict) else ()

    def _take(self, sender: PeerId, peer: Any, raw: Any, solicited: bool) -> ViewEntry | None:
        entry = ViewEntry.from_wire(raw)
        if entry is None or not isinstance(peer, str) or not peer:
            return None  # malformed entries are skipped silently
        if peer != self.me:
            if not self._may_grow(sender, peer, solicited=solicited):
                return None
            self.view.merge_entry(peer, entry)
        return entry

    def _leave(self, sender: PeerId, raw: Any) -> bool:
        entry = ViewEntry.from_wire(raw)
        if entry is None or not entry.left:
            return False
        self.view.merge_entry(sender, entry)
        return True

    def _apply_joins(self) -> None:
        self.view.merge(self.pending_joins)

    def _known(self, known: ViewEntry, pending: ViewEntry) -> bool:
        return known.merge(pending) == known

    def _hold_join(self, peer: PeerId, entry: ViewEntry) -> None:
        """Hold a join back, merged with one already pending."""
        pending = self.pending_joins.get(peer)
        self.pending_joins[peer] = entry if pending is None else pending.merge(entry)
