"""Imports run one way (DESIGN.md, "Dependency direction").

Two kinds of checks: the import statements of each file, read with ``ast`` (every import,
also inside functions, except those under ``if TYPE_CHECKING:``, which never run), and
what a fresh interpreter has loaded after importing a package (which also sees what
comes in through third parties and package ``__init__`` files).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for sub in ast.iter_child_nodes(node):
            visit(sub)

    visit(tree)
    return found


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _offenders(package: str, *forbidden: str) -> dict[str, list[str]]:
    bad = {}
    for path in _files(package):
        hits = sorted(m for m in _imports(path) if _under(m, *forbidden))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def _loaded_after(*modules: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after importing ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def _submodules(package: str, *skip: str) -> list[str]:
    return [m for m in map(_module_name, _files(package)) if not _under(m, *skip)]


# ------------------------------------------------------------------------------ statements


def test_wire_never_imports_protocols() -> None:
    assert _offenders("p2pfl.wire", "p2pfl.protocols") == {}


def test_protocols_do_no_io_and_know_no_driver() -> None:
    forbidden = ("asyncio", "trio", "anyio", "libp2p", "p2pfl.transport", "p2pfl.node", "sim")
    assert _offenders("p2pfl.protocols", *forbidden) == {}


def test_aggregation_imports_only_numpy_torch_and_itself() -> None:
    # and the project's error base (a leaf: it imports only topologies.errors, which
    # imports nothing), so that its one error of its own (TooFewVectors) derives from it
    allowed = ("numpy", "torch", "p2pfl.aggregation", "p2pfl.errors")
    bad = {}
    for path in _files("p2pfl.aggregation"):
        hits = sorted(
            m
            for m in _imports(path)
            if m.split(".")[0] not in sys.stdlib_module_names
            and m != "__future__"
            and not _under(m, *allowed)
        )
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    assert bad == {}


def test_topologies_never_import_p2pfl_or_sim() -> None:
    assert _offenders("topologies", "p2pfl", "sim") == {}


def test_sim_never_imports_libp2p() -> None:
    assert _offenders("sim", "libp2p", "trio", "p2pfl.transport") == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycle_among_sim_modules() -> None:
    paths = {_module_name(p): p for p in _files("sim")}
    graph = {
        module: {m for m in _imports(path) if m in paths and m != module}
        for module, path in paths.items()
    }
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_scenario_imports_configurations_only() -> None:
    runtime = ("sim.runner", "sim.adversary", "sim.engine", "sim.disruptions.runtime")
    assert _offenders("sim.scenario", *runtime) == {}
    assert _offenders("sim.attack_config", "sim") == {}
    assert _offenders("sim.disruptions.config", "sim") == {}


# ------------------------------------------------------------------------------ what loads


def test_importing_wire_loads_no_protocol() -> None:
    loaded = _loaded_after("p2pfl.wire", *_submodules("p2pfl.wire"))
    assert not {m for m in loaded if _under(m, "p2pfl.protocols")}


def test_importing_protocols_loads_no_driver() -> None:
    loaded = _loaded_after(*_submodules("p2pfl.protocols"))
    assert not {m for m in loaded if _under(m, "trio", "libp2p", "p2pfl.transport", "sim")}


def test_importing_topologies_loads_neither_p2pfl_sim_nor_matplotlib() -> None:
    loaded = _loaded_after(*_submodules("topologies"))
    assert not {m for m in loaded if _under(m, "p2pfl", "sim", "matplotlib")}


def test_importing_the_scenario_loads_no_runtime() -> None:
    loaded = _loaded_after("sim.scenario")
    runtime = ("sim.runner", "sim.adversary", "sim.engine", "sim.disruptions.runtime")
    assert not {m for m in loaded if _under(m, *runtime, "matplotlib")}


def test_the_transport_framing_loads_no_torch() -> None:
    """The libp2p transport frames with p2pfl.wire.framing without loading torch."""
    loaded = _loaded_after("p2pfl.wire.framing", "p2pfl.transport.libp2p")
    assert not {m for m in loaded if _under(m, "torch", "p2pfl.protocols", "sim")}
