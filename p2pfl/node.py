"""The asyncio gossip agent: one sans-I/O protocol driven over a real transport.

The node is the second driver of the protocols (the simulator is the first). It turns
effects into I/O and I/O into events:

- ``Send``: sign and encode the message (``p2pfl.wire``) and hand it to the transport;
  a failure comes back to the protocol as ``SendFailed``.
- ``Train``: run the local SGD steps in a worker thread, so the event loop keeps
  receiving (a libp2p stream whose reader stalls for 5 s is reset); the result comes
  back as ``TrainingDone``.
- ``SetTimer`` / ``CancelTimer``: asyncio timer handles; ``now`` is the loop's clock.
- ``RoundCompleted``: checkpoint atomically, evaluate, log a status line, write
  ``status.json`` (at most once per ``STATUS_EVERY`` while rounds end faster than
  that), with ``tensorboard = true`` the round's measurements as TensorBoard scalars
  (``p2pfl.tracking``); stop after the configured number of rounds.

Incoming bytes pass through a :class:`~p2pfl.security.PeerGuard` (ban, rate, decode,
signature, replay, round window) before the protocol sees them; whatever is refused is
counted by reason and shows in the status.

Two jobs live in their own modules and know nothing of protocols: finding peers
(:class:`~p2pfl.discovery.Discovery`: bootstrap, ``hello`` peer exchange, mDNS, restarts;
only peers *met* -- not names heard of -- may become neighbours) and noticing that
neighbours stop or start answering (:class:`~p2pfl.liveness.Liveness`: pings). The node
wires them to the transport and turns what they report into ``PeerUp`` / ``PeerDown``.

Neighbour relations must be two-way for protocols whose round waits for its neighbours:
a node that receives such a model from a met peer it did not choose answers ``unlink``
once, and the sender stops waiting for it (``PeerDown``); a banned peer is no longer
waited for either.

An exception inside a protocol callback never hangs the node: one raised while handling
a received message drops that message and charges its sender; one raised by the node's
own timers, training or effects stops the node with ``failure`` set in its status (and
``p2pfl node`` exits non-zero). Both are logged and counted (``errors`` in the status).

A node configured with an ``[attack]`` (test networks only) carries it out as a simulated
Byzantine peer does: poisoned batches for data attacks, its protocol wrapped in
``p2pfl.attacks.ByzantineProtocol`` for model attacks; it logs and reports that it does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import signal
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl.checkpoint import Layout, StateDir
from p2pfl.config import NodeConfig
from p2pfl.discovery import (
    HELLO,
    MAX_ADDRS_PER_PEER,
    MAX_CONCURRENT_DIALS,
    MAX_KNOWN_PEERS,
    Discovery,
)
from p2pfl.eventloop import running_loop_name
from p2pfl.identity import Identity
from p2pfl.learning import BatchSampler, evaluate
from p2pfl.liveness import Liveness
from p2pfl.neighbours import PeerGraph, check_member, choose_neighbours
from p2pfl.peer import build_commons, use_torch_threads, wrap_attacker
from p2pfl.protocols.base import (
    CancelTimer,
    Effect,
    EvaluateLosses,
    Event,
    LossesEvaluated,
    Message,
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
from p2pfl.protocols.contract import Role
from p2pfl.protocols.records import IdentitySigner
from p2pfl.protocols.registry import mixing_scheme, protocol_class
from p2pfl.security import Ban, GuardConfig, PeerGuard, SequenceNumbers
from p2pfl.threadname import name_os_thread
from p2pfl.tracking import TensorBoardTracker
from p2pfl.transport.base import Transport, TransportError
from p2pfl.transport.send_budget import SendBudget, SendTicket
from p2pfl.wire import DropReason, Envelope, WireError, WireLimits, encode

__all__ = [
    "CONTROL",
    "EARLY_MESSAGES",
    "HELLO",
    "MAX_ADDRS_PER_PEER",
    "MAX_CONCURRENT_DIALS",
    "MAX_KNOWN_PEERS",
    "STATUS_NAME",
    "UNLINK",
    "SignedOnce",
    "Node",
]

log = logging.getLogger("p2pfl.node")

CONTROL = "p2pfl"  # wire protocol name of the node's own messages (peer exchange)
#: "you are not my neighbour": the answer to a model from a peer that chose us one-way
UNLINK = "unlink"
STATUS_NAME = "status.json"
#: seconds between rewrites of status.json while discovering (no rounds end meanwhile),
#: and the most a round's status may wait while training: rounds that end faster than
#: this share one rewrite (a JSON dump, a file and a rename on the event loop each)
STATUS_EVERY = 1.0
#: protocol messages kept while still discovering (a peer that found everyone first
#: sends its round-0 model before we start); they are handled once the protocol starts
EARLY_MESSAGES = 16


class SignedOnce:
    """The signed bytes of the message being sent, made once for all its recipients.

    A protocol sends one ``Message`` object to each of its neighbours in turn; signing it
    once instead of once per neighbour saves an Ed25519 signature, a hash and a msgpack
    dump per extra recipient (issue 17). Every recipient gets the same bytes, sequence
    number included, which is sound: a guard refuses a message whose signer is not the
    stream's peer, so a recipient cannot pass its copy on, and each recipient sees the
    number once. A second send of the same object to a peer that already had it (a
    retry) is signed afresh, so that it is not refused there as a replay.

    The message is held weakly and its bytes only as long as it lives: once the sends
    that carry it are over, both go, instead of staying until the next round's message
    (an encoded model held through the whole of local training: 10 KB for digits, ~6 MB
    for the MNIST CNN, and a node's peak memory where training peaks).
    """

    __slots__ = ("_message", "_protocol", "_data", "_sent_to")

    def __init__(self) -> None:
        self._message: weakref.ref[Message] | None = None
        self._protocol = ""
        self._data = b""
        self._sent_to: set[str] = set()

    @property
    def held_bytes(self) -> int:
        """Bytes of an encoded message held for more recipients (0 once it is gone)."""
        return len(self._data)

    def bytes_for(self, peer: str, message: Message, protocol: str, sign: Callable[[], bytes]) -> bytes:
        """``message``'s bytes for ``peer``: the kept ones, or ``sign()``'s (then kept)."""
        kept = self._message
        if (
            kept is not None
            and kept() is message
            and protocol == self._protocol
            and peer not in self._sent_to
        ):
            self._sent_to.add(peer)
            return self._data
        self._message = weakref.ref(message, self._forget)
        self._protocol, self._data = protocol, sign()
        self._sent_to = {peer}
        return self._data

    def _forget(self, gone: weakref.ref[Message]) -> None:
        """The kept message died: let its bytes go too."""
        if gone is self._message:
            self._message, self._data, self._sent_to = None, b"", set()


class Node:
    """One peer: a transport, a protocol, a trainer, a guard and a state directory."""

    def __init__(self, config: NodeConfig, transport: Transport, identity: Identity) -> None:
        self.config = config
        self.transport = transport
        self.identity = identity
        self.peer_id = identity.peer_id
        if transport.peer_id != self.peer_id:
            raise ValueError("the transport and the identity name different peers")
        self.state_dir = Path(config.state_dir)
        # protocols exchange float32 tensors only (codecs decode to float32): any other
        # dtype is refused by the wire before it is allocated
        self.limits = WireLimits(
            max_message_bytes=config.network.max_message_bytes,
            allowed_dtypes=frozenset({"f32"}),
        )
        self.guard = PeerGuard(
            GuardConfig(
                # the protocol declares its round window (none: it answers stale ones)
                max_lag=protocol_class(config.protocol).max_round_lag,
                max_lead=config.network.max_round_lead,
                byte_burst=float(2 * config.network.max_message_bytes),
                # peer exchange belongs to no round: a late or restarted peer must
                # still be able to introduce itself
                unrounded=frozenset({CONTROL}),
            ),
            on_ban=self._on_ban,
        )
        self.seq = SequenceNumbers(time.time())
        self.signed_once = SignedOnce()
        self.protocol: Protocol | None = None
        #: met peers that told us they do not take us as a neighbour (never waited for)
        self.unlinked: set[str] = set()
        #: peers we told so (once each: later models from them are refused as usual)
        self._told_unlink: set[str] = set()
        #: exceptions raised inside protocol callbacks, by where they happened
        self.errors: dict[str, int] = {}
        #: why the node stopped on an error of its own, if it did
        self.failure: str | None = None
        self.counters: dict[str, float] = {}
        self.accuracy: float | None = None
        self.resumed_from: int | None = None
        self.rounds_done = 0
        self.bytes_sent = 0
        self.started_at = time.time()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="p2pfl-train", initializer=name_os_thread
        )
        self._done = asyncio.Event()
        #: set once the transport listens (tests and embedders wait on it)
        self.listening = asyncio.Event()
        self._stopping = False
        #: stop() was called (a signal): _leave does not linger
        self._stop_asked = False
        #: set once _shutdown began: the status says how the run ended
        self._ended = False
        self._next_train_at = 0.0
        #: monotonic time of the last status.json write; the deferred rewrite, if one waits
        self._status_at = float("-inf")
        self._status_later: asyncio.TimerHandle | None = None
        self._early: list[tuple[str, Envelope]] = []
        #: per-round scalars into <state_dir>/tensorboard (config.tensorboard; opened in run)
        self._tracker: TensorBoardTracker | None = None
        self.graph: PeerGraph | None = None
        if config.network.topology_file:
            self.graph = PeerGraph.from_file(config.network.topology_file)
            check_member(self.graph, self.peer_id, config.network.topology_file)
        net = config.network
        self.discovery = Discovery(
            self.peer_id, transport, net, graph=self.graph, send=self._send_own, spawn=self._spawn
        )
        #: per-peer send timeouts (``p2pfl.transport.send_budget``): ``network.send_timeout``
        #: for a small message, more for a large one on a slow link, less waiting on a stall
        self.send_budget = SendBudget(net.send_timeout)
        #: sends on their way (``_flush_sends`` waits for them before the node leaves)
        self._sends_in_flight: set[asyncio.Task[Any]] = set()
        # the protocol's sends handed to the transport and not over yet (no task each);
        # set while there are none
        self._soon_in_flight = 0
        self._no_soon_in_flight = asyncio.Event()
        self._no_soon_in_flight.set()
        self.liveness = Liveness(
            transport,
            interval=net.ping_interval,
            timeout=net.ping_timeout,
            # a ping waits behind the models queued to that peer on the same connection
            backlog=self.send_budget.backlog_seconds,
            failures=net.ping_failures,
            watched=self._watched,
            running=lambda: self.protocol is not None and not self._stopping,
            may_return=lambda peer: not self.guard.is_banned(peer, time.time()),
            on_down=self._peer_down,
            on_up=self._peer_up,
            on_unreachable=self._peer_unreachable,
        )
        use_torch_threads(config.threads)  # before anything trains (Bristle pre-trains here)
        self._setup_learning()
        self.disk = self._state_files()

    @property
    def known(self) -> dict[str, list[str]]:
        """Addresses of peers heard of (dial candidates), bounded by ``MAX_KNOWN_PEERS``."""
        return self.discovery.known

    @property
    def met(self) -> set[str]:
        """Peers met directly: only these may become neighbours or population members."""
        return self.discovery.met

    # -- learning set-up ---------------------------------------------------------------
    def _setup_learning(self) -> None:
        """This node's peer, assembled as the simulator assembles peer ``peer_index``
        (``p2pfl.peer``): share ``peer_index`` of ``num_peers``, its sampler, the shared
        start model (and Bristle's extractor and this node's probe set)."""
        cfg = self.config
        self.commons = build_commons(
            cfg.data, cfg.model, cfg.protocol, seed=cfg.seed, shares=cfg.num_peers
        )
        self.peer = self.commons.peer(cfg.peer_index, cfg.peer_index)
        dataset = self.commons.dataset
        self.trainer = self.commons.trainer
        assert self.peer.sampler is not None  # every node holds a share
        self.sampler: BatchSampler = self.peer.sampler
        self.x_test, self.y_test = dataset.x_test, dataset.y_test
        if cfg.eval_test_samples and cfg.eval_test_samples < len(self.y_test):
            keep = np.random.default_rng(cfg.seed).choice(
                len(self.y_test), cfg.eval_test_samples, replace=False
            )
            index = torch.from_numpy(np.sort(keep))
            self.x_test, self.y_test = self.x_test[index], self.y_test[index]
        self.data_size = self.peer.data_size
        self._setup_attack(dataset.num_classes)

    def _layout(self, protocol: str, kind: str) -> tuple[int, ...] | None:
        """The exact shape of the tensor a message may carry, checked before it is
        allocated (the protocol's contract checks it again, with dtype and magnitude);
        none for the node's own messages."""
        if protocol == CONTROL:
            return None
        # before the protocol is built (early messages), the assembly knows the same size
        dim = self.protocol.message_dim if self.protocol is not None else self.commons.message_dim
        return (dim,)

    # -- attacker (experiments on a test network) ------------------------------------------
    def _setup_attack(self, num_classes: int) -> None:
        options = self.config.attack
        self.attack = options.build(num_classes) if options.name != "none" else None
        if self.attack is None:
            return
        log.warning(
            "ATTACKER: this node runs the %s attack %r with %s (isolate=%s, delay=%gs); "
            "for experiments on a test network only",
            self.attack.kind,
            self.attack.name,
            dict(self.attack.params) or "no parameters",
            options.isolate,
            options.delay,
        )

    def _as_attacker(self, protocol: Protocol) -> Protocol:
        """The protocol wrapped as the simulator wraps a Byzantine peer (model attacks,
        isolation); what it knows of honest models is what this node received."""
        if self.attack is None:
            return protocol
        cfg = self.config
        return wrap_attacker(
            protocol,
            self.attack,
            cfg.attack,
            index=cfg.peer_index,
            seed=cfg.seed,
            isolate=cfg.attack.isolate,
            n_total=max(2, len(protocol.neighbours) + 1),  # ALIE's z_max: it and its neighbours
            n_byzantine=1,
        )

    def _train_locally(self, params: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
        """Local SGD (in the worker thread); an attacker's batches are poisoned, a free
        rider trains nothing."""
        if self.attack is None:
            return self.trainer.train_one(params, self.sampler, steps)
        if not self.attack.trains:
            return params.detach().clone(), float("nan")
        return self.trainer.train_one(
            params, self.sampler, steps, transform=self.attack.batch_transform
        )

    def _attack_status(self) -> dict[str, Any] | None:
        if self.attack is None:
            return None
        report = self.protocol.report() if self.protocol is not None else {}
        crafted = report.get("crafted_messages")  # the Byzantine wrapper's count
        return {
            "attacker": True,
            "name": self.attack.name,
            "kind": self.attack.kind,
            "params": dict(self.attack.params),
            "isolate": self.config.attack.isolate,
            "delay": self.config.attack.delay,
            "crafted_messages": crafted,
        }

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """Discover peers, learn for ``rounds`` rounds (or until stopped), return the status."""
        checkpoint = self._open_checkpoint()  # verified; CheckpointError: exit 2
        if checkpoint is not None and checkpoint["rounds_done"] >= self.config.rounds:
            return self._already_finished(checkpoint)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests): stop() is called directly
        self.transport.set_handler(self._on_payload)
        self.transport.set_discovery_handler(self.discovery.on_discovered)
        self.transport.set_abuse_handler(self._on_transport_abuse)
        await self.transport.start()
        self.listening.set()
        log.info(
            "node %s listening on %s (event loop: %s)",
            self.peer_id,
            ", ".join(self.transport.listen_addrs),
            running_loop_name(),
        )
        self._write_status()
        try:
            if self.config.tensorboard:  # inside try: a failure still closes the transport
                self._tracker = TensorBoardTracker(self.state_dir / "tensorboard")
            if await self._discover(checkpoint):
                self._start_protocol(checkpoint)
                self._write_status()  # "training": not left saying "discovering"
                await self._done.wait()
            if self.rounds_done >= self.config.rounds and self.failure is None:
                await self._leave()
        finally:
            await self._shutdown()
        return self.status()

    async def _discover(self, checkpoint: dict[str, Any] | None) -> bool:
        """Find peers (or, resuming, redial the saved ones) unless stopped meanwhile;
        whether to start learning.

        A signal ends discovery at once (not at ``discovery_timeout``), and status.json is
        rewritten every ``STATUS_EVERY`` seconds meanwhile, so it shows the peers met so far.
        Ending with fewer peers than ``network.min_peers`` is a failure (logged, in
        ``failure``): a node that trains alone must have been asked to (``min_peers = 0``).
        """
        if checkpoint is not None:
            work = asyncio.ensure_future(self.discovery.reconnect(checkpoint.get("known", {})))
        else:
            work = asyncio.ensure_future(self.discovery.discover())
        stopped = asyncio.ensure_future(self._done.wait())
        try:
            # bounded: discovery ends by its own deadline, a stop ends it sooner
            while not work.done() and not stopped.done():
                await asyncio.wait(
                    {work, stopped}, timeout=STATUS_EVERY, return_when=asyncio.FIRST_COMPLETED
                )
                self._write_status()
        finally:
            stopped.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, stopped, return_exceptions=True)
        if self._done.is_set():
            log.info("stopped while discovering: %d peers met", len(self.met))
            return False
        work.result()  # an error of discovery's own is the node's failure, raised here
        shortfall = self.discovery.shortfall() if checkpoint is None else None
        if shortfall is not None:
            self.failure = f"discovery: {shortfall}"
            log.error("not starting: %s", shortfall)
            return False
        return True

    def stop(self) -> None:
        """Ask the node to stop after saving its state (signal handlers call this); in
        every phase it returns within a second or two."""
        if not self._done.is_set():
            log.info("stopping")
        self._stop_asked = True
        self._done.set()

    async def _leave(self) -> None:
        """Done for good: a protocol that tracks its population (MoDeST) says goodbye.

        Only after the configured rounds: a node stopped by a signal keeps its place and
        resumes from its checkpoint; the others pass over it meanwhile. A model still on
        its way out (an aggregate just made) gets up to ``send_timeout`` to leave first.
        """
        protocol = self.protocol
        if protocol is None:
            return
        await self._flush_sends()  # our last model, still on its way to slow neighbours
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.network.send_timeout
        while not protocol.settled and loop.time() < deadline and not self._stop_asked:
            await asyncio.sleep(0.05)  # the protocol keeps handling pongs meanwhile
        name = protocol.name
        sends = [effect for effect in protocol.leave(self._now()) if isinstance(effect, Send)]
        await asyncio.gather(
            *(self._send_bytes(e.to, e.message, name) for e in sends), return_exceptions=True
        )
        # What the protocol answered meanwhile goes out before the shutdown cancels it: a
        # MoDeST peer that left tells whoever pings it, or they wait out a timer for it.
        await asyncio.sleep(0)  # answers spawned just now start (and count as in flight)
        await self._flush_sends()

    async def _shutdown(self) -> None:
        self._stopping = True
        self._ended = True
        for handle in self._timers.values():
            handle.cancel()
        if self._status_later is not None:
            self._status_later.cancel()  # the final status below supersedes it
        for task in list(self._tasks):
            task.cancel()
        if self.protocol is not None and self.failure is None:
            self._checkpoint()  # after a failure the last round's checkpoint is the good one
        self._write_status(final=True)
        if self._tracker is not None:
            self._tracker.close()  # flushes what is still buffered
        await self.transport.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- protocol ------------------------------------------------------------------------
    def _choose_neighbours(self) -> list[str]:
        """Neighbours among the peers met (never among names only heard of)."""
        return choose_neighbours(
            self.peer_id,
            self.met,
            graph=self.graph,
            max_neighbours=self.config.network.max_neighbours,
            seed=self.config.seed,
        )

    def _mixing_weights(self) -> dict[str, float] | None:
        """D-PSGD's weights from the graph file (every peer derives the same matrix)."""
        scheme = mixing_scheme(self.config.protocol)
        if self.graph is None or scheme is None:
            return None  # D-PSGD learns them: Metropolis-Hastings from declared degrees
        return self.graph.mixing_weights(self.peer_id, scheme)

    def _new_protocol(self, neighbours: list[str]) -> Protocol:
        """This node's protocol as the assembly builds it (``p2pfl.peer``), honest and
        fresh: over ``neighbours``, with every met peer in its population."""
        return self.commons.build_protocol(
            self.peer,
            peer_id=self.peer_id,
            neighbours=neighbours,
            population=sorted({self.peer_id, *self.met, *neighbours}),
            mixing_weights=self._mixing_weights(),
            # relayed data (views, histories) signed by its origin (issue 8)
            signer=IdentitySigner(self.identity),
        )

    def _start_protocol(self, checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is not None and self.graph is None:
            neighbours = list(checkpoint["neighbours"])
        else:  # the graph file is authoritative, also over a checkpoint
            neighbours = self._choose_neighbours()
        protocol = self._new_protocol(neighbours)
        refusal = self.commons.never_aggregates(len(neighbours), f"{len(neighbours)} neighbours")
        if refusal is not None:  # said once; a node meets its neighbours only by discovery
            log.warning("%s: this node keeps its own model every round", refusal)
        if checkpoint is not None:
            protocol.load_state_dict(checkpoint["protocol"])
            self.sampler.load_state_dict(checkpoint["sampler"])
            self.counters = dict(checkpoint.get("counters", {}))
            self.rounds_done = int(checkpoint["rounds_done"])
            self.resumed_from = protocol.round
            log.info("resumed from checkpoint at round %d", protocol.round)
        protocol = self._as_attacker(protocol)
        self.protocol = protocol
        log.info(
            "starting %s with %d neighbours, %d samples",
            protocol.name,
            len(neighbours),
            self.data_size,
        )
        self._handle(Start(self._now()))
        early, self._early = self._early, []
        for sender, envelope in early:
            self._route(sender, envelope)
        if self.liveness.enabled:
            self._spawn(self.liveness.run())

    # -- liveness ------------------------------------------------------------------------
    def _watched(self) -> list[str]:
        """The peers to ping: our neighbours, except those that do not take us as theirs."""
        assert self.protocol is not None
        return [p for p in self.protocol.neighbours if p not in self.unlinked]

    def _peer_down(self, peer: str) -> None:
        """Missed pings: said at WARNING (a crashed neighbour must show in the log, not
        only in status.json), then told to the protocol."""
        self._log_peer("lost", peer, f"missed {self.liveness.failures} pings in a row")
        self._handle(PeerDown(self._now(), peer))

    def _peer_unreachable(self, peer: str, why: str) -> None:
        """A send to a neighbour failed (the protocol hears of it as ``SendFailed``)."""
        self._log_peer("lost", peer, why)

    def _peer_up(self, peer: str) -> None:
        self._log_peer("back", peer, "answers pings again")
        self._handle(PeerUp(self._now(), peer))

    def _log_peer(self, what: str, peer: str, why: str) -> None:
        protocol = self.protocol
        log.warning(
            "%s %s %s at round %s (%s); %d/%d neighbours live",
            "neighbour" if protocol is not None and peer in protocol.neighbours else "peer",
            peer,
            what,
            protocol.round if protocol is not None else "-",
            why,
            len(self._live_neighbours()),
            len(protocol.neighbours) if protocol is not None else 0,
        )

    def _live_neighbours(self) -> list[str]:
        """Neighbours neither reported down (pings, failed sends) nor banned."""
        if self.protocol is None:
            return []
        now = time.time()
        return [
            peer
            for peer in self.protocol.neighbours
            if peer not in self.liveness.down and not self.guard.is_banned(peer, now)
        ]

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _handle(self, event: Event) -> None:
        """Feed one event to the protocol and carry out its effects, containing errors.

        The protocol raising on a received message costs that message (and its sender's
        standing); anything else raising -- the protocol on a timer, a finished training,
        a start or a peer event, or one of the node's own effects -- would leave no timer
        armed and the node waiting forever, so the node stops with ``failure`` set.
        """
        if self.protocol is None or self._stopping:
            return
        try:
            effects = self.protocol.handle(event)
        except Exception as error:
            if isinstance(event, MessageReceived):
                self._message_failed(event.sender, event.message.kind, error)
            else:
                self._fail(_event_source(event), error)
            return
        try:
            for effect in effects:
                self._apply(effect)
        except Exception as error:
            self._fail("effect", error)

    def _count_error(self, where: str) -> None:
        self.errors[where] = self.errors.get(where, 0) + 1

    def _message_failed(self, sender: str, kind: str, error: Exception) -> None:
        """Handling a received message raised: drop it and charge the sender."""
        self._count_error("message")
        name = type(error).__name__
        log.warning(
            "dropped a %s message from %s: handling it raised %s: %s", kind, sender, name, error
        )
        log.debug("traceback of the failed %s message", kind, exc_info=error)
        detail = f"{kind}: handler raised {name}"
        self.guard.record_drop(sender, DropReason.MALFORMED, now=time.time(), detail=detail)

    def _fail(self, where: str, error: BaseException) -> None:
        """An error of the node's own (timer, training, effect): stop instead of hanging."""
        self._count_error(where)
        if self.failure is None:
            self.failure = f"{where}: {type(error).__name__}: {error}"
            log.error("node failed, stopping: an exception in %s: %s", where, self.failure)
            log.debug("traceback of the failure in %s", where, exc_info=error)
        self._stopping = True  # no further events: the protocol's state is suspect
        self._done.set()

    def _apply(self, effect: Effect) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(effect, Send):
            self._send_soon(effect)
        elif isinstance(effect, Train):
            if self._done.is_set():  # the last round is over: nobody waits for its model
                return
            self._spawn(self._train(effect))
        elif isinstance(effect, EvaluateLosses):  # zeroth-order protocols (n6)
            self._spawn(self._evaluate_losses(effect))
        elif isinstance(effect, SetTimer):
            old = self._timers.pop(effect.name, None)
            if old is not None:
                old.cancel()
            self._timers[effect.name] = loop.call_at(effect.at, self._fire_timer, effect.name)
        elif isinstance(effect, CancelTimer):
            handle = self._timers.pop(effect.name, None)
            if handle is not None:
                handle.cancel()
        elif isinstance(effect, Record):
            self.counters[effect.name] = self.counters.get(effect.name, 0.0) + effect.value
        elif isinstance(effect, RoundCompleted):
            assert self.protocol is not None
            self._on_round(effect.round, effect.model(self.protocol))

    def _fire_timer(self, name: str) -> None:
        self._handle(TimerFired(self._now(), name))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A background task (send, training, dial) that died of an error stops the node:
        unnoticed, it would leave the protocol waiting for an answer that never comes."""
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._background_failed(error)

    def _background_failed(self, error: BaseException) -> None:
        """Background work (a task, a protocol's send) died of an error: stop the node,
        unless a normal shutdown closed its way."""
        if self._stopping and self.failure is None:
            log.debug("background work ended with an error while stopping: %r", error)
            return
        self._fail("task", error)

    async def _train(self, effect: Train) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.min_round_interval
        if interval > 0:
            wait = self._next_train_at - loop.time()
            self._next_train_at = max(loop.time(), self._next_train_at) + interval
            if wait > 0:
                await asyncio.sleep(wait)  # pacing, not synchronisation
        try:
            params, loss = await loop.run_in_executor(
                self._pool, self._train_locally, effect.params, effect.steps
            )
        except Exception as error:  # no TrainingDone would ever come: stop, do not hang
            self._fail("training", error)
            return
        self._handle(TrainingDone(self._now(), effect.ticket, params, loss))

    async def _evaluate_losses(self, effect: EvaluateLosses) -> None:
        """Losses of a few vectors on one batch (in the worker thread, like training)."""
        from p2pfl.learning.batch_loss import batch_losses

        loop = asyncio.get_running_loop()
        attack = self.attack
        transform = attack.batch_transform if attack is not None else None
        # a free rider computes nothing, as it trains nothing (the simulator gives it no data)
        sampler = self.sampler if attack is None or attack.trains else None
        try:
            losses = await loop.run_in_executor(
                self._pool,
                lambda: batch_losses(self.trainer, sampler, effect.params, transform=transform),
            )
        except Exception as error:  # no LossesEvaluated would ever come: stop, do not hang
            self._fail("training", error)
            return
        self._handle(LossesEvaluated(self._now(), effect.ticket, losses))

    def _send_soon(self, effect: Send) -> None:
        """Hand one of the protocol's messages to the transport; its outcome comes to
        ``_sent``. No task per send: a node sends each model to every neighbour, and a
        task, its coroutines and its wake-up cost more than the hand-over (issue 17)."""
        assert self.protocol is not None
        data, ticket = self._prepared(effect.to, effect.message, self.protocol.name)
        self._soon_in_flight += 1
        self._no_soon_in_flight.clear()
        done = functools.partial(self._sent, effect, ticket)
        self.transport.send_soon(effect.to, data, timeout=ticket.timeout, done=done)

    def _sent(self, effect: Send, ticket: SendTicket, error: BaseException | None) -> None:
        """A protocol send is over: measured, or the peer marked down and the protocol
        told (``SendFailed``); an error that is not the transport's stops the node, as
        it did a send task that died of it."""
        self._soon_in_flight -= 1
        if not self._soon_in_flight:
            self._no_soon_in_flight.set()
        self.send_budget.end(ticket, ok=error is None)
        if error is None:
            self.bytes_sent += ticket.size
            return
        if not isinstance(error, TransportError):
            self._background_failed(error)
            return
        log.debug("send of %d bytes to %s failed: %s", ticket.size, effect.to, error)
        self.liveness.mark_down(effect.to)  # the next ping it answers brings it back
        self._handle(SendFailed(self._now(), effect.to, effect.message))

    def _prepared(self, peer: str, message: Message, protocol: str) -> tuple[bytes, SendTicket]:
        """``message``'s signed bytes for ``peer`` and the send's ticket (its timeout from
        the size and the bandwidth measured so far)."""
        data = self.signed_once.bytes_for(
            peer, message, protocol,
            lambda: encode(message, identity=self.identity, protocol=protocol, seq=self.seq.next()),
        )  # fmt: skip
        return data, self.send_budget.begin(peer, len(data))

    async def _send_bytes(self, peer: str, message: Message, protocol: str) -> None:
        data, ticket = self._prepared(peer, message, protocol)
        budget = self.send_budget
        task = asyncio.current_task()
        if task is not None:
            self._sends_in_flight.add(task)
        try:
            await self.transport.send(peer, data, timeout=ticket.timeout)
        except BaseException:  # a stalled transfer ends here: skipped for this peer
            budget.end(ticket, ok=False)
            log.debug("send of %d bytes to %s: not done within %.1fs", len(data), peer, ticket.timeout)
            raise
        finally:
            if task is not None:
                self._sends_in_flight.discard(task)
        budget.end(ticket, ok=True)
        self.bytes_sent += len(data)

    async def _flush_sends(self) -> None:
        """After the last round: let the sends still in flight finish (each ends by its own
        deadline), so that a neighbour still waiting for our last model on a slow link gets
        it instead of waiting out its round timer because we exited."""
        current = asyncio.current_task()
        pending = {task for task in self._sends_in_flight if task is not current and not task.done()}
        if self._soon_in_flight:
            pending.add(asyncio.ensure_future(self._no_soon_in_flight.wait()))
        if pending:
            await asyncio.wait(pending, timeout=self.send_budget.ceiling)
            for waiting in pending:  # (the wait for the protocol's sends, if it timed out)
                if waiting not in self._sends_in_flight:
                    waiting.cancel()

    async def _send_own(self, peer: str, message: Message) -> None:
        """One of the node's own messages (hello, unlink); raises ``TransportError``."""
        await self._send_bytes(peer, message, CONTROL)

    # -- receiving -----------------------------------------------------------------------
    def _on_transport_abuse(self, peer: str, reason: str) -> None:
        """A frame the transport refused (oversized, truncated, stalled, or bytes past the
        flow-control window): charged to the peer."""
        drop = DropReason.OVERSIZED if reason == DropReason.OVERSIZED else DropReason.TRUNCATED
        self.guard.record_drop(peer, drop, now=time.time(), detail=f"transport: {reason}")

    def _on_payload(self, sender: str, data: bytes) -> None:
        """Screen a payload (ban, rate, size, decode, signature, replay, round, kind) and
        hand it on. A payload larger than any message this node can use, or of a kind it
        does not take, is charged to its sender even while the node is still discovering:
        otherwise validly signed junk costs a sender nothing but rate."""
        protocol = self.protocol
        current = protocol.round if protocol is not None else 0
        dim = protocol.message_dim if protocol is not None else self.commons.message_dim
        declared = protocol_class(self.config.protocol)

        def takes(name: str, kind: str) -> bool:  # in any state, discovery included
            if name == CONTROL:
                return kind in (HELLO, UNLINK)
            if protocol is not None:
                return name == protocol.name and protocol.message_spec(kind) is not None
            return name == declared.name and kind in declared.messages

        try:
            envelope = self.guard.screen(
                sender,
                data,
                now=time.time(),
                current_round=current,
                limits=self.limits,
                layout_check=self._layout,
                # the widest codec (top-k: value and index) of the whole model, plus meta
                max_bytes=self.limits.message_bound(dim),
                known_kind=takes,
            )
        except WireError as error:
            log.debug("dropped a message from %s: %s", sender, error)
            return
        self.liveness.heard_from(sender)  # signed and fresh: alive, no ping needed now
        try:
            self._on_envelope(sender, envelope)
        except Exception as error:  # a bug or a message we cannot handle: not a hang
            self._message_failed(sender, envelope.message.kind, error)

    def _on_envelope(self, sender: str, envelope: Envelope) -> None:
        if envelope.protocol == CONTROL:
            if envelope.message.kind == HELLO:
                self._on_hello(sender, envelope.message.meta)
            elif envelope.message.kind == UNLINK:
                self._on_unlink(sender)
            return
        if self.protocol is None:  # still discovering: keep a few for the start
            if len(self._early) < EARLY_MESSAGES:
                self._early.append((sender, envelope))
            return
        self._route(sender, envelope)

    def _route(self, sender: str, envelope: Envelope) -> None:
        if not self._one_way(sender, envelope):
            self._deliver(sender, envelope)

    def _one_way(self, sender: str, envelope: Envelope) -> bool:
        """A neighbour's message from a met peer that is not our neighbour: it chose us
        and we did not choose it (our known peers differed). Tell it once, so that its
        rounds stop waiting for us; it is not charged for this first one."""
        protocol = self.protocol
        assert protocol is not None
        spec = protocol.message_spec(envelope.message.kind)
        if (
            spec is None
            or spec.sender is not Role.NEIGHBOUR
            or envelope.protocol != protocol.name
            or sender not in self.met
            or sender in self._told_unlink
            or protocol.has_role(Role.NEIGHBOUR, sender, envelope.message)
        ):
            return False
        self._told_unlink.add(sender)
        log.info("%s takes us as a neighbour, we do not take it: unlinking", sender)
        self._spawn(self._send_control(sender, UNLINK))
        return True

    async def _send_control(self, peer: str, kind: str) -> None:
        try:
            await self._send_own(peer, Message(kind, 0, None, {}))
        except TransportError as error:
            log.debug("%s to %s failed: %s", kind, peer, error)

    def _on_hello(self, sender: str, meta: dict[str, Any]) -> None:
        """A peer introduces itself (:meth:`Discovery.on_hello`); one we may have given up on
        is back (e.g. restarted)."""
        outcome = self.discovery.on_hello(sender, meta)
        if outcome == "malformed":
            self.guard.record_drop(
                sender, DropReason.BAD_TYPE, now=time.time(), detail="hello without addrs"
            )
            return
        if self.protocol is not None and sender not in self.unlinked:
            self._handle(PeerUp(self._now(), sender))
        elif outcome == "new":
            log.info("discovered %s (%d met, %d known)", sender, len(self.met), len(self.known))

    def _on_unlink(self, sender: str) -> None:
        """A neighbour does not take us as its neighbour: our rounds stop waiting for it."""
        if self.protocol is None or sender not in self.protocol.neighbours:
            return
        if sender not in self.unlinked:
            self.unlinked.add(sender)
            log.info("%s does not take us as a neighbour: not waiting for it", sender)
            self._handle(PeerDown(self._now(), sender))

    def _on_ban(self, ban: Ban) -> None:
        """A banned neighbour's models are refused: the round must not wait for them; the
        transport closes the peer's connections and reads nothing more of it until the
        ban ends."""
        log.warning("%s", ban.describe())
        self.transport.ban(ban.peer, ban.seconds)
        if self.protocol is not None and ban.peer in self.protocol.neighbours:
            # after the refusal that caused the ban has been counted, not inside it
            asyncio.get_running_loop().call_soon(self._handle, PeerDown(self._now(), ban.peer))

    def _deliver(self, sender: str, envelope: Envelope) -> None:
        assert self.protocol is not None
        if envelope.protocol != self.protocol.name:
            self.guard.record_drop(
                sender,
                DropReason.MALFORMED,
                now=time.time(),
                detail=f"protocol {envelope.protocol}",
            )
            return
        refusal = self.protocol.screen(sender, envelope.message)
        if refusal is not None:  # the protocol's message contract refuses it
            self.guard.record_drop(
                sender,
                DropReason(refusal.value),
                now=time.time(),
                detail=f"{envelope.protocol}.{envelope.message.kind}",
            )
            log.debug("refused a %s message from %s: %s", envelope.message.kind, sender, refusal)
            return
        self._handle(MessageReceived(self._now(), sender, envelope.message))

    # -- rounds, checkpoints, status -------------------------------------------------------
    def _on_round(self, finished: int, model: torch.Tensor) -> None:
        """Round ``finished`` is over, with ``model`` (``RoundCompleted.model``): evaluate
        it, checkpoint the protocol's state, write the status."""
        assert self.protocol is not None
        self.rounds_done = max(self.rounds_done, finished + 1)
        loss = None
        if finished % self.config.eval_every == 0 or finished + 1 >= self.config.rounds:
            result = evaluate(self.trainer, model, self.x_test, self.y_test)
            self.accuracy = float(result.accuracy[0])
            loss = float(result.loss[0])
        self._checkpoint()
        self._round_status(last=finished + 1 >= self.config.rounds)
        if self._tracker is not None:
            self._track(finished, loss)
        if log.isEnabledFor(logging.INFO):  # its figures cost a pass over guard and peers
            self._log_round(finished)
        if finished + 1 >= self.config.rounds:
            self._done.set()

    def _log_round(self, finished: int) -> None:
        assert self.protocol is not None
        log.info(
            "round %d  acc %s  neighbours %d/%d live  sent %.1f MB  drops %d",
            finished,
            f"{self.accuracy:.3f}" if self.accuracy is not None else "-",
            len(self._live_neighbours()),
            len(self.protocol.neighbours),
            self.bytes_sent / 1e6,
            sum(self.guard.drops().values()),
        )

    def _track(self, finished: int, loss: float | None) -> None:
        """The round's measurements as TensorBoard scalars at step ``finished`` (the round
        number of the log line); accuracy and loss only in rounds that evaluated (``loss``
        not None), so a curve never repeats a stale value."""
        assert self._tracker is not None and self.protocol is not None
        row: dict[str, Any] = {
            "round": finished,
            "neighbours": len(self.protocol.neighbours),
            "neighbours_live": len(self._live_neighbours()),
            "bytes_sent": self.bytes_sent,
            "drops": sum(self.guard.drops().values()),
            "errors": sum(self.errors.values()),
            **{f"counters/{name}": value for name, value in self.counters.items()},
        }
        if loss is not None:
            row["accuracy"], row["loss"] = self.accuracy, loss
        try:
            self._tracker(row)
        except OSError as error:  # a full disk costs the curves, not the run
            log.warning("tensorboard: cannot write round %d: %s", finished, error)

    def _checkpoint(self) -> None:
        """Save the state (``p2pfl.checkpoint``): every ``checkpoint_every`` rounds,
        serialised here (~0.1 ms) and written into a live record here (a copy into the page
        cache), or as a flushed generation in a worker thread every few seconds, so the
        event loop goes on receiving; on the way out (``_shutdown``) as a flushed
        generation before returning, so the last state is on disk when the process exits."""
        assert self.protocol is not None
        if not self._stopping and not self.disk.due(self.rounds_done):
            return
        state = {
            "protocol": self.protocol.state_dict(),
            "sampler": self.sampler.state_dict(),
            "neighbours": list(self.protocol.neighbours),
            "counters": self.counters,
            "rounds_done": self.rounds_done,
            "accuracy": self.accuracy,
            # the peers met only: a restart dials these, not every name heard of
            "known": self.discovery.saved(),
        }
        if self._stopping:
            self.disk.save_now(state)
        else:
            self.disk.save(state)

    def _state_files(self) -> StateDir:
        """Checkpoints verified against this node: its peer id, protocol, parameter count
        and data share (a checkpoint of another node or model is never resumed)."""
        sampler = self.sampler.state_dict()
        layout = Layout(
            peer_id=self.peer_id,
            protocol=protocol_class(self.config.protocol).name,
            dim=int(self.commons.start.numel()),
            sampler=(sampler["seed"], sampler["batch_size"], sampler["size"]),
        )
        return StateDir(self.state_dir, layout, every=self.config.checkpoint_every)

    def _open_checkpoint(self) -> dict[str, Any] | None:
        """At start: stale temporary files removed, then the newest checkpoint that is
        whole and this node's (the older generation if the newest is damaged), or none."""
        checkpoint = self.disk.open(fits=self._fits)
        if checkpoint is not None:  # the status written while discovering shows them
            self.rounds_done = int(checkpoint["rounds_done"])
            self.counters = dict(checkpoint.get("counters", {}))
            self.accuracy = checkpoint.get("accuracy")
        return checkpoint

    def _fits(self, checkpoint: dict[str, Any]) -> None:
        """Raises unless this node's protocol takes the saved state (tried on a throwaway
        protocol, so that a misfit falls back to the older generation, not a traceback)."""
        self._new_protocol(list(checkpoint["neighbours"])).load_state_dict(checkpoint["protocol"])

    def _already_finished(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """A finished run started again: say so, train nothing, leave status.json as the
        run left it."""
        log.warning(
            "this run is finished: %d of %d rounds done (checkpoint in %s); not training "
            "again (raise rounds to go on, or use another state dir to start afresh)",
            self.rounds_done,
            self.config.rounds,
            self.state_dir,
        )
        status = self.status()
        status["round"] = checkpoint["protocol"].get("round")
        status["state"] = "finished"
        return status

    def status(self) -> dict[str, Any]:
        protocol = self.protocol
        return {
            "peer_id": self.peer_id,
            "listen": list(self.transport.listen_addrs),
            "protocol": protocol.name if protocol else None,
            "round": protocol.round if protocol else None,
            "rounds_done": self.rounds_done,
            "rounds_target": self.config.rounds,
            "resumed_from": self.resumed_from,
            "accuracy": self.accuracy,
            "neighbours": list(protocol.neighbours) if protocol else [],
            "known_peers": sorted(self.known),
            "met_peers": sorted(self.met),
            "one_way_neighbours": sorted(self.unlinked),
            "peers_down": sorted(self.liveness.down),
            "connected": self.transport.connected_peers(),
            # per connected peer "direct" or "relayed"; whether this node is reachable
            "connections": self.transport.connection_kinds(),
            "reachability": self.transport.reachability(),
            "bytes_sent": self.bytes_sent,
            "counters": self.counters,
            "transport": self.transport.stats(),
            "guard": self.guard.status(),
            "uptime_s": time.time() - self.started_at,
            "attack": self._attack_status(),
            "errors": dict(self.errors),
            "failure": self.failure,
            "state": self._state(),
        }

    def _state(self) -> str:
        """The phase: discovering, training, then finished (all rounds), stopped (a
        signal, or stopped before the end) or failed (an error, too few peers)."""
        if self.failure is not None:
            return "failed"
        if self._ended:
            return "finished" if self.rounds_done >= self.config.rounds else "stopped"
        return "training" if self.protocol is not None else "discovering"

    def _round_status(self, *, last: bool) -> None:
        """status.json after a round: at once when the last write is ``STATUS_EVERY`` old
        (or this round is the run's last), else once it is. A slow round is reported as
        it ends; fast ones (a digits round takes milliseconds) share a write, so that the
        report does not cost the event loop more than the round's own learning."""
        later = self._status_later
        if last or time.monotonic() - self._status_at >= STATUS_EVERY:
            if later is not None:
                later.cancel()
                self._status_later = None
            self._write_status()
        elif later is None:
            wait = self._status_at + STATUS_EVERY - time.monotonic()
            self._status_later = asyncio.get_running_loop().call_later(wait, self._late_status)

    def _late_status(self) -> None:
        self._status_later = None
        if not self._ended:
            self._write_status()

    def _write_status(self, *, final: bool = False) -> None:
        self._status_at = time.monotonic()
        status = self.status()  # its "state" says which phase (final: how it ended)
        self.disk.write_json(STATUS_NAME, status)  # a full disk is logged, not raised


def _event_source(event: Event) -> str:
    """The ``errors`` key of an exception raised while handling ``event``."""
    if isinstance(event, TimerFired):
        return "timer"
    if isinstance(event, TrainingDone):
        return "training"
    return type(event).__name__.lower()
