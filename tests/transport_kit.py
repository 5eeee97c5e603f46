"""What the transport tests share: an inbox to await payloads, a bounded poll, and
libp2p transports with NAT settings that are closed when the test ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pfl.transport._nat import NatSettings
from p2pfl.transport._trio_bridge import TrioThread
from p2pfl.transport.libp2p import Libp2pTransport

Factory = Callable[..., Awaitable[Libp2pTransport]]
#: ``factory(key_pair=None, **options)`` -> a started transport and the inbox it delivers to
InboxFactory = Callable[..., Awaitable[tuple[Libp2pTransport, "Inbox"]]]


class Inbox:
    """Collects (sender, payload) pairs from a handler and lets a test await them (a
    frame handler's payloads are bytes, an abuse handler's ``FrameAbuse`` reports)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def __call__(self, sender: str, data: Any) -> None:
        self.queue.put_nowait((sender, data))

    async def get(self, timeout: float = 10.0) -> tuple[str, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy (bounded by ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def nat_transports(**defaults: Any) -> AsyncIterator[Factory]:
    """A fixture body: ``factory(inbox=None, **nat)`` starts a libp2p transport with
    ``NatSettings(**(defaults | nat))``; every one started is closed afterwards, newest
    first."""
    created: list[Libp2pTransport] = []

    async def factory(inbox: Inbox | None = None, **nat: Any) -> Libp2pTransport:
        transport = Libp2pTransport(create_new_key_pair(), nat=NatSettings(**(defaults | nat)))
        if inbox is not None:
            transport.set_handler(inbox)
        created.append(transport)
        await transport.start()
        return transport

    yield factory
    for transport in reversed(created):
        await transport.close()


def nat_transports_fixture(**defaults: Any) -> Any:
    """A module's ``make`` fixture over :func:`nat_transports` with ``defaults``:
    ``make = nat_transports_fixture(punch_grace=60.0)`` (one line, not one fixture
    written out per module)."""

    @pytest.fixture
    async def make() -> AsyncIterator[Factory]:
        async for factory in nat_transports(**defaults):
            yield factory

    return make


async def inbox_transports() -> AsyncIterator[InboxFactory]:
    """A fixture body: ``factory(key_pair=None, **options)`` starts a libp2p transport on
    /tcp/0 delivering to a new ``Inbox``; every one started is closed afterwards."""
    created: list[Libp2pTransport] = []

    async def factory(key_pair: Any = None, **options: Any) -> tuple[Libp2pTransport, Inbox]:
        transport = Libp2pTransport(key_pair or create_new_key_pair(), **options)
        inbox = Inbox()
        transport.set_handler(inbox)
        created.append(transport)
        await transport.start()
        return transport, inbox

    yield factory
    for transport in created:
        await transport.close()


def running_trio_thread(name: str) -> Iterator[TrioThread]:
    """A fixture body: a started ``TrioThread``, stopped afterwards."""
    thread = TrioThread(name=name)
    thread.start()
    yield thread
    thread.stop()
