"""Ending a stream that is being given up: from any scope, bounded, never raising.

Shared by the transport's own streams (``libp2p``) and the services it patches
(``_dht``): a stream dropped because its time or its peer's share ran out must end
even when the task dropping it is being cancelled, and must not wait on a peer that
stopped reading.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

__all__ = ["close_quietly", "reset_quietly"]

#: the longest an ending may wait (a reset or FIN queued behind a full socket)
END_TIMEOUT = 1.0


async def reset_quietly(stream: Any) -> None:
    """Reset ``stream``, even from inside a cancelled scope, without ever raising."""
    await _discard(stream.reset)


async def close_quietly(stream: Any) -> None:
    """Close ``stream`` (our FIN), even from inside a cancelled scope, without ever raising."""
    await _discard(stream.close)


async def _discard(end: Callable[[], Awaitable[None]]) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(END_TIMEOUT):
        try:
            await end()
        except Exception:  # noqa: BLE001 - the stream is being discarded anyway
            pass
