"""The event loop a node (or relay) runs on: uvloop where it is installed, asyncio's own
otherwise.

A node's asyncio thread spends a fifth of its CPU in the loop itself: a pass per
callback batch (~11 a digits round), a self-pipe wake-up for each hand-off from the trio
and training threads, and a task per send. uvloop runs that machinery in C (libuv). In
one cluster of 5 digits peers, the peers on uvloop spent 0.10-0.20 ms less CPU a round
than the peers on asyncio's loop beside them, in each of 8 runs (issue 17,
BENCHMARKS.md). Nothing else changes: the protocol sees the same events, the transport
the same calls. uvloop's clock has a resolution of one millisecond, which no protocol
timer needs finer.

``event_loop`` in the node's config picks: ``"auto"`` (default) uvloop where it can be
imported (it is a dependency on Linux and macOS) and asyncio's loop otherwise,
``"uvloop"`` uvloop or a start-up error, ``"asyncio"`` asyncio's loop always.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def uvloop_available() -> bool:
    """Whether uvloop can be imported here (it is not built for Windows)."""
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: EventLoopChoice) -> LoopFactory | None:
    """The factory of the loop ``choice`` names; ``None``: asyncio's default loop.

    Raises ``ModuleNotFoundError`` for ``"uvloop"`` where it is not installed (start-up
    checks this first and says so in one line: ``p2pfl.startup``)."""
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return None
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: the kind of the running loop (for the node's log)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
