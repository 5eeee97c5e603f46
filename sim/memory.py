"""How much parameter memory the batched simulator reserves, and handing freed heap back.

Two small policies kept apart from the executor so that they can be read (and tested) on
their own: the size of the arena's buffer, and asking the C allocator to return freed
heap pages to the operating system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

#: extra chunks of rows beyond two rounds: room for blocks that do not pack tightly, so
#: that first fit rarely opens a second buffer (whose sources cost a product more)
SLACK_CHUNKS = 2


def arena_rows(peers: int, chunk: int, *, row_bytes: int = 0) -> int:
    """Rows in the arena's buffer: room for three rounds of results, plus slack.

    A peer's trained row lives until its neighbours have mixed it and trained from the
    mix (the next round), and a mean that was trained from keeps reading its rows until
    its peer finishes that round; when rounds overlap (messages queued on uplinks make
    some peers finish a round while others already train the next) rows of three rounds
    are alive at once. The buffer is allocated untouched: rows never handed out cost no
    memory, so the room is only address space -- kept within half the machine's memory
    (``row_bytes``: the size of one row), so that the allocation itself never fails.
    One buffer, not several: a mean whose rows sit in two buffers costs two products.
    """
    wanted = 3 * peers + SLACK_CHUNKS * max(chunk, 1)
    if row_bytes > 0:
        fits = physical_memory() // 2 // row_bytes
        if fits > 0:
            wanted = min(wanted, max(fits, 2 * peers + SLACK_CHUNKS * max(chunk, 1)))
    return wanted


def physical_memory() -> int:
    """Bytes of physical memory (0 where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``); whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
