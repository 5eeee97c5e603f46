"""Fail fast, in one line, where our code relies on a library's private internals.

A few modules reach below a library's public API for speed or to fix a fault
(``p2pfl.transport._yamux`` patches py-libp2p's yamux and Noise; ``sim.mixing`` calls a
private torch context manager and scipy's sparse kernel). Such internals change without
notice, and the failure would show up far away (a hang on the wire, a wrong product).
Those modules call :func:`require` at import instead: an installed version outside the
range they were written and tested against stops the import with one line naming it.
"""

from __future__ import annotations

from importlib import metadata

from p2pfl.errors import P2PFLError

__all__ = ["UnsupportedVersion", "require"]


class UnsupportedVersion(P2PFLError, ImportError):
    """An installed library's version is not one whose internals we were written for."""


def _release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``: the numeric release part of a version."""
    parts = []
    for piece in version.split("+", 1)[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits or digits != piece:
            if digits and piece.startswith(digits):
                parts.append(int(digits))
            break
        parts.append(int(digits))
    return tuple(parts)


def require(
    distribution: str, *, at_least: str, below: str, why: str, installed: str | None = None
) -> str:
    """Check that ``at_least <= version < below`` for an installed ``distribution``.

    ``why`` names what relies on it (it goes into the error). Returns the version found.
    ``installed`` overrides the lookup (tests).
    """
    version = installed if installed is not None else metadata.version(distribution)
    if not _release(at_least) <= _release(version) < _release(below):
        raise UnsupportedVersion(
            f"{why} relies on {distribution} internals: expected {distribution} >= {at_least}, "
            f"< {below}, found {version}"
        )
    return version
