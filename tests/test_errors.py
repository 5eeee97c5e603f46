"""One error base: every exception class the project defines derives from ``P2PFLError``."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
from pathlib import Path

import pytest

import p2pfl
from p2pfl.config import ConfigError
from p2pfl.errors import P2PFLError
from topologies.errors import TopologyError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("p2pfl", "sim", "topologies")
BUILTIN_EXCEPTIONS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


@pytest.mark.parametrize("module", _modules())
def test_every_exception_class_derives_from_the_base(module: str) -> None:
    loaded = importlib.import_module(module)
    outside = [
        name
        for name, value in vars(loaded).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module
        and not issubclass(value, P2PFLError)
    ]
    assert outside == []


def test_no_class_anywhere_derives_from_a_builtin_exception_alone() -> None:
    """Also classes made inside functions, which importing the module does not show."""
    bad = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                if bases and bases <= BUILTIN_EXCEPTIONS and node.name != "P2PFLError":
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert bad == []


def test_errors_keep_their_standard_bases() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(TopologyError, ValueError)
    with pytest.raises(P2PFLError):
        raise TopologyError("a graph error is a project error")


def test_the_base_is_public() -> None:
    assert p2pfl.P2PFLError is P2PFLError
