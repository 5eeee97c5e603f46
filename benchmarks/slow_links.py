"""Round time of real nodes on loopback vs rate-limited links (tc tbf), behind NATs.

The network-namespace internet of ``tests/netns.py``: a public node and two homes, each
behind its own masquerading router, ``--per-home`` nodes per home; every link to the
internet bridge shaped both ways with ``tc ... tbf`` at the given rate. The run is the
namespace test's D-PSGD on digits over a fixed graph (the public node with everyone,
each home a clique), with a wider MLP (``--hidden``) so that a model is large enough for
the link to matter: the public node sends its model to every other node each round,
over its one link.

Each setting runs the same config, keys and graph. Round time is read from the nodes'
own clocks: every node's ``status.json`` (rewritten at most once a second, each write
with ``rounds_done`` and ``uptime_s``) is polled every 20 ms; a node's round time is
the uptime between its first write after ``--warmup`` rounds and its last write (the
final one), divided by the rounds between them; the figure is the median over nodes
(and the slowest node's).
CPU time of all node processes (user + system, from ``wait4``) is reported beside it:
the machine may be shared, and CPU time is what the links do not change.

Needs root (``ip netns``, ``iptables``, ``tc``). Writes a CSV and a PNG.

    sudo python benchmarks/slow_links.py                        # loopback, 10 and 2 Mbit/s
    sudo python benchmarks/slow_links.py --settings loopback,netns,10mbit --rounds 20
    sudo python benchmarks/slow_links.py --settings 10mbit,10mbit+relay     # models via the relay
    sudo python benchmarks/slow_links.py --settings 10mbit+relay,10mbit+punch  # relay vs punched

``+relay`` turns hole punching off in the homes (the routers let a punch through, see
``tests/netns.py``), so that models between the homes do go through the relay; ``+punch``
leaves it on: the pairs across the homes start relayed and DCUtR makes them direct.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pfl.identity import Identity  # noqa: E402
from tests.netns import (  # noqa: E402
    Internet,
    Nodes,
    graph_edges,
    home_layout,
    place_nodes,
    unavailable_reason,
    write_run,
)

POLL = 0.02


def _relay_args(role: str, *, punch: bool) -> list[str]:
    """As in tests/test_netns_relay.py: the public node relays, the homes find each
    other in the DHT and learn from AutoNAT that they are behind NAT (``punch``: and
    DCUtR may turn their relayed connections direct)."""
    common = ["--set", "network.dht=true", "--set", 'network.run="slow-links"']
    if role == "pub":
        return [*common, "--set", "network.relay=true", "--set", 'network.reachability="public"']
    punching = "true" if punch else "false"
    return [*common, "--set", 'network.reachability="auto"', "--set", f"network.hole_punching={punching}"]


def _sample(nodes: Nodes, i: int, seen: dict[int, float]) -> None:
    """Keep (rounds_done -> uptime_s) of node ``i``'s latest status write (the first
    write that reported each count: a later one only repeats it)."""
    status = nodes.status(i)
    done, uptime = status.get("rounds_done"), status.get("uptime_s")
    if isinstance(done, int) and isinstance(uptime, float) and done not in seen:
        seen[done] = uptime


def run_setting(
    setting: str, root: Path, keys: list[Path], args: argparse.Namespace
) -> dict[str, object]:
    layout = home_layout(args.per_home)
    peer_ids = [Identity.load_or_create(key).peer_id for key in keys]
    link, _, relay = setting.partition("+")
    if relay not in ("", "relay", "punch"):
        raise SystemExit(f"{setting}: after '+' comes relay or punch")
    edges = graph_edges(layout, cross_homes=bool(relay))
    config = write_run(root, peer_ids, edges, rounds=args.rounds, hidden=args.hidden)
    rate = link if link.endswith("bit") else None
    net = None if setting == "loopback" else Internet(homes=2, rate=rate)
    if net is not None:
        net.build()
    if relay and net is None:
        raise SystemExit(f"{setting}: a relay needs the namespaces (netns+{relay} or <rate>+{relay})")
    nodes = Nodes(root, config, place_nodes(net, layout), keys)
    seen: list[dict[int, float]] = [{} for _ in layout]  # node -> rounds_done -> uptime_s
    cpu = 0.0
    try:
        start = time.monotonic()
        ping = ["--set", f"network.ping_interval={args.ping_interval}"]
        punch = relay == "punch"
        nodes.start_all(lambda i: ping + (_relay_args(layout[i][0], punch=punch) if relay else []))
        deadline = start + args.timeout
        running = dict(nodes.processes)
        while running:
            if time.monotonic() > deadline:
                raise SystemExit(f"{setting}: nodes still running after {args.timeout}s")
            for i in range(len(layout)):
                _sample(nodes, i, seen[i])
            for i, process in list(running.items()):
                try:
                    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status, usage = process.pid, 0, None
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    if usage is not None:
                        cpu += usage.ru_utime + usage.ru_stime
                    del running[i]
                    if process.returncode != 0:
                        raise SystemExit(f"{setting}: node {i} exited {process.returncode}:\n{nodes.log_tail(i)}")
            time.sleep(POLL)
        wall = time.monotonic() - start
        for i in range(len(layout)):
            _sample(nodes, i, seen[i])  # the final status
    finally:
        nodes.close()
        if net is not None:
            net.close()
    per_node = []
    for times in seen:
        rounds = sorted(r for r in times if r >= args.warmup)
        if len(rounds) >= 2:
            first, last = rounds[0], rounds[-1]
            per_node.append((times[last] - times[first]) / (last - first))
    accuracies = [float(nodes.status(i).get("accuracy") or 0.0) for i in range(len(layout))]
    timeouts = sum(int(nodes.status(i).get("counters", {}).get("round_timeouts", 0)) for i in range(len(layout)))
    model_bytes = int(nodes.status(0).get("bytes_sent", 0)) // max(1, args.rounds * (len(layout) - 1))
    return {
        "setting": setting,
        "nodes": len(layout),
        "edges": len(edges),
        "rounds": args.rounds,
        "hidden": args.hidden,
        "bytes_per_model": model_bytes,
        "round_s_median": round(statistics.median(per_node), 4) if per_node else float("nan"),
        "round_s_slowest_node": round(max(per_node), 4) if per_node else float("nan"),
        "round_timeouts": timeouts,
        "accuracy_mean": round(statistics.fmean(accuracies), 4),
        "accuracy_min": round(min(accuracies), 4),
        "wall_s": round(wall, 2),
        "cpu_s_all_nodes": round(cpu, 2),
    }


def plot(rows: list[dict[str, object]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [str(row["setting"]) for row in rows]
    ax.bar(names, [float(row["round_s_median"]) for row in rows], label="median node")  # type: ignore[arg-type]
    ax.plot(names, [float(row["round_s_slowest_node"]) for row in rows], "k_", markersize=30,  # type: ignore[arg-type]
            label="slowest node")
    ax.set_ylabel("seconds per round")
    first = rows[0]
    ax.set_title(f"D-PSGD digits, {first['nodes']} nodes, {first['bytes_per_model']} B per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="loopback,netns,10mbit,2mbit",
                        help="comma list: loopback, netns (unshaped namespaces), or a tc rate such as "
                        "10mbit; '+relay' (netns+relay, 10mbit+relay): complete graph, the homes "
                        "reach each other through the DHT and the public node's relay; '+punch': "
                        "the same with hole punching, so that the pairs across the homes turn direct")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (model size)")
    parser.add_argument("--per-home", type=int, default=2)
    parser.add_argument("--ping-interval", type=float, default=0.0,
                        help="network.ping_interval (default 0: no pings, as in the tests; at "
                        "2 Mbit/s through the relay, pings queued behind models miss their fixed "
                        "ping_timeout and mark live neighbours down)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per setting")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the nodes' logs and state here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/slow_links.csv"))
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"error: {reason}")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="slow-links-") as tmp_dir:
        tmp = str(args.workdir) if args.workdir is not None else tmp_dir
        keys = [Path(tmp) / f"key{i}" for i in range(len(home_layout(args.per_home)))]
        rows = []
        for setting in settings:
            row = run_setting(setting, Path(tmp) / setting, keys, args)
            print(row, flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
