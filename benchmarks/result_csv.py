"""Re-drawing a benchmark's plot from its results CSV alone (``--plot CSV``).

Every benchmark writes a PNG beside its CSV; when the CSV is all that is left (a result
committed before its script drew plots, or a plot to re-draw after a change of style), the
script's ``--plot`` mode reads the CSV back and draws again, running nothing. What a
results CSV must hold to be drawn, and the one-line refusal when it does not, are the same
for every script: here.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Rows = list[dict[str, str]]


def read_result_rows(path: Path, columns: Sequence[str], what: str) -> Rows | str:
    """The rows of ``path``, or the one-line reason it is not ``what`` (a file that cannot
    be read, no rows, or rows without every one of ``columns``)."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        return f"cannot read {path}: {error.strerror}"
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        detail = f"missing: {', '.join(missing)}" if missing else "it has none"
        return f"{path} needs the rows of {what}, columns {', '.join(columns)} ({detail})"
    return rows


def replot(path: Path, rows: Rows | str, draw: Callable[[Rows, Path], None]) -> int:
    """Draw ``rows`` (from :func:`read_result_rows`) into the PNG beside ``path``; the exit
    status: 0, or 2 with one line on stderr when the rows could not be read or drawn (a
    value that is not a number, a column of the wrong kind)."""
    if isinstance(rows, str):
        print(f"error: --plot: {rows}", file=sys.stderr)
        return 2
    png = path.with_suffix(".png")
    try:
        draw(rows, png)
    except (ValueError, KeyError, StopIteration) as error:
        print(f"error: --plot: {path}: cannot be drawn ({error!r})", file=sys.stderr)
        return 2
    print(f"wrote {png}")
    return 0
