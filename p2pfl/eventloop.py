"""The event loop a node (or relay) runs on: uvloop where it is installed, asyncio's own
otherwise.

A node's asyncio thread makes ~11 passes of its loop a digits round, each a select and a
batch of callbacks, and is woken through the loop's self-pipe for each hand-off from the
trio and training threads. uvloop runs that machinery in C (libuv). In one cluster of 5
digits peers, the peers on uvloop spent 0.09-0.31 ms less CPU a round than the peers on
asyncio's loop beside them, in each of 14 runs (median -0.12 ms, 2%; issue 17,
BENCHMARKS.md, ``node_footprint.py --compare --mixed``). Nothing else changes: the
protocol sees the same events, the transport the same calls. uvloop's clock has a
resolution of one millisecond, which no protocol timer needs finer.

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
