"""The discrete-event engine: a virtual clock driving unmodified sans-I/O protocols.

Every peer is a protocol object plus a little bookkeeping (alive, rounds done, traffic).
The engine pops events in time order (ties broken by insertion order, so a seed fixes
the whole run), hands them to the peer's protocol, and carries out the effects it
returns: messages go through ``Network``, training through ``TrainingExecutor``, timers
back into the queue. Nothing here knows which protocol it runs.
"""

from __future__ import annotations

import gc
import heapq
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from p2pfl.learning.batch_loss import batch_losses
from p2pfl.protocols.base import (
    CancelTimer,
    Effect,
    EvaluateLosses,
    Event,
    LossesEvaluated,
    MessageReceived,
    PeerDown,
    PeerUp,
    Protocol,
    Record,
    RoundCompleted,
    Send,
    SendFailed,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols.contract import Refusal
from sim.mixing import plain
from sim.network import Network
from sim.training import TrainingExecutor, TrainJob


@contextmanager
def _rare_gc(young: int = 100_000) -> Iterator[None]:
    """Let Python's cycle collector run less often while the event loop runs.

    The loop allocates millions of short-lived objects (events, effects, messages) that
    reference counting frees; the collector's frequent passes over them, and now and then
    over the whole long-lived heap of peers, took a sixth to a third of the simulator's
    own time at 2,000 peers. Garbage with cycles is still collected, only in larger steps.
    """
    before = gc.get_threshold()
    gc.set_threshold(max(young, before[0]), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


@dataclass(slots=True)
class _Timer:
    name: str


@dataclass(slots=True)
class _TrainingFinished:
    job: TrainJob
    ticket: int


@dataclass(slots=True)
class _Action:
    """A scheduled callable (disruptions, joins) run at a virtual time."""

    run: Callable[[float], None]


class PeerStats:
    """Per-peer counters, read as arrays indexed by peer.

    The traffic counters change on every message (tens of thousands a round at 10,000
    peers) and are read once per measurement, so they are kept as Python lists (an
    increment costs a sixth of a NumPy scalar update) and copied into arrays on read.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent_bytes: list[int] = [0] * n
        self.received_bytes: list[int] = [0] * n
        self.sent_messages: list[int] = [0] * n
        self.rounds_done = np.zeros(n, dtype=np.int64)

    @property
    def bytes_sent(self) -> np.ndarray:
        return np.array(self.sent_bytes, dtype=np.int64)

    @property
    def bytes_received(self) -> np.ndarray:
        return np.array(self.received_bytes, dtype=np.int64)

    @property
    def messages_sent(self) -> np.ndarray:
        return np.array(self.sent_messages, dtype=np.int64)


class Engine:
    """Runs protocol objects over a ``Network`` in virtual time."""

    def __init__(
        self,
        protocols: list[Protocol],
        network: Network,
        executor: TrainingExecutor,
        *,
        step_time: float,
        speeds: np.ndarray | None = None,
        rounds: int,
        progress: str = "min",
        send_failure_delay: float | None = None,
    ) -> None:
        self.protocols = protocols
        self.n = len(protocols)
        self.index = {p.peer_id: i for i, p in enumerate(protocols)}
        self.network = network
        self.executor = executor
        self.step_time = step_time
        self.speeds = speeds if speeds is not None else np.ones(self.n)
        self.rounds = rounds
        if progress not in ("min", "max"):
            raise ValueError("progress must be 'min' (every peer) or 'max' (the system)")
        self.progress_mode = progress
        # A sender learns that a message could not be delivered after about a round trip.
        self.send_failure_delay = (
            send_failure_delay if send_failure_delay is not None else 2 * network.latency + 1e-3
        )
        self.now = 0.0
        self.alive = np.ones(self.n, dtype=bool)
        #: the same as ``alive``, as a list: read on every event, where a list is faster
        self._up: list[bool] = [True] * self.n
        self.started = np.zeros(self.n, dtype=bool)
        self.stats = PeerStats(self.n)
        self.records: dict[str, float] = defaultdict(float)
        #: messages the receivers' contracts refused, by reason (also in ``records``)
        self.refusals: Counter[str] = Counter()
        self.events_processed = 0
        # The event queue: a heap of distinct times, and per time a FIFO of (peer, item).
        # Same order as a heap of (time, insertion number), but thousands of messages of
        # a round share a handful of arrival times: heap operations per time, not per event.
        self._times: list[float] = []
        self._buckets: dict[float, deque[tuple[int, object]]] = {}
        # Timers: a round protocol re-arms its timeout every round and cancels it a moment
        # later. Rather than a heap entry per arming (a million stale entries at 10,000
        # peers), keep each armed timer's deadline and one queued entry no later than it;
        # an entry that comes due early re-queues itself at the current deadline.
        self._timer_due: dict[tuple[int, str], float] = {}
        self._timer_queued: dict[tuple[int, str], float] = {}
        self._round_listeners: list[Callable[[int], None]] = []
        self._handled_listeners: list[Callable[[int, Event, list[Effect]], None]] = []
        # ``progress()`` is asked after every event: cache it, and in "min" mode count the
        # live peers still at that round, so it costs O(n) once per round, not per event.
        self._progress: int | None = None
        self._at_floor = 0

    # -- scheduling ------------------------------------------------------------------------
    def _push(self, time: float, peer: int, item: object) -> None:
        bucket = self._buckets.get(time)
        if bucket is None:
            bucket = self._buckets[time] = deque()
            heapq.heappush(self._times, time)
        bucket.append((peer, item))

    @property
    def pending_events(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def start_peer(self, peer: int, at: float = 0.0) -> None:
        """Start ``peer`` at ``at``; until then it is not counted or evaluated."""
        if at <= self.now:
            self.started[peer] = True
            self._progress = None
        self._push(at, peer, Start(at))

    def schedule(self, at: float, action: Callable[[float], None]) -> None:
        """Run ``action(now)`` at virtual time ``at`` (disruptions, joins, measurements)."""
        self._push(at, -1, _Action(action))

    def on_progress(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(progress_round)`` whenever the system's progress advances
        (from the next advance on, also for one added while listeners are being called)."""
        self._round_listeners.append(listener)

    def on_handled(self, listener: Callable[[int, Event, list[Effect]], None]) -> None:
        """Call ``listener(peer, event, effects)`` after a live peer handled an event.

        Lets a model of the peer's device (e.g. a battery) account for the work the
        protocol asked for, after the effects were carried out.
        """
        self._handled_listeners.append(listener)

    # -- peer failures -------------------------------------------------------------------
    def crash(self, peer: int) -> None:
        """The peer stops at once: it sends nothing more and receives nothing."""
        self.alive[peer] = False
        self._up[peer] = False
        self._progress = None

    def recover(self, peer: int, *, restart: bool = True) -> None:
        """The peer comes back with the state it had (as if restored from a checkpoint)."""
        if self.alive[peer]:
            return
        self.alive[peer] = True
        self._up[peer] = True
        self._progress = None
        for timers in (self._timer_due, self._timer_queued):
            for key in [k for k in timers if k[0] == peer]:
                del timers[key]  # timers set before the crash are void
        if restart:
            self._push(self.now, peer, Start(self.now))

    def notify(self, peer: int, about: int, *, up: bool) -> None:
        """Tell ``peer`` that ``about`` went up or down (failure detector, join)."""
        other = self.protocols[about].peer_id
        event = PeerUp(self.now, other) if up else PeerDown(self.now, other)
        self._push(self.now, peer, event)

    # -- progress ----------------------------------------------------------------------------
    def progress(self) -> int:
        """Rounds completed by the system: by every live peer (min) or by any (max)."""
        if self._progress is None:
            live = self.stats.rounds_done[self.alive & self.started]
            if live.size == 0:
                self._progress, self._at_floor = int(self.stats.rounds_done.max(initial=0)), 0
            elif self.progress_mode == "min":
                floor = int(live.min())
                self._progress, self._at_floor = floor, int((live == floor).sum())
            else:
                self._progress = int(live.max())
        return self._progress

    def _round_completed(self, peer: int, round_: int) -> None:
        done = self.stats.rounds_done
        before, after = int(done[peer]), round_ + 1
        if after <= before:
            return
        done[peer] = after
        if self._progress is None:
            return
        if not (self.alive[peer] and self.started[peer]):
            self._progress = None
        elif self.progress_mode == "max":
            self._progress = max(self._progress, after)
        elif before == self._progress:
            self._at_floor -= 1
            if self._at_floor == 0:
                self._progress = None  # the last peer left the floor: recount

    def finished(self) -> bool:
        return self.progress() >= self.rounds

    # -- main loop -----------------------------------------------------------------------------
    def run(self, *, until: float = float("inf")) -> None:
        # The hot loop: tens of thousands of events per round at 10,000 peers, hence
        # the local names and the cached progress read directly.
        times, buckets, dispatch = self._times, self._buckets, self._dispatch
        last_progress = self.progress()
        with _rare_gc():
            while times and last_progress < self.rounds:
                time = times[0]
                if time > until:
                    break
                bucket = buckets[time]
                peer, item = bucket.popleft()
                if not bucket:
                    heapq.heappop(times)
                    del buckets[time]
                self.now = time
                dispatch(peer, item)
                if self._progress != last_progress:
                    progress = self.progress()
                    if progress != last_progress:
                        last_progress = progress
                        for listener in tuple(self._round_listeners):
                            listener(progress)

    def _dispatch(self, peer: int, item: object) -> None:
        if type(item) is MessageReceived:  # most events are messages: no isinstance chain
            if not self._up[peer]:
                return
            self.stats.received_bytes[peer] += item.message.nbytes()
            refusal = self.protocols[peer].screen(item.sender, item.message)
            if refusal is not None:
                self._refuse(peer, refusal)
                return
            self._handle(peer, item)
            return
        if isinstance(item, _Action):
            item.run(self.now)
            return
        if not self._up[peer]:
            return
        if isinstance(item, _Timer):
            key = (peer, item.name)
            if self._timer_queued.get(key) == self.now:
                del self._timer_queued[key]
            due = self._timer_due.get(key)
            if due is None:
                return  # cancelled
            if due > self.now:  # re-armed later since this entry was queued
                if key not in self._timer_queued:
                    self._timer_queued[key] = due
                    self._push(due, peer, item)
                return
            del self._timer_due[key]
            event: Event = TimerFired(self.now, item.name)
        elif isinstance(item, _TrainingFinished):
            if item.job.cancelled:
                return
            self.executor.ensure_done(item.job)
            assert item.job.result is not None
            event = TrainingDone(self.now, item.ticket, item.job.result, item.job.loss)
        else:
            event = item  # type: ignore[assignment]
            if isinstance(event, Start) and not self.started[peer]:
                self.started[peer] = True
                self._progress = None
        self._handle(peer, event)

    def _refuse(self, peer: int, refusal: Refusal) -> None:
        """A message the receiver's contract refuses: dropped, counted by reason."""
        self.refusals[refusal.value] += 1
        self.records[f"refused.{refusal.value}"] += 1.0

    def _handle(self, peer: int, event: Event) -> None:
        self.events_processed += 1
        effects = self.protocols[peer].handle(event)
        if effects:
            self._apply(peer, effects)
        for listener in self._handled_listeners:
            listener(peer, event, effects)

    def _apply(self, peer: int, effects: list[Effect]) -> None:
        sized, nbytes = None, 0  # a broadcast sends one message object many times: size it once
        for effect in effects:
            if type(effect) is Send:
                if effect.message is not sized:
                    sized, nbytes = effect.message, effect.message.nbytes()
                self._send(peer, effect, nbytes)
            elif isinstance(effect, Send):
                self._send(peer, effect, effect.message.nbytes())
            elif isinstance(effect, Train):
                job = self.executor.submit(peer, effect.params, effect.steps)
                duration = effect.steps * self.step_time / float(self.speeds[peer])
                self._push(self.now + duration, peer, _TrainingFinished(job, effect.ticket))
            elif isinstance(effect, EvaluateLosses):
                self._evaluate_losses(peer, effect)
            elif isinstance(effect, SetTimer):
                key = (peer, effect.name)
                self._timer_due[key] = effect.at
                queued = self._timer_queued.get(key)
                if queued is None or queued > effect.at:
                    self._timer_queued[key] = effect.at
                    self._push(effect.at, peer, _Timer(effect.name))
            elif isinstance(effect, CancelTimer):
                self._timer_due.pop((peer, effect.name), None)
            elif isinstance(effect, RoundCompleted):
                self._round_completed(peer, effect.round)
            elif isinstance(effect, Record):
                if effect.value == effect.value:  # NaN (e.g. a relay's loss) counts nothing
                    self.records[effect.name] += effect.value

    def _evaluate_losses(self, peer: int, effect: EvaluateLosses) -> None:
        """Loss evaluations (zeroth-order protocols, n6): computed now, answered after one
        step's time. The peer's queued training runs first, so that its sampler hands out
        batches in the order the peer asked for them, as on a node."""
        if self.executor.pending:
            self.executor.flush()
        executor = self.executor
        losses = batch_losses(
            executor.trainer,
            executor.samplers[peer],
            [plain(p) for p in effect.params],
            transform=executor.transforms.get(peer),
        )
        at = self.now + self.step_time / float(self.speeds[peer])
        self._push(at, peer, LossesEvaluated(at, effect.ticket, losses))

    def _send(self, peer: int, effect: Send, nbytes: int) -> None:
        receiver = self.index.get(effect.to)
        if receiver is None:
            self._fail_send(peer, effect, self.now + self.send_failure_delay)
            return
        delivery = self.network.transmit(self.now, peer, receiver, nbytes)
        if delivery.unroutable:
            self._fail_send(peer, effect, self.now + self.send_failure_delay)
            return
        stats = self.stats
        stats.sent_bytes[peer] += nbytes
        stats.sent_messages[peer] += 1
        if delivery.arrival is None:
            return  # lost on the way
        if not self._up[receiver]:
            # Nobody acknowledges: the sender finds out after its timeout.
            self._fail_send(peer, effect, delivery.arrival + self.send_failure_delay)
            return
        self._push(
            delivery.arrival,
            receiver,
            MessageReceived(delivery.arrival, self.protocols[peer].peer_id, effect.message),
        )

    def _fail_send(self, peer: int, effect: Send, at: float) -> None:
        self._push(at, peer, SendFailed(at, effect.to, effect.message))
