"""Names of a package loaded on first use (PEP 562), for every package of the project.

``import p2pfl``, ``import sim``, ``import topologies`` must stay cheap: a node's command
line should not load torch's simulator parts, and ``topologies`` not matplotlib. Each
package lists its public names with the module defining each, and gets its module-level
``__getattr__`` and ``__dir__`` from :func:`lazy_exports`. It lives in ``topologies``,
the lowest layer, so that every package may use it (topologies imports nothing of ours).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a name to the
    module that defines it; a name is imported on first access, then kept."""
    listed = sorted(public)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return listed

    return __getattr__, __dir__
