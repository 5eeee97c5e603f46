"""Load py-libp2p's unused features lazily: a node's resident memory, not its behaviour.

``import libp2p`` imports py-libp2p's whole feature set eagerly (``libp2p/__init__``,
``libp2p.host.basic_host``, ``libp2p.transport``): QUIC, WebSocket, AutoTLS's ACME and
broker clients (httpx, requests, rich), the Prometheus exporter, UPnP, mDNS (zeroconf),
SECIO and the persistent peer stores (sqlite). A p2pfl node uses TCP, Noise, yamux,
identify, ping, the Kademlia DHT, circuit relay v2, DCUtR and AutoNAT -- none of those
(mDNS only when ``network.mdns`` is on). Loaded for nothing, they are ~19 MiB of a
node's resident memory (docs/phone.md, "Memory").

:func:`install` puts a finder in front of ``sys.meta_path`` that answers the modules of
:data:`LAZY` with a placeholder module, whose names (:data:`LAZY` lists exactly those
the rest of py-libp2p imports from it, and, dotted, attributes of them it reads at
import) are placeholders too. The first *use* of one --
calling it, reading another attribute of the module, ``isinstance`` with a real
object -- imports the real modules of its group and hands over to them, so every
feature still works when a program does use it (a node with ``network.mdns = true``
loads zeroconf when its host starts mDNS). ``isinstance(x, placeholder)`` is ``False``
without importing anything while the real module is not loaded: no instance of its
classes can exist before. Subclassing a placeholder fails with :class:`LazyImportError`.

It also turns off dnspython's DNS-over-QUIC (``dns._features.force("doq", False)``),
which would otherwise import aioquic for multiaddr's DNS resolver: that resolver asks
plain DNS, and nothing in a node asks DNS over QUIC.

This relies on which py-libp2p module imports which name, so it checks the version at
import (:func:`p2pfl.versions.require`); ``tests/test_phone_imports.py`` checks
:data:`LAZY` against the installed py-libp2p's sources. Installed after py-libp2p was
imported, or with ``P2PFL_EAGER_LIBP2P=1`` in the environment, it does nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

from p2pfl.errors import P2PFLError
from p2pfl.versions import require

__all__ = ["EAGER_ENV", "LAZY", "LazyImportError", "install", "installed", "loaded_groups"]

require(
    "libp2p",
    at_least="0.8.1",
    below="0.8.2",
    why="p2pfl.transport._slim_imports (which py-libp2p modules import which names)",
)

#: group -> module -> the names other py-libp2p modules import from it. A group's
#: modules are loaded together on the first use of any of them.
LAZY: dict[str, dict[str, tuple[str, ...]]] = {
    "quic": {
        "libp2p.transport.quic.stream": ("QUICStream",),
        "libp2p.transport.quic.transport": ("QUICTransport",),
        "libp2p.transport.quic.utils": ("is_quic_multiaddr",),
    },
    "websocket": {
        "libp2p.transport.websocket": (),
        "libp2p.transport.websocket.transport": ("WebsocketTransport",),
    },
    "autotls": {
        "libp2p.security.tls.autotls.acme": ("ACMEClient", "compute_b36_peer_id"),
        "libp2p.security.tls.autotls.broker": ("BrokerClient",),
    },
    "prometheus": {
        "libp2p.rcmgr.prometheus_exporter": ("PrometheusExporter", "create_prometheus_exporter"),
    },
    # private networks (a pre-shared key; pycryptodome's Salsa20): the swarm wraps a
    # connection only when given a key, which a node never is
    "pnet": {
        "libp2p.security.pnet.protector": ("new_protected_conn",),
    },
    # RSA keys (pycryptodome): a node's own key is Ed25519, and so are its peers' unless
    # one presents an RSA key, which loads them. ``serialization`` builds its table of
    # key parsers from ``RSA*Key.from_bytes`` at import: those attributes are
    # placeholders too (a dotted name).
    "rsa": {
        "libp2p.crypto.rsa": (
            "RSAPrivateKey",
            "RSAPublicKey",
            "create_new_key_pair",
            "RSAPrivateKey.from_bytes",
            "RSAPublicKey.from_bytes",
        ),  # fmt: skip
    },
    "upnp": {
        "libp2p.discovery.upnp": (),
        "libp2p.discovery.upnp.upnp": ("UpnpManager",),
    },
    "mdns": {
        "libp2p.discovery.mdns": (),
        "libp2p.discovery.mdns.mdns": ("MDNSDiscovery", "create_mdns_discovery"),
    },
    "secio": {
        "libp2p.security.secio.transport": (),
    },
    # only the package: its ``__init__`` loads the whole Bitswap client; the DHT's
    # ``libp2p.bitswap.cid`` submodule imports for real beneath the placeholder
    "bitswap": {
        "libp2p.bitswap": (),
    },
    "persistent": {
        "libp2p.peer.persistent": tuple(
            f"create_{kind}_{store}peerstore"
            for store in ("", "sqlite_", "memory_", "leveldb_", "rocksdb_")
            for kind in ("sync", "async")
        ),
    },
}

#: set to ``1`` to import py-libp2p eagerly, as it comes
EAGER_ENV = "P2PFL_EAGER_LIBP2P"

_GROUP_OF = {module: group for group, modules in LAZY.items() for module in modules}
_lock = threading.RLock()
_loaded: set[str] = set()  # groups whose real modules are imported (or being imported)
_finder: _LazyFinder | None = None


class LazyImportError(P2PFLError, ImportError):
    """A lazily loaded py-libp2p name was used in a way a placeholder cannot serve."""


def _load(group: str) -> None:
    """Import ``group``'s real modules in place of their placeholders (once)."""
    with _lock:
        if group in _loaded:
            return
        _loaded.add(group)  # from here on the finder lets the group's imports through
        names = sorted(LAZY[group])  # packages before their submodules
        placeholders = {name: sys.modules.get(name) for name in names}
        for name in names:
            if isinstance(placeholders[name], _LazyModule):
                del sys.modules[name]
        for name in names:
            real = importlib.import_module(name)
            # submodules that imported for real beneath the placeholder package (e.g.
            # ``libp2p.bitswap.cid``) become attributes of the real package, as usual
            for key, sub in list(sys.modules.items()):
                child = key[len(name) + 1 :]
                if key.startswith(name + ".") and "." not in child and not hasattr(real, child):
                    setattr(real, child, sub)
            placeholder = placeholders[name]
            if isinstance(placeholder, _LazyModule):
                object.__setattr__(placeholder, "_lazy_real", real)


class _LazyModule(types.ModuleType):
    """A module of :data:`LAZY` before its group is loaded."""

    _lazy_real: types.ModuleType | None = None

    def _lazy_resolve(self) -> types.ModuleType:
        _load(_GROUP_OF[self.__name__])
        if self._lazy_real is None:  # its import failed before: fail the same way again
            object.__setattr__(self, "_lazy_real", importlib.import_module(self.__name__))
        assert self._lazy_real is not None
        return self._lazy_real

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._lazy_resolve(), attr)


class _LazyName(type):
    """The metaclass of a placeholder name: a class standing for a class or function."""

    _lazy_module: _LazyModule
    _lazy_attr: str

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> Any:
        for base in bases:
            if isinstance(base, _LazyName):
                raise LazyImportError(
                    f"{base._lazy_module.__name__}.{base._lazy_attr} is loaded lazily by "
                    f"p2pfl.transport._slim_imports and cannot be subclassed: import "
                    f"{base._lazy_module.__name__} before p2pfl's libp2p transport"
                )
        return super().__new__(mcs, name, bases, namespace)

    def _lazy_target(cls) -> Any:
        target: Any = cls._lazy_module._lazy_resolve()
        for part in cls._lazy_attr.split("."):  # a dotted name: an attribute of a name
            target = getattr(target, part)
        return target

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._lazy_target()(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        if cls._lazy_module._lazy_real is None:
            return False  # nothing can be an instance of a class not yet defined
        target = cls._lazy_target()
        return isinstance(target, type) and isinstance(obj, target)

    def __subclasscheck__(cls, sub: type) -> bool:
        if cls._lazy_module._lazy_real is None:
            return sub is cls
        target = cls._lazy_target()
        return isinstance(target, type) and issubclass(sub, target)

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(cls._lazy_target(), attr)

    def __repr__(cls) -> str:
        return f"<lazy {cls._lazy_module.__name__}.{cls._lazy_attr}>"


def _placeholder(module: _LazyModule, attr: str) -> _LazyName:
    cls: _LazyName = _LazyName.__new__(_LazyName, attr, (), {"__module__": module.__name__})
    cls._lazy_module = module
    cls._lazy_attr = attr
    return cls


class _LazyLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _LazyModule(spec.name)
        group = _GROUP_OF[spec.name]
        for attr in LAZY[group][spec.name]:  # names before their dotted attributes
            owner, _, name = attr.rpartition(".")
            setattr(getattr(module, owner) if owner else module, name, _placeholder(module, attr))
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing runs: that is the point."""


class _LazyFinder(importlib.abc.MetaPathFinder):
    """Answers :data:`LAZY`'s modules with placeholders until their group is loaded."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        group = _GROUP_OF.get(fullname)
        if group is None or group in _loaded:
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None:  # not installed: let the usual ModuleNotFoundError happen
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _LazyLoader(), origin=real.origin)
        # a placeholder package keeps the real directory: submodules it does not stand
        # for (e.g. ``libp2p.transport.websocket.connection``) import for real
        spec.submodule_search_locations = real.submodule_search_locations
        return spec


def install() -> bool:
    """Put the finder in place (once); ``False`` when py-libp2p is already imported or
    ``P2PFL_EAGER_LIBP2P=1`` asks for py-libp2p as it comes (to compare, or to rule
    this module out)."""
    global _finder
    with _lock:
        if _finder is not None:
            return True
        if "libp2p" in sys.modules or os.environ.get(EAGER_ENV) == "1":
            return False
        _finder = _LazyFinder()
        sys.meta_path.insert(0, _finder)
        if "dns.quic" not in sys.modules:
            try:
                import dns._features
            except ImportError:  # pragma: no cover - dnspython comes with multiaddr
                pass
            else:
                dns._features.force("doq", False)
        return True


def installed() -> bool:
    """Whether the finder is in place."""
    return _finder is not None and _finder in sys.meta_path


def loaded_groups() -> set[str]:
    """The groups of :data:`LAZY` whose real modules have been imported."""
    with _lock:
        return set(_loaded)


install()
