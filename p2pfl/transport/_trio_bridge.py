"""One trio event loop in a daemon thread, callable from asyncio.

py-libp2p runs on trio only, while the node runs on asyncio.  Running trio as a
guest of the asyncio loop stalls the network whenever the asyncio thread is busy
(training), so trio gets a thread of its own.  Calls cross in both directions
without blocking either loop: asyncio -> trio through the trio token's
``run_sync_soon``, trio -> asyncio through ``loop.call_soon_threadsafe``.

Hand-offs are batched: calls made in one direction while the other thread has not yet
picked up the previous ones join them, and the receiving loop is woken once per batch
(a message round of a node sends and receives several models at once, and each wake-up
is a socket write, an epoll return and a pass of the woken loop). Order is kept within
each direction.

The loop is shared by every transport of the process: ``acquire`` starts it on
first use and ``release`` stops and joins it when the last user lets go.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from p2pfl.errors import P2PFLError
from p2pfl.threadname import name_os_thread

__all__ = [
    "BridgeCall",
    "BridgeClosed",
    "TrioThread",
    "acquire",
    "release",
    "resolve",
    "to_asyncio",
]

T = TypeVar("T")

_log = logging.getLogger(__name__)


class BridgeClosed(P2PFLError, RuntimeError):
    """The trio loop is not running (never started, stopped, or crashed)."""


class BridgeCall:
    """One asyncio -> trio call: spawned as a trio task, its outcome handed back to the
    asyncio loop (``outcome(result, error)``: an awaiting future's, or a caller's callback);
    lets asyncio cancel the trio side of it.

    One object per call (no closures): a node makes a few of these a round per neighbour.

    With ``now``, the call is first offered to ``now(call)`` on the trio thread: if that
    takes it (true), it owns the call -- it delivers the outcome exactly once, and sets
    ``on_cancel`` to hear of a cancel from asyncio -- and no task is spawned.
    """

    __slots__ = (
        "args",
        "cancel_requested",
        "fn",
        "loop",
        "now",
        "on_cancel",
        "outcome",
        "owner",
        "scope",
        "timeout",
    )

    def __init__(
        self,
        owner: TrioThread,
        loop: asyncio.AbstractEventLoop,
        outcome: Callable[[Any, BaseException | None], None],
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        timeout: float | None,
    ) -> None:
        self.owner = owner
        self.loop = loop
        self.outcome = outcome
        self.fn = fn
        self.args = args
        self.timeout = timeout
        self.scope: trio.CancelScope | None = None
        self.cancel_requested = False
        self.now: Callable[[BridgeCall], bool] | None = None
        self.on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:  # runs on the trio thread
        self.cancel_requested = True
        if self.scope is not None:
            self.scope.cancel()
        elif self.on_cancel is not None:
            self.on_cancel()

    def deliver(self, result: Any, error: BaseException | None) -> None:
        # false when the asyncio loop is closed: nobody is waiting any more
        to_asyncio(self.loop, self.outcome, result, error)

    def spawn(self) -> None:  # runs on the trio thread; must not raise
        now = self.now
        if now is not None and not self.cancel_requested:
            try:
                if now(self):
                    return
            except Exception:  # a bug there must not lose the call: the task does it
                _log.exception("a call's direct attempt failed; running it as a task")
        self.start_task()

    def start_task(self) -> None:  # runs on the trio thread; must not raise
        """Run ``fn(*args)`` as a task under ``timeout`` (also for an owner that took the
        call and hands it on, with ``fn``, ``args`` and ``timeout`` set anew)."""
        nursery = self.owner._nursery
        try:
            if nursery is None:
                raise BridgeClosed("trio loop is not running")
            # named here: trio would otherwise derive a name from ``run`` per call
            nursery.start_soon(self.run, name="p2pfl-bridge-call")
        except (BridgeClosed, RuntimeError):  # no nursery, or closed to new tasks
            self.deliver(None, BridgeClosed("trio loop is not running"))

    async def run(self) -> None:
        timeout = self.timeout
        if timeout is None:
            scope = trio.CancelScope()
        else:
            scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        self.scope = scope
        if self.cancel_requested:
            scope.cancel()
        try:
            with scope:
                result = await self.fn(*self.args)
                self.deliver(result, None)
                return
            if self.cancel_requested or timeout is None:
                self.deliver(None, asyncio.CancelledError())
            else:  # its deadline passed
                self.deliver(None, trio.TooSlowError())
        except Exception as exc:
            self.deliver(None, exc)
        except BaseException:  # the whole loop is being cancelled
            self.deliver(None, BridgeClosed("trio loop stopped during the call"))
            raise


class _Batch:
    """Calls for one receiving loop, run there in order with one wake-up per batch.

    ``put`` may be called from any thread; ``wake`` schedules ``drain`` on the receiving
    loop, and is called only when the batch goes from empty to non-empty, so calls that
    arrive while a drain is pending (or running) ride along with it.
    """

    __slots__ = ("_armed", "_items", "_lock", "_wake", "__weakref__")

    def __init__(self, wake: Callable[[Callable[[], None]], object]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._armed = False

    def put(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Queue ``fn(*args)``; whatever ``wake`` raises (loop gone) is raised here."""
        with self._lock:
            self._items.append((fn, args))
            if self._armed:
                return
            self._armed = True
        try:
            self._wake(self.drain)
        except BaseException:
            with self._lock:  # nobody will drain: forget what cannot be delivered
                self._items.clear()
                self._armed = False
            raise

    def drain(self) -> None:
        """Run every queued call (on the receiving loop), new arrivals included."""
        while True:
            with self._lock:
                if not self._items:
                    self._armed = False
                    return
                batch = list(self._items)
                self._items.clear()
            for fn, args in batch:
                try:
                    fn(*args)
                except Exception:  # one failed call must not cost the others
                    _log.exception("a call handed over by the trio bridge failed")


#: trio -> asyncio batches, one per asyncio loop (weak: a closed loop is forgotten)
_to_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batch] = weakref.WeakKeyDictionary()
_to_loop_lock = threading.Lock()


def to_asyncio(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Schedule ``fn(*args)`` on ``loop`` from any thread, batched with other hand-offs
    to it (order kept); false if that loop is closed."""
    batch = _to_loop.get(loop)
    if batch is None:
        with _to_loop_lock:
            batch = _to_loop.get(loop)
            if batch is None:
                batch = _to_loop[loop] = _Batch(loop.call_soon_threadsafe)
    try:
        batch.put(fn, args)
    except RuntimeError:  # the asyncio loop is closed
        return False
    return True


def resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """A call's outcome into ``future`` (on its loop), unless it was cancelled meanwhile."""
    if future.done():  # cancelled on the asyncio side meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class TrioThread:
    """A trio loop running in its own thread, with a nursery for long-lived tasks."""

    def __init__(self, name: str = "p2pfl-trio") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._crash: BaseException | None = None
        #: asyncio -> trio calls, one trio wake-up per batch (``call_soon``)
        self._inbox: _Batch | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._token is not None

    @property
    def nursery(self) -> trio.Nursery:
        """The loop's root nursery; only to be used from the trio thread."""
        if self._nursery is None:
            raise BridgeClosed("trio loop is not running")
        return self._nursery

    def start(self, timeout: float = 10.0) -> None:
        """Start the thread and wait (briefly, blocking) until its loop accepts calls."""
        if self._thread is not None:
            raise RuntimeError("TrioThread can be started only once")
        self._thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._token is None:
            raise BridgeClosed(f"trio loop did not start: {self._crash!r}")

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every task on the loop and join the thread."""
        token, nursery, thread = self._token, self._nursery, self._thread
        if token is not None and nursery is not None:
            try:
                token.run_sync_soon(nursery.cancel_scope.cancel)
            except trio.RunFinishedError:
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                _log.warning("trio thread did not finish within %.1fs", timeout)

    def _thread_main(self) -> None:
        name_os_thread()
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # noqa: BLE001 - reported, the thread just ends
            self._crash = exc
            _log.exception("trio loop crashed")
        finally:
            self._token = None
            self._nursery = None
            self._ready.set()

    async def _trio_main(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                token = trio.lowlevel.current_trio_token()
                self._inbox = _Batch(token.run_sync_soon)
                self._token = token
                self._ready.set()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function on the trio thread (fire and forget); calls made
        before the trio thread picks up the first share one wake-up, and run in order."""
        token, inbox = self._token, self._inbox
        if token is None or inbox is None:
            raise BridgeClosed("trio loop is not running")
        try:
            inbox.put(fn, args)
        except trio.RunFinishedError as exc:
            raise BridgeClosed("trio loop has finished") from exc

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the trio thread and wait (blocking) for its result.

        For quick reads of trio-owned state from another thread; never call it from
        the trio thread itself.
        """
        token = self._token
        if token is None:
            raise BridgeClosed("trio loop is not running")
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=token)
        except trio.RunFinishedError as exc:
            raise BridgeClosed("trio loop has finished") from exc

    async def run(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        timeout: float | None = None,
        now: Callable[[BridgeCall], bool] | None = None,
    ) -> T:
        """Await ``fn(*args)`` run on the trio loop, from a coroutine on an asyncio loop.

        Cancelling the awaiting asyncio task cancels the trio task.  An exception from
        ``fn`` is re-raised here; a trio loop that stops meanwhile raises ``BridgeClosed``.
        With ``timeout``, the trio task is cancelled that many seconds after it starts and
        ``trio.TooSlowError`` raised here (as ``trio.fail_after`` in ``fn`` would, without
        a second cancel scope per call). With ``now``, the call is first offered to it
        on the trio thread (see ``BridgeCall``): the same outcomes, without a task when taken.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        call = self.start_call(
            fn, *args, timeout=timeout, now=now, outcome=functools.partial(resolve, future)
        )
        return await self.outcome_of(call, future)

    async def outcome_of(self, call: BridgeCall, future: asyncio.Future[T]) -> T:
        """Await ``future``, which ``call``'s outcome settles (``resolve``); cancelling the
        awaiting asyncio task cancels the call's trio side."""
        try:
            return await future
        except asyncio.CancelledError:
            try:
                self.call_soon(call.cancel)
            except BridgeClosed:
                pass
            raise

    def start_call(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        timeout: float | None = None,
        now: Callable[[BridgeCall], bool] | None = None,
        outcome: Callable[[Any, BaseException | None], None],
    ) -> BridgeCall:
        """``run`` without awaiting: returns at once (from the asyncio loop), and
        ``outcome(result, error)`` is called on that loop when the call ends -- exactly
        once, ``error`` what ``run`` would raise. Raises ``BridgeClosed`` if the trio loop
        is not running. For callers that need no task of their own per call."""
        call = BridgeCall(self, asyncio.get_running_loop(), outcome, fn, args, timeout)
        call.now = now
        self.call_soon(call.spawn)
        return call


_shared: TrioThread | None = None
_users = 0
_shared_lock = threading.Lock()


def acquire() -> TrioThread:
    """The process-wide trio thread, started if needed; pair with ``release``."""
    global _shared, _users
    with _shared_lock:
        if _shared is None or not _shared.running:
            thread = TrioThread()
            thread.start()
            _shared, _users = thread, 0
        _users += 1
        return _shared


def release(thread: TrioThread) -> None:
    """Give back a thread from ``acquire``; the last user stops and joins it."""
    global _shared, _users
    with _shared_lock:
        if thread is not _shared:
            thread.stop()
            return
        _users -= 1
        if _users > 0:
            return
        _shared, _users = None, 0
    thread.stop()
