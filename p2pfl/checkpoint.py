"""Atomic checkpoints of a node's state, so a killed node resumes where it was.

A checkpoint is written to a temporary file in the same directory, flushed to disk and
renamed over the previous one: a crash at any moment leaves either the old or the new
checkpoint, never a torn one. ``torch.load`` runs with ``weights_only=True`` -- a
checkpoint holds tensors and plain data only -- so a tampered file cannot run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state_dir: Path, state: dict[str, Any]) -> Path:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = state_dir / CHECKPOINT_NAME
    write_atomic(path, buffer.getvalue())
    return path


def load_checkpoint(state_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint in ``state_dir``, or ``None`` if there is none."""
    path = state_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    return torch.load(path, weights_only=True)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, default=str) + "\n").encode())
