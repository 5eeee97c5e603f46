"""MoDeST's population view and the sample order derived from it.

Every peer keeps its own view of who takes part: ``peer -> (last active round, joined or
left, counter)``. Views travel with every model transfer and are merged, so they converge
without any coordinator. The merge is a join-semilattice (commutative, associative,
idempotent): two peers that have seen the same updates hold the same view whatever the
order they saw them in, which is what makes independently derived samples agree.

The sample order of a round is a pure function of the view and the round number: the
candidates sorted by SHA-256 of ``(round, peer id)``. SHA-256 and not Python's ``hash``,
which is salted per process and would give every peer a different order.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from p2pfl.protocols.base import PeerId

#: wire form of a view: ``{peer id: [last active round, left (0/1), counter]}`` (signed views
#: append the entry's record: ``[round, left, counter, record]``, see ``membership.py``)
WireView = dict[str, list[int]]

#: versions of views' membership, unique across all views of a process (see ``version``)
_VERSIONS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ViewEntry:
    """What a peer knows about one member of the population.

    ``counter`` counts the member's own join/leave changes; only the member itself bumps
    it, so the status with the higher counter is the newer one. ``round`` is the last
    round in which the member was seen taking part (0: never).
    """

    round: int = 0
    left: bool = False
    counter: int = 0

    def merge(self, other: ViewEntry) -> ViewEntry:
        """Least upper bound of two entries: max round; the status of the higher counter.

        On a counter tie (which only a misbehaving peer can cause) "left" wins, so the
        merge stays commutative.
        """
        status = max((self.counter, self.left), (other.counter, other.left))
        return ViewEntry(max(self.round, other.round), status[1], status[0])

    def to_wire(self) -> list[int]:
        return [self.round, int(self.left), self.counter]

    @classmethod
    def from_wire(cls, value: Any) -> ViewEntry | None:
        """Parse ``[round, left, counter]``; ``None`` when the value is malformed."""
        if not isinstance(value, list | tuple) or len(value) != 3:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            return None
        if value[1] not in (0, 1):
            return None
        return cls(value[0], bool(value[1]), value[2])


class PopulationView(Mapping[PeerId, ViewEntry]):
    """A mutable map ``peer -> ViewEntry`` that only ever grows along the merge order."""

    def __init__(self, entries: Mapping[PeerId, ViewEntry] | None = None) -> None:
        self._entries: dict[PeerId, ViewEntry] = dict(entries or {})
        #: changes whenever the set of members or a member's left flag changes (never on
        #: activity alone): whoever caches a sample order keys it on this
        self.version = next(_VERSIONS)

    @classmethod
    def of(cls, peers: Iterable[PeerId]) -> PopulationView:
        """The initial view of a population whose members all joined at round 0."""
        return cls({peer: ViewEntry() for peer in peers})

    # -- Mapping ---------------------------------------------------------------------
    def __getitem__(self, peer: PeerId) -> ViewEntry:
        return self._entries[peer]

    def __iter__(self) -> Iterator[PeerId]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"PopulationView({self._entries!r})"

    # -- updates ---------------------------------------------------------------------
    def merge_entry(self, peer: PeerId, entry: ViewEntry) -> bool:
        """Merge one entry in; return whether the view changed."""
        old = self._entries.get(peer)
        new = entry if old is None else old.merge(entry)
        if new == old:
            return False
        self._store(peer, old, new)
        return True

    def merge(self, other: Mapping[PeerId, ViewEntry]) -> list[PeerId]:
        """Merge a whole view in; return the peers whose entry changed."""
        return [peer for peer, entry in other.items() if self.merge_entry(peer, entry)]

    def set(self, peer: PeerId, entry: ViewEntry) -> None:
        """Overwrite an entry: a peer's own (it owns it), or one its owner signed.

        With signed entries (see ``membership.py``) a newer record replaces the older whole
        instead of being merged field by field.
        """
        self._store(peer, self._entries.get(peer), entry)

    def _store(self, peer: PeerId, old: ViewEntry | None, new: ViewEntry) -> None:
        if old is None or old.left != new.left:
            self.version = next(_VERSIONS)
        self._entries[peer] = new

    def touch(self, peer: PeerId, round: int) -> None:
        """Record that ``peer`` took part in ``round`` (raises its last active round)."""
        old = self._entries.get(peer)
        if old is not None and round > old.round:
            self._entries[peer] = ViewEntry(round, old.left, old.counter)

    def active(self) -> list[PeerId]:
        """Members not marked as left (the sample candidates), in no particular order."""
        return [peer for peer, entry in self._entries.items() if not entry.left]

    # -- wire ------------------------------------------------------------------------
    def to_wire(self) -> WireView:
        return {peer: entry.to_wire() for peer, entry in self._entries.items()}

    @classmethod
    def from_wire(cls, value: Any) -> PopulationView:
        """Parse a received view, silently skipping malformed entries."""
        view = cls()
        if isinstance(value, dict):
            for peer, raw in value.items():
                entry = ViewEntry.from_wire(raw)
                if isinstance(peer, str) and peer and entry is not None:
                    view._entries[peer] = entry
        view.version = next(_VERSIONS)
        return view


def sample_key(peer: PeerId, round: int) -> bytes:
    """The position of ``peer`` in the sample order of ``round`` (smaller comes first)."""
    return hashlib.sha256(f"{round}:{peer}".encode()).digest()


def derive_candidates(view: Mapping[PeerId, ViewEntry], round: int) -> list[PeerId]:
    """Sample candidates of ``round``, best first: members not marked left, hash-ordered.

    The sample of the round is the first ``s`` of these that answer a ping, and its
    aggregators the first ``a`` of the sample. Pure and deterministic: equal views give
    equal lists on every peer, in every process.
    """
    active = [peer for peer, entry in view.items() if not entry.left]
    return sorted(active, key=lambda peer: (sample_key(peer, round), peer))
