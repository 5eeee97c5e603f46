"""JSON that every reader accepts: no ``NaN`` or ``Infinity``.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` for non-finite floats by
default, which is not JSON (RFC 8259): a JavaScript or Go reader fails on the whole file.
A loss or an accuracy can be non-finite (a diverged model, a free rider's NaN loss), so
every file and line of JSON the project writes (``status.json``, ``summary.json``, the
node's last line) goes through :func:`dumps`, which writes ``null`` for them instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["dumps", "finite"]


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by ``None``.

    Dicts, lists and tuples are copied (tuples become lists, as JSON has no tuples);
    numpy scalars become Python numbers first; anything else is returned as it is.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, *, indent: int | None = None, default: Any = str) -> str:
    """``json.dumps`` of :func:`finite` ``(value)``, refusing any non-finite float left.

    ``default`` converts what JSON has no type for (paths, enums...): ``str`` unless given.
    """

    def convert(item: Any) -> Any:  # what ``default`` makes of it is made finite too
        return finite(default(item))

    return json.dumps(finite(value), indent=indent, default=convert, allow_nan=False)
