"""Run folders that never collide, and the record of how a run was asked for.

Two runs started in the same second used to share one folder, the second silently
overwriting the first. A folder is now *claimed* with ``mkdir(exist_ok=False)``, which
the file system makes atomic: whoever loses the race takes the next suffix (``-2``,
``-3``...). The name says what differs between runs of one scenario: its seed and its
``--set`` overrides (shortened, with a hash when long), then a UTC time stamp.

A :class:`Provenance` is what the resolved ``config.toml`` cannot say by itself: the
scenario file it came from and every override, in the order given. It is written as
comment lines at the top of ``config.toml`` (which still loads as a scenario) and as
fields of ``summary.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError

__all__ = [
    "MAX_SUFFIX",
    "Provenance",
    "RunFolderError",
    "claim_folder",
    "claim_run_dir",
    "ensure_folder",
    "overrides_label",
    "prepare_out_dir",
    "safe_name",
]

#: bounded search for a free name: more runs than this in one second is a bug elsewhere
MAX_SUFFIX = 10_000
#: overrides in a folder name are cut here (a hash of all of them keeps it unique)
MAX_LABEL = 48
#: a scenario's name is cut here in its folder's name: a file name has at most 255 bytes
#: (a 300-character name made the run fail with "File name too long")
MAX_NAME = 80
#: keys left out of the folder name: the name shows the seed already; the output folder is its parent
_UNNAMED_KEYS = {"seed", "sim.output_dir"}


class RunFolderError(P2PFLError, ValueError):
    """A run folder that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class Provenance:
    """How a run was asked for: the scenario file (if any) and the overrides, in order."""

    source: str | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def with_override(self, item: str) -> Provenance:
        return Provenance(self.source, (*self.overrides, item))

    def as_dict(self) -> dict[str, Any]:
        return {"scenario_file": self.source, "overrides": list(self.overrides)}

    def header(self) -> str:
        """Comment lines for the top of ``config.toml`` (TOML ignores them)."""
        lines = ["# resolved scenario of this run: every default filled in, every override applied"]
        if self.source is not None:
            lines.append(f"# scenario file: {self.source}")
        lines.extend(f"# --set {item}" for item in self.overrides)
        if not self.overrides:
            lines.append("# no overrides")
        return "\n".join(lines) + "\n\n"


def safe_name(text: str) -> str:
    """``text`` with anything but letters, digits, ``.``, ``_``, ``=`` and ``-`` made ``-``."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-.") or "run"


def overrides_label(overrides: Sequence[str]) -> str:
    """A short, file-safe label of the overrides: ``rounds=5+local_steps=2`` (last key part).

    Empty when there are none (or only the seed's). Longer than ``MAX_LABEL`` it is cut
    and a hash of the full list is added, so different overrides never share a label.
    """
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key in _UNNAMED_KEYS:
            continue
        parts.append(safe_name(f"{key.rsplit('.', 1)[-1]}={value.strip()}"))
    label = "+".join(parts)
    if len(label) > MAX_LABEL:
        digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:6]
        label = f"{label[: MAX_LABEL - 7].rstrip('+-')}~{digest}"
    return label


def claim_folder(parent: Path, base: str) -> Path:
    """Create and return ``parent/base``, or ``base-2``, ``base-3``...: the first free one.

    ``mkdir(exist_ok=False)`` is atomic, so concurrent callers (threads or processes)
    never get the same folder.
    """
    ensure_folder(parent)
    for index in range(1, MAX_SUFFIX + 1):
        candidate = parent / (base if index == 1 else f"{base}-{index}")
        try:
            candidate.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        except OSError as error:
            raise RunFolderError(_cannot_create(candidate, error)) from None
        return candidate
    raise RunFolderError(f"{parent}: {MAX_SUFFIX} folders named {base!r} already exist")


def claim_run_dir(
    parent: str | Path,
    name: str,
    *,
    tag: str,
    overrides: Sequence[str] = (),
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Path:
    """A fresh folder ``<parent>/<name>-<tag>[-<overrides>]-<UTC stamp>[-k]`` (e.g. tag ``s1``)."""
    label = overrides_label(overrides)
    stamp = clock().strftime("%Y%m%d-%H%M%S")
    pieces = [safe_name(name)[:MAX_NAME].rstrip("-.") or "run", tag, label, stamp]
    return claim_folder(Path(parent), "-".join(piece for piece in pieces if piece))


#: a folder holding one of these holds a run, a seed group or a sweep: not an --out to reuse
_RUN_FILES = ("metrics.csv", "summary.json", "group.json", "results.csv")


def prepare_out_dir(path: str | Path) -> Path:
    """A folder the user named (``--out``): created if missing, refused if it holds a run."""
    path = Path(path)
    if path.is_dir():
        taken = [name for name in _RUN_FILES if (path / name).exists()]
        if taken:
            raise RunFolderError(
                f"{path}: already holds a run ({taken[0]}); choose another --out or remove it"
            )
    ensure_folder(path)  # a file there: "exists and is not a folder"
    return path


def _cannot_create(path: Path, error: OSError) -> str:
    return f"{path}: cannot create this folder ({error.strerror or error}); expected a writable folder"


def ensure_folder(path: Path) -> None:
    """``mkdir -p``, its failure (a file on the way, no permission, a read-only file
    system) one line naming the folder instead of a traceback."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(_cannot_create(path, error)) from None
    if not os.access(path, os.W_OK | os.X_OK):  # an existing folder someone else owns
        raise RunFolderError(f"{path}: cannot write in this folder (permission denied); expected a writable folder")
