"""A small internet in Linux network namespaces, for integration tests of real nodes.

Topology (every namespace is named ``p2n<pid>n<serial><role>``, with the pid of the
test process that made it)::

    home1 (192.168.1.2) -- r1 [MASQUERADE] 10.77.0.11 --+
    home2 (192.168.1.2) -- r2 [MASQUERADE] 10.77.0.12 --+-- inet (a bridge) -- pub 10.77.0.2

Both homes use the same private subnet, as real homes do: an address a peer learns of
a node behind the other router is unroutable, or names a different machine. ``pub`` is
reachable by everyone (a bootstrap / relay node); nothing outside can open a
connection into a home, the routers only let answers back in (Linux conntrack NAT).
Like most home routers, they drop what nobody asked for (also what is addressed to the
router itself) instead of answering it: a router whose kernel answers a SYN to a port it
does not listen on with a reset kills every TCP hole punch whose SYN arrives before its
own side's SYN left (the routers did until issue 18's punches were looked into).
Optionally every link to the bridge is shaped with ``tc tbf`` (both directions).

Everything is built with ``ip`` and ``iptables`` and lives only inside the namespaces,
which are deleted on :meth:`Internet.close` (also after a failed build); namespaces
left by a test process that died (its pid in the name is gone) are deleted before a
new build. Every command runs with a timeout; a failure names the command and its
stderr.

On top: :class:`Nodes` runs ``p2pfl node`` processes placed in namespaces (``ip netns
exec``) or on 127.0.0.1 from one config (``write_run``: a D-PSGD digits run over a fixed
graph), and :func:`run_and_observe` waits for them while sampling which pairs hold a TCP
connection (``ss`` in each namespace: kernel truth, independent of what nodes report).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.identity import Identity

PREFIX = "p2n"
COMMAND_TIMEOUT = 15.0
INTERNET = "10.77.0"  # the "public" subnet on the bridge
HOME_NET = "192.168.1"  # every home's LAN (the same in each, as in real homes)
PUBLIC_IP = f"{INTERNET}.2"
HOME_IP = f"{HOME_NET}.2"
ROUTER_LAN_IP = f"{HOME_NET}.1"


_SERIAL = itertools.count(1)  # two builds in one process never share a name


class NetnsError(RuntimeError):
    """Building or tearing down the namespaces failed; the message names the command."""


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here (``None``: they can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}{os.getpid()}n0probe"
    try:
        _run(["ip", "netns", "add", probe])
    except NetnsError as error:
        return f"cannot create a network namespace: {error}"
    try:
        _run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"])
    except NetnsError as error:
        return f"iptables NAT does not work in a namespace: {error}"
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return None


def _run(args: list[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise NetnsError(f"{' '.join(args)}: no answer within {timeout}s") from error
    except FileNotFoundError as error:
        raise NetnsError(f"{args[0]}: not installed") from error
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces of this harness whose test process is gone; return their names."""
    removed = []
    for line in _run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)n\d+[a-z]+\d*", name)
        if match and not _alive(int(match.group(1))):
            _run(["ip", "netns", "delete", name], check=False)
            removed.append(name)
    return removed


@dataclass
class Socket:
    local: str
    remote: str
    pids: list[int]


@dataclass
class Home:
    """One home: a LAN namespace (the nodes) behind a masquerading router namespace."""

    ns: str
    router: str
    wan_ip: str


@dataclass
class Internet:
    """The namespaces of one test; use as a context manager (or call build / close)."""

    homes: int = 2
    rate: str | None = None  # e.g. "10mbit": tbf on every link to the bridge, both ways
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}n{next(_SERIAL)}")
    public: str = ""
    bridge: str = ""
    home: list[Home] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)
    _links: int = 0

    def __enter__(self) -> Internet:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ------------------------------------------------------------------------
    def build(self) -> None:
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.bridge = self._netns("inet")
        self._in(self.bridge, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.bridge, "ip", "link", "set", "br0", "up")
        self.public = self._netns("pub")
        self._uplink(self.public, f"{PUBLIC_IP}/24")
        for k in range(1, self.homes + 1):
            router = self._netns(f"r{k}")
            lan = self._netns(f"home{k}")
            wan_ip = f"{INTERNET}.{10 + k}"
            wan = self._uplink(router, f"{wan_ip}/24")
            r_lan, h_lan = self._veth(router, lan)
            self._address(router, r_lan, f"{ROUTER_LAN_IP}/24")
            self._address(lan, h_lan, f"{HOME_IP}/24")
            self._in(lan, "ip", "route", "add", "default", "via", ROUTER_LAN_IP)
            self._in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._in(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE")
            # answers only: nothing from the internet opens a connection into the home
            self._in(router, "iptables", "-A", "FORWARD", "-i", wan, "-m", "state",
                     "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            self._in(router, "iptables", "-A", "FORWARD", "-i", wan, "-j", "DROP")
            # silent to strangers, as home routers are (see the module docstring)
            self._in(router, "iptables", "-A", "INPUT", "-i", wan, "-m", "state",
                     "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            self._in(router, "iptables", "-A", "INPUT", "-i", wan, "-j", "DROP")
            self.home.append(Home(ns=lan, router=router, wan_ip=wan_ip))

    def _netns(self, role: str) -> str:
        name = f"{self.tag}{role}"
        _run(["ip", "netns", "add", name])
        self._made.append(name)
        self._in(name, "ip", "link", "set", "lo", "up")
        return name

    def _in(self, ns: str, *args: str) -> str:
        return _run(["ip", "netns", "exec", ns, *args])

    def _veth(self, a: str, b: str) -> tuple[str, str]:
        """A veth pair created directly inside ``a`` and ``b`` (never in the host's namespace)."""
        self._links += 1
        end_a, end_b = f"v{self._links}a", f"v{self._links}b"
        _run(["ip", "link", "add", end_a, "netns", a, "type", "veth", "peer", "name", end_b, "netns", b])
        self._in(a, "ip", "link", "set", end_a, "up")
        self._in(b, "ip", "link", "set", end_b, "up")
        return end_a, end_b

    def _address(self, ns: str, dev: str, cidr: str) -> None:
        self._in(ns, "ip", "addr", "add", cidr, "dev", dev)

    def _uplink(self, ns: str, cidr: str) -> str:
        """Connect ``ns`` to the bridge; shape both directions if a rate is set."""
        inside, port = self._veth(ns, self.bridge)
        self._address(ns, inside, cidr)
        self._in(self.bridge, "ip", "link", "set", port, "master", "br0")
        if self.rate is not None:
            for where, dev in ((ns, inside), (self.bridge, port)):
                self._in(where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", self.rate, "burst", "16kb", "latency", "400ms")
        return inside

    # -- using ---------------------------------------------------------------------------
    def exec_prefix(self, ns: str) -> list[str]:
        """Prepend to a command line to run it inside ``ns``."""
        return ["ip", "netns", "exec", ns]

    def sockets(self, ns: str) -> list[Socket]:
        """Established TCP connections in ``ns`` (``ss``), with the pids that own them."""
        out = self._in(ns, "ss", "-tnpH", "state", "established")
        rows = []
        for line in out.splitlines():
            parts = line.split()  # Recv-Q Send-Q Local Peer Process
            if len(parts) < 4:
                continue
            pids = [int(p) for p in re.findall(r"pid=(\d+)", line)]
            rows.append(Socket(local=parts[2], remote=parts[3], pids=pids))
        return rows

    @property
    def namespaces(self) -> list[str]:
        """The namespaces built (and not yet deleted)."""
        return list(self._made)

    def close(self) -> None:
        for name in reversed(self._made):
            _run(["ip", "netns", "delete", name], check=False)
        self._made.clear()


def netns_names() -> list[str]:
    """Every namespace of this harness that exists now (for tests of the clean-up)."""
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


@dataclass
class Place:
    """Where one node runs: a namespace (``None``: this one), its address and port."""

    ns: str | None
    ip: str
    port: int


class Nodes:
    """``p2pfl node`` processes placed in namespaces (or on 127.0.0.1), one config file.

    Node 0 is the bootstrap node; the others dial it at its address as seen from
    everywhere (``Place.ip`` of node 0). Status is read from each node's
    ``status.json``; processes are always killed by :meth:`close`.
    """

    def __init__(self, root: Path, config: Path, places: list[Place], keys: list[Path]) -> None:
        self.root = root
        self.config = config
        self.places = places
        self.keys = keys
        self.peer_ids = [Identity.load_or_create(key).peer_id for key in keys]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    def state_dir(self, i: int) -> Path:
        return self.root / f"peer{i}"

    def log_path(self, i: int) -> Path:
        return self.root / f"peer{i}.log"

    def bootstrap_addr(self) -> str:
        first = self.places[0]
        return f"/ip4/{first.ip}/tcp/{first.port}/p2p/{self.peer_ids[0]}"

    def start_all(self, extra: Callable[[int], list[str]] | None = None) -> None:
        for i, place in enumerate(self.places):
            args = [
                sys.executable, "-m", "p2pfl.cli", "node",
                "--config", str(self.config),
                "--peer-index", str(i),
                "--num-peers", str(len(self.places)),
                "--key-file", str(self.keys[i]),
                "--state-dir", str(self.state_dir(i)),
                "--listen", f"/ip4/{place.ip}/tcp/{place.port}",
                *(extra(i) if extra else []),
            ]
            if i > 0:
                args += ["--bootstrap", self.bootstrap_addr()]
            if place.ns is not None:
                args = ["ip", "netns", "exec", place.ns, *args]
            log = self.log_path(i).open("ab")
            self._logs.append(log)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            self.processes[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def status(self, i: int) -> dict[str, Any]:
        try:
            loaded = json.loads((self.state_dir(i) / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def log_tail(self, i: int, lines: int = 25) -> str:
        path = self.log_path(i)
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_exit(self, timeout: float) -> dict[int, int]:
        """Wait for every node to end; a node that fails early or outlasts ``timeout`` is
        reported with the tail of its log."""
        deadline = time.monotonic() + timeout
        codes: dict[int, int] = {}
        while len(codes) < len(self.processes):
            for i, process in self.processes.items():
                code = process.poll()
                if code is not None and i not in codes:
                    codes[i] = code
                    if code != 0:
                        raise AssertionError(f"node {i} exited with {code}:\n{self.log_tail(i)}")
            if time.monotonic() > deadline:
                late = [i for i in self.processes if i not in codes]
                tails = "\n".join(f"--- node {i}:\n{self.log_tail(i)}" for i in late)
                raise AssertionError(f"nodes {late} still running after {timeout}s:\n{tails}")
            time.sleep(0.2)
        return codes

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for log in self._logs:
            log.close()
        self._logs.clear()


#: a D-PSGD digits run for the namespace tests and benchmarks; ``{rounds}``, ``{hidden}``
#: and ``{graph}`` (an edge list of peer ids, the same file for every node) filled in
RUN_CONFIG = """
seed = 11
rounds = {rounds}

[data]
dataset = "digits"
batch_size = 16

[model]
name = "mlp"
hidden = [{hidden}]
lr = 0.1

[protocol]
name = "dpsgd"
local_steps = 10
# long: a round closed by its timer would change the result (slow start-up under load)
round_timeout = 60.0

[network]
discovery_timeout = 60.0
send_timeout = 10.0
ping_interval = 0
topology_file = "{graph}"
"""


def home_layout(per_home: int, homes: int = 2) -> list[tuple[str, int]]:
    """(role, port) per node: node 0 ``pub``, then ``per_home`` nodes in each ``home<k>``."""
    places = [("pub", 4600)]
    for home in range(1, homes + 1):
        places += [(f"home{home}", 4600 + 10 * home + j) for j in range(per_home)]
    return places


def graph_edges(layout: list[tuple[str, int]], *, cross_homes: bool) -> set[frozenset[int]]:
    """The public node with everyone, each home a clique; pairs across homes only when
    NAT traversal can join them (without a relay nobody can dial into another home)."""
    edges = {frozenset((0, i)) for i in range(1, len(layout))}
    for a in range(1, len(layout)):
        for b in range(a + 1, len(layout)):
            if layout[a][0] == layout[b][0] or cross_homes:
                edges.add(frozenset((a, b)))
    return edges


def write_run(
    root: Path, peer_ids: list[str], edges: set[frozenset[int]], *, rounds: int, hidden: int = 32
) -> Path:
    """``root/graph.txt`` and ``root/node.toml`` of one run; returns the config's path."""
    root.mkdir(parents=True, exist_ok=True)
    graph = root / "graph.txt"
    pairs = sorted(tuple(sorted(edge)) for edge in edges)
    graph.write_text("".join(f"{peer_ids[a]} {peer_ids[b]}\n" for a, b in pairs))
    config = root / "node.toml"
    config.write_text(RUN_CONFIG.format(rounds=rounds, hidden=hidden, graph=graph))
    return config


def place_nodes(net: Internet | None, layout: list[tuple[str, int]]) -> list[Place]:
    """Where each node of ``layout`` runs in ``net`` (``None``: all on 127.0.0.1, ports
    from the layout shifted to free ones)."""
    if net is None:
        from tests.cluster import free_ports

        return [Place(None, "127.0.0.1", port) for port in free_ports(len(layout))]
    where = {"pub": net.public, **{f"home{k + 1}": home.ns for k, home in enumerate(net.home)}}
    return [Place(where[role], PUBLIC_IP if role == "pub" else HOME_IP, port) for role, port in layout]


def tcp_links(net: Internet, nodes: Nodes) -> set[frozenset[int]]:
    """Pairs of nodes with an established TCP connection between their processes.

    Read from the kernel's socket tables, not from the nodes: a socket whose remote end
    is a node's listen address (as dialled from that namespace) links its owner to that
    node. A relayed pair has no such connection (its traffic goes through the relay).
    """
    owner = {process.pid: i for i, process in nodes.processes.items()}
    listen: dict[tuple[str | None, str], int] = {}
    for i, place in enumerate(nodes.places):
        listen[(place.ns, f"{place.ip}:{place.port}")] = i
    public = {f"{p.ip}:{p.port}": i for i, p in enumerate(nodes.places) if p.ns == net.public}
    links: set[frozenset[int]] = set()
    for ns in sorted({p.ns for p in nodes.places if p.ns is not None}):
        for sock in net.sockets(ns):
            mine = [owner[pid] for pid in sock.pids if pid in owner]
            other = listen.get((ns, sock.remote), public.get(sock.remote))
            if mine and other is not None and other != mine[0]:
                links.add(frozenset((mine[0], other)))
    return links


@dataclass
class Observed:
    """What :func:`run_and_observe` saw while the nodes ran."""

    links: set[frozenset[int]]  # pairs that had a TCP connection at any sample
    training: dict[int, dict[str, Any]]  # each node's last status.json while training
    codes: dict[int, int]


def run_and_observe(net: Internet, nodes: Nodes, timeout: float, every: float = 0.25) -> Observed:
    """Wait for every node to exit, sampling the kernel's TCP connections (while all
    run) and each node's status (while it trains) every ``every`` seconds.

    Sampled all along, not once: status.json is rewritten at most once a second, so a
    single look at "half the rounds done" may come after fast nodes have exited.
    """
    deadline = time.monotonic() + timeout
    links: set[frozenset[int]] = set()
    training: dict[int, dict[str, Any]] = {}
    codes: dict[int, int] = {}
    while len(codes) < len(nodes.processes):
        for i, process in nodes.processes.items():
            code = process.poll()
            if code is not None and i not in codes:
                codes[i] = code
                if code != 0:
                    raise AssertionError(f"node {i} exited with {code}:\n{nodes.log_tail(i)}")
        if not codes:
            links |= tcp_links(net, nodes)
        for i in range(len(nodes.places)):
            status = nodes.status(i)
            if status.get("state") == "training":
                training[i] = status
        if time.monotonic() > deadline:
            late = [i for i in nodes.processes if i not in codes]
            raise AssertionError(f"nodes {late} still running after {timeout}s:\n{nodes.log_tail(late[0])}")
        time.sleep(every)
    return Observed(links, training, codes)


# ------------------------------------------------------------------ what a finished run shows


def finished_accuracies(nodes: Nodes, rounds: int, edges: set[frozenset[int]]) -> list[float]:
    """Every node finished, no round closed by its timer, and a model from every graph
    neighbour in every round (none missing): the nodes' final accuracies."""
    accuracies = []
    for i in range(len(nodes.places)):
        status = nodes.status(i)
        assert status.get("state") == "finished", (i, status.get("state"), status.get("failure"), nodes.log_tail(i))
        degree = sum(1 for edge in edges if i in edge)
        counters = status["counters"]
        assert counters.get("round_timeouts", 0) == 0, (i, counters)
        assert counters.get("received_models", 0) >= rounds * degree, (i, counters)
        accuracies.append(float(status["accuracy"]))
    return accuracies


def loopback_accuracies(
    root: Path, keys: list[Path], edges: set[frozenset[int]], layout: list[tuple[str, int]], rounds: int
) -> list[float]:
    """The same config, keys and graph run on 127.0.0.1: what a run across namespaces must equal."""
    peer_ids = [Identity.load_or_create(key).peer_id for key in keys]
    config = write_run(root, peer_ids, edges, rounds=rounds)
    loop = Nodes(root, config, place_nodes(None, layout), keys)
    try:
        loop.start_all()
        loop.wait_exit(120)
        return finished_accuracies(loop, rounds, edges)
    finally:
        loop.close()


def assert_met_neighbours(nodes: Nodes, peer_ids: list[str], edges: set[frozenset[int]]) -> None:
    """Every node met (a hello over a connection) every one of its graph neighbours."""
    for i in range(len(nodes.places)):
        met = set(nodes.status(i)["met_peers"])
        assert met >= {peer_ids[j] for edge in edges if i in edge for j in edge if j != i}, (i, met)
