"""Battery drain in virtual time: what training, radio and idling cost, and when it is empty.

A :class:`BatteryBank` holds the batteries a ``battery`` disruption handed out. It draws
on a battery only when something happens to its peer (an event handled, the peer going
down or coming back) and, for the idle drain, at the moment idling alone would empty it:
nothing runs per tick. Kept apart from the runtime because only this kind needs it, while
every way a peer goes down or up must pause or resume its battery.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from p2pfl.protocols.base import Effect, EvaluateLosses, Event, MessageReceived, Send, Train
from topologies import Battery

if TYPE_CHECKING:
    from sim.engine import Engine

__all__ = ["BatteryBank"]


class BatteryBank:
    """The batteries of a run, drained as their peers work and idle.

    ``on_empty(peer)`` is called once a battery is depleted (the bank has recorded it in
    :attr:`depleted` and :attr:`depleted_at` by then).
    """

    def __init__(
        self, engine: Engine, has_data: np.ndarray, on_empty: Callable[[int], None]
    ) -> None:
        self.engine = engine
        #: whether each peer still has data: training costs relays nothing
        self.has_data = has_data
        self.on_empty = on_empty
        self.batteries: dict[int, Battery] = {}
        self.depleted: set[int] = set()
        self.depleted_at: dict[int, float] = {}
        self._since: dict[int, float] = {}
        self._check: dict[int, int] = defaultdict(int)

    def add(self, peer: int, battery: Battery, *, on: bool) -> None:
        """Give ``peer`` a battery; it drains from now if the peer is ``on``."""
        self.batteries[peer] = battery
        if on:
            self._since[peer] = self.engine.now
            self._arm(peer)

    def pause(self, peer: int) -> None:
        """The peer goes down: draw the idle drain until now, then stop draining."""
        if peer in self.batteries:
            self.drain(peer)
            self._since.pop(peer, None)

    def resume(self, peer: int) -> None:
        """The peer is back up: it drains again from now."""
        if peer in self.batteries:
            self._since[peer] = self.engine.now
            self._arm(peer)

    def on_handled(self, peer: int, event: Event, effects: list[Effect] | None) -> None:
        """The engine's hook after each handled event: charge its training and traffic."""
        if peer not in self._since:
            return
        steps = sent = 0
        for effect in effects or ():
            if isinstance(effect, Train) and self.has_data[peer]:
                steps += effect.steps
            elif isinstance(effect, EvaluateLosses) and self.has_data[peer]:
                steps += 1  # a few forward passes on one batch: charged as one step
            elif isinstance(effect, Send):
                sent += effect.message.nbytes()
        received = event.message.nbytes() if isinstance(event, MessageReceived) else 0
        if steps or sent or received:
            self.drain(peer, steps=steps, bytes_sent=sent, bytes_received=received)

    def drain(
        self, peer: int, *, steps: int = 0, bytes_sent: int = 0, bytes_received: int = 0
    ) -> None:
        """Draw the idle time since the last draw plus this work; report the peer if empty."""
        since = self._since.get(peer)
        if since is None:
            return
        battery = self.batteries[peer]
        now = self.engine.now
        battery.consume(
            steps=steps, bytes_sent=bytes_sent, bytes_received=bytes_received, seconds=now - since
        )
        self._since[peer] = now
        if battery.depleted:
            del self._since[peer]
            self.depleted.add(peer)
            self.depleted_at[peer] = float(now)
            self.on_empty(peer)
        else:
            self._arm(peer)

    def _arm(self, peer: int) -> None:
        """Schedule the moment idling alone would empty the battery (re-armed on every draw)."""
        battery = self.batteries[peer]
        if battery.idle_drain_per_s_j <= 0:
            return
        self._check[peer] += 1
        ticket = self._check[peer]
        at = self.engine.now + battery.charge / battery.idle_drain_per_s_j

        def check(now: float) -> None:
            if self._check[peer] == ticket:
                self.drain(peer)

        self.engine.schedule(at, check)
