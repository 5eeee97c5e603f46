"""Give the calling thread its Python name at the operating-system level too.

Python names its threads for itself only; ``top -H``, ``/proc/<pid>/task/*/comm`` and
``benchmarks/node_footprint.py`` (CPU per thread of a running node) see the kernel's name,
which is otherwise the executable's for every thread. Linux keeps 15 bytes of it.
Elsewhere, or if libc cannot be loaded, this does nothing: the name is a convenience.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["name_os_thread"]

_PR_SET_NAME = 15  # <linux/prctl.h>


def name_os_thread(name: str | None = None) -> None:
    """Set the kernel's name of the calling thread (default: its Python name)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        label = (name or threading.current_thread().name).encode()[:15]
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(label), 0, 0, 0)
    except (OSError, AttributeError):
        pass
