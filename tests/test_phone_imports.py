"""What a node imports (docs/phone.md, "Memory"): py-libp2p's unused features stay
unloaded until used (``p2pfl.transport._slim_imports``), and no heavy library comes in.

``LAZY`` is checked against the installed py-libp2p's own sources, so a py-libp2p whose
modules import other names from a lazy module, or use one as a base class, fails here
rather than in a running node. Each import check runs a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.transport._slim_imports import LAZY

ROOT = Path(__file__).resolve().parent.parent

#: what a node's imports must not load: the data is digits/MNIST, plots are the CLI's
#: business, and the rest is py-libp2p's lazily loaded features and their libraries
HEAVY = ("sklearn", "scipy", "matplotlib", "pandas", "networkx")
LAZY_LIBRARIES = (
    "aioquic", "zeroconf", "websockets", "trio_websocket", "httpx", "requests",
    "miniupnpc", "fastecdsa", "sqlite3", "libp2p.bitswap.client",
)  # fmt: skip
NODE_MODULES = (
    "p2pfl.nodecli", "p2pfl.node", "p2pfl.transport.libp2p", "p2pfl.transport._nat",
    "p2pfl.transport._dht", "p2pfl.learning.datasets", "p2pfl.learning.trainer",
)  # fmt: skip


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "", "HOME": str(Path.home()), **(env or {})},
    )  # fmt: skip


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _loaded(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = _run(code + "\nprint(json.dumps(result))\n", env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_nodes_imports_load_neither_heavy_libraries_nor_unused_libp2p_features() -> None:
    result = _loaded(
        "import importlib, json, sys\n"
        f"for name in {list(NODE_MODULES)!r}:\n"
        "    importlib.import_module(name)\n"
        "from p2pfl.transport import _slim_imports\n"
        "result = {'modules': sorted(sys.modules), 'groups': sorted(_slim_imports.loaded_groups()),\n"
        "          'installed': _slim_imports.installed()}\n"
    )
    modules = result["modules"]
    assert isinstance(modules, list)
    assert "torch" in modules and "libp2p.kad_dht" in modules  # the check sees the imports
    assert result["installed"] is True and result["groups"] == []
    assert sorted(m for m in modules if _under(m, *HEAVY, *LAZY_LIBRARIES)) == []


def test_eager_mode_imports_libp2p_as_it_comes() -> None:
    result = _loaded(
        "import json, sys\nimport p2pfl.transport.libp2p\n"
        "from p2pfl.transport import _slim_imports\n"
        "result = {'installed': _slim_imports.installed(), 'zeroconf': 'zeroconf' in sys.modules}\n",
        env={"P2PFL_EAGER_LIBP2P": "1"},
    )
    assert result == {"installed": False, "zeroconf": True}


def test_using_a_lazy_name_loads_the_real_module_and_hands_over_to_it() -> None:
    result = _loaded(
        "import json, sys\n"
        "import p2pfl.transport.libp2p\n"
        "from p2pfl.transport import _slim_imports\n"
        "from libp2p.discovery.mdns.mdns import MDNSDiscovery\n"
        "from libp2p.security.tls.autotls.acme import compute_b36_peer_id\n"
        "from libp2p.peer.id import ID\n"
        "before = ('zeroconf' in sys.modules, isinstance(object(), MDNSDiscovery))\n"
        "peer = ID(b'\\x00\\x05hello')\n"
        "b36 = compute_b36_peer_id(peer)\n"  # a call loads the autotls group
        "after_call = sorted(_slim_imports.loaded_groups())\n"
        "real_acme = sys.modules['libp2p.security.tls.autotls.acme']\n"
        "import libp2p.discovery.mdns.mdns as mdns_module\n"
        "service = mdns_module.SERVICE_TYPE\n"  # a name it does not stand for: loads mdns
        "mdns_class = sys.modules['libp2p.discovery.mdns.mdns'].MDNSDiscovery\n"
        "result = {\n"
        "  'before': before, 'groups_after_call': after_call,\n"
        "  'same_result': b36 == real_acme.compute_b36_peer_id(peer),\n"
        "  'real_module': not isinstance(real_acme, _slim_imports._LazyModule),\n"
        "  'mdns_real': mdns_class.__module__ == 'libp2p.discovery.mdns.mdns'\n"
        "               and not isinstance(mdns_class, _slim_imports._LazyName),\n"
        "  'zeroconf_after': 'zeroconf' in sys.modules, 'service': service,\n"
        "  'groups': sorted(_slim_imports.loaded_groups()),\n"
        "  'isinstance_after': issubclass(mdns_class, MDNSDiscovery),\n"
        "}\n"
    )
    assert result == {
        "before": [False, False],
        "groups_after_call": ["autotls"],
        "same_result": True,
        "real_module": True,
        "mdns_real": True,
        "zeroconf_after": True,
        "service": "_p2p._udp.local.",
        "groups": ["autotls", "mdns"],
        "isinstance_after": True,
    }


def test_a_peer_with_an_rsa_key_still_parses_through_a_dotted_placeholder() -> None:
    """``serialization`` keeps ``RSAPublicKey.from_bytes`` in a table at import: that
    attribute is a placeholder of its own, so the table costs nothing until a peer
    presents an RSA key, and then parses it with the real class."""
    result = _loaded(
        "import json, sys\n"
        "import p2pfl.transport.libp2p\n"
        "from p2pfl.transport import _slim_imports\n"
        "from libp2p.crypto.serialization import deserialize_public_key\n"
        "before = ('Crypto' in sys.modules, sorted(_slim_imports.loaded_groups()))\n"
        "from Crypto.PublicKey import RSA\n"
        "from libp2p.crypto.pb import crypto_pb2\n"
        "der = RSA.generate(1024).publickey().export_key('DER')\n"
        "message = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der)\n"
        "key = deserialize_public_key(message.SerializeToString())\n"
        "result = {'before': before, 'type': type(key).__module__ + '.' + type(key).__name__,\n"
        "          'same': key.to_bytes() == der, 'groups': sorted(_slim_imports.loaded_groups())}\n"
    )
    assert result == {
        "before": [False, []],
        "type": "libp2p.crypto.rsa.RSAPublicKey",
        "same": True,
        "groups": ["rsa"],
    }


def test_a_lazy_package_hands_over_its_real_submodules_once_loaded() -> None:
    result = _loaded(
        "import json, sys\n"
        "import p2pfl.transport.libp2p\n"
        "import libp2p.bitswap\n"
        "from p2pfl.transport import _slim_imports\n"
        "placeholder = type(sys.modules['libp2p.bitswap']).__name__\n"
        "cid_real = 'libp2p.bitswap.cid' in sys.modules\n"  # the DHT imported it for real
        "client = libp2p.bitswap.BitswapClient\n"  # a name it does not stand for
        "result = {'placeholder': placeholder, 'cid_real': cid_real,\n"
        "          'client': client.__module__, 'package': type(libp2p.bitswap).__name__,\n"
        "          'cid': libp2p.bitswap.cid.parse_cid.__name__,\n"
        "          'groups': sorted(_slim_imports.loaded_groups())}\n"
    )
    assert result == {
        "placeholder": "_LazyModule",
        "cid_real": True,
        "client": "libp2p.bitswap.client",
        "package": "module",
        "cid": "parse_cid",
        "groups": ["bitswap"],
    }


def test_subclassing_a_lazy_name_fails_in_one_line() -> None:
    done = _run(
        "import p2pfl.transport.libp2p\n"
        "from libp2p.discovery.upnp.upnp import UpnpManager\n"
        "class Mine(UpnpManager):\n"
        "    pass\n"
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("p2pfl.transport._slim_imports.LazyImportError: ")
    assert "libp2p.discovery.upnp.upnp.UpnpManager is loaded lazily" in last


def test_another_libp2p_version_stops_the_import_in_one_line() -> None:
    done = _run(
        "import importlib.metadata as md\n"
        "real = md.version\n"
        "md.version = lambda name: '0.9.0' if name == 'libp2p' else real(name)\n"
        "import p2pfl.transport._slim_imports\n"
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].endswith(
        "expected libp2p >= 0.8.1, < 0.8.2, found 0.9.0"
    )


# ------------------------------------------------ LAZY against py-libp2p's own sources


def _libp2p_sources() -> dict[str, Path]:
    import libp2p

    base = Path(libp2p.__file__).parent
    found = {}
    for path in base.rglob("*.py"):
        parts = list(path.relative_to(base.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _from_imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` of each ``from ... import`` in a file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names]))
    return found


def test_lazy_names_are_exactly_what_the_rest_of_libp2p_imports_and_never_subclassed() -> None:
    group_of = {m: g for g, modules in LAZY.items() for m in modules}
    # a feature's own package: its modules load with the feature (those a node loads for
    # real, e.g. ``quic.config``, would load their group at import: the first test)
    features = {
        "quic": "libp2p.transport.quic", "websocket": "libp2p.transport.websocket",
        "autotls": "libp2p.security.tls.autotls", "upnp": "libp2p.discovery.upnp",
        "mdns": "libp2p.discovery.mdns", "secio": "libp2p.security.secio",
        "persistent": "libp2p.peer.persistent", "bitswap": "libp2p.bitswap",
        "prometheus": "libp2p.rcmgr.prometheus_exporter", "pnet": "libp2p.security.pnet",
        "rsa": "libp2p.crypto.rsa",
    }  # fmt: skip
    assert set(features) == set(LAZY)
    sources = _libp2p_sources()
    assert set(group_of) <= set(sources)  # every lazy module exists in this version
    undeclared: dict[str, list[str]] = {}
    subclassed: list[str] = []
    for module, path in sources.items():
        own = next((g for g, package in features.items() if _under(module, package)), None)
        imported_lazy: set[str] = set()
        for target, names in _from_imports(module, path):
            group = group_of.get(target)
            if group is None or group == own:
                continue
            if target in group_of and any(f"{target}.{n}" in group_of for n in names):
                continue  # ``from package import submodule``
            extra = sorted(set(names) - set(LAZY[group][target]))
            if extra:
                undeclared[f"{module} <- {target}"] = extra
            imported_lazy.update(names)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                subclassed += [f"{module}.{node.name}({b})" for b in bases & imported_lazy]
    assert undeclared == {}
    assert subclassed == []


@pytest.mark.parametrize("group", sorted(LAZY))
def test_every_lazy_name_is_a_class_or_a_function_of_the_real_module(group: str) -> None:
    done = _loaded(
        "import functools, importlib, inspect, json\n"
        f"modules = {dict(LAZY[group])!r}\n"
        "result = {}\n"
        "for name, attrs in modules.items():\n"
        "    real = importlib.import_module(name)\n"
        "    found = {a: functools.reduce(getattr, a.split('.'), real) for a in attrs}\n"
        "    result[name] = sorted(a for a, v in found.items() if not (inspect.isclass(v)\n"
        "                          or inspect.isfunction(v) or inspect.ismethod(v)))\n",
        env={"P2PFL_EAGER_LIBP2P": "1"},
    )
    assert done == {name: [] for name in LAZY[group]}
