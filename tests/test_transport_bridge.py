"""The asyncio <-> trio bridge under the libp2p transport."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import trio

from p2pfl.transport import _trio_bridge
from p2pfl.transport._trio_bridge import BridgeClosed, TrioThread
from tests.transport_kit import running_trio_thread

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def bridge() -> Iterator[TrioThread]:
    yield from running_trio_thread("p2pfl-trio-test")


async def test_results_and_errors_cross_over(bridge: TrioThread) -> None:
    async def on_trio(x: int) -> tuple[int, bool]:
        await trio.sleep(0)
        return x * 2, threading.current_thread() is not threading.main_thread()

    assert await bridge.run(on_trio, 21) == (42, True)

    async def fails() -> None:
        raise ValueError("from trio")

    with pytest.raises(ValueError, match="from trio"):
        await bridge.run(fails)
    assert bridge.run_sync(lambda: trio.lowlevel.current_trio_token() is not None)


async def test_cancelling_the_asyncio_side_cancels_the_trio_side(bridge: TrioThread) -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    task = asyncio.ensure_future(bridge.run(forever))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(cancelled.wait, 5)


async def test_a_stopped_loop_refuses_calls_and_fails_pending_ones() -> None:
    thread = TrioThread(name="p2pfl-trio-test")
    thread.start()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await trio.sleep_forever()

    pending = asyncio.ensure_future(thread.run(forever))
    await asyncio.to_thread(started.wait, 5)
    await asyncio.to_thread(thread.stop)
    with pytest.raises(BridgeClosed):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(BridgeClosed):
        await thread.run(trio.sleep, 0)
    with pytest.raises(BridgeClosed):
        thread.run_sync(lambda: None)
    assert not thread.running


async def test_shared_thread_lives_while_used() -> None:
    first = _trio_bridge.acquire()
    second = _trio_bridge.acquire()
    assert first is second and first.running
    _trio_bridge.release(first)
    assert second.running
    _trio_bridge.release(second)
    assert not second.running
    assert not [t for t in threading.enumerate() if t.name == "p2pfl-trio"]
