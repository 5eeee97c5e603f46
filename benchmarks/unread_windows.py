"""What stalled stream windows cost a node: peak RSS growth under a window hoard.

One node runs in its own process (``tests.hostile.serve``: a ``Node`` over libp2p,
idle in discovery); ``--sources`` hosts (127.0.0.10, .11, ...) with ``--keys`` keys each
open 32 message streams per key, announce a 64 MiB frame on each and send its first
256 KiB (the whole initial yamux window), then stall. Reported: the node's peak and
current RSS growth, its unread-bytes counters (``p2pfl/transport/_unread.py``) and the
streams reset for the budget. ``--unbounded`` counts without refusing (the node as it
was before the budget).

    python benchmarks/unread_windows.py --sources 1 --keys 16
    python benchmarks/unread_windows.py --sources 4 --keys 8 --unbounded

Needs Linux (/proc); runs on loopback only; a run takes ~10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hostile import HostileClient, memory_kb, reset_peak
from tests.test_r3_windows import BASE_WINDOW, STREAMS_PER_KEY, hoard

ROOT = Path(__file__).resolve().parents[1]
#: the node in its own process; with "unbounded", its budget counts but never refuses
SERVE = (
    "import sys\n"
    "if sys.argv[1] == 'unbounded':\n"
    "    from p2pfl.transport import _unread\n"
    "    _init = _unread.UnreadBudget.__init__\n"
    "    def _counting(self, cap=_unread.UNREAD_BUDGET, *, enforce=True):\n"
    "        _init(self, cap, enforce=False)\n"
    "    _unread.UnreadBudget.__init__ = _counting\n"
    "from tests.hostile import serve\n"
    "serve(sys.argv[2], sys.argv[3])\n"
)


def start_node(tmp: Path, unbounded: bool) -> tuple[subprocess.Popen[str], str, Path]:
    config = {
        "seed": 1,
        "rounds": 1,
        "state_dir": str(tmp / "node"),
        "key_file": str(tmp / "node.key"),
        "peer_index": 0,
        "num_peers": 2,
        "data": {"dataset": "digits", "batch_size": 16},
        "model": {"name": "mlp", "hidden": [16]},
        "protocol": {"name": "dpsgd"},
        "network": {"min_peers": 8, "discovery_timeout": 600.0},
    }
    (tmp / "node.json").write_text(json.dumps(config))
    report = tmp / "report.json"
    mode = "unbounded" if unbounded else "bounded"
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, mode, str(tmp / "node.json"), str(report)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.5)[0]:
            line = process.stdout.readline()
            if line.startswith("LISTENING "):
                return process, line.split()[1], report
            if not line:
                break
    process.kill()
    raise SystemExit("the node did not start")


def stop_node(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def measure(sources: int, keys: int, unbounded: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="unread-windows-"))
    process, addr, report_path = start_node(tmp, unbounded)
    peer = addr.rsplit("/p2p/", 1)[1]
    hosts = [f"127.0.0.{10 + i}" for i in range(sources)]
    clients = [HostileClient(f"unread-bench-{s}-{k}") for s in range(sources) for k in range(keys)]
    try:
        await asyncio.sleep(2.0)  # the node settles (imports, first status write)
        reset_peak(process.pid)
        base = memory_kb(process.pid)["VmRSS"]
        for client in clients:
            await client.__aenter__()
        began = time.monotonic()
        filled = sum(
            await asyncio.gather(
                *(hoard(clients[i * keys : (i + 1) * keys], peer, addr, host) for i, host in enumerate(hosts))
            )
        )
        last: tuple[int, int] | None = None
        for _ in range(100):  # until the node's counters stop moving (bounded: 50 s)
            stats = json.loads(report_path.read_text())["transport"]
            now = (stats["unread_bytes"], stats["unread_resets"])
            if now == last:
                break
            last = now
            await asyncio.sleep(0.5)
        stats = json.loads(report_path.read_text())["transport"]
        memory = memory_kb(process.pid)
        return {
            "bound": "off" if unbounded else "on",
            "sources": sources,
            "keys_per_source": keys,
            "streams_filled": filled,
            "window_MiB_sent": round(filled * BASE_WINDOW / 2**20, 1),
            "peak_rss_growth_MB": round((memory["VmHWM"] - base) * 1024 / 1e6, 1),
            "rss_growth_now_MB": round((memory["VmRSS"] - base) * 1024 / 1e6, 1),
            "unread_peak_MiB": round(stats["unread_peak"] / 2**20, 1),
            "unread_resets": stats["unread_resets"],
            "refused_streams": stats["refused_streams"],
            "hoard_s": round(time.monotonic() - began, 1),
        }
    finally:
        for client in clients:
            await client.__aexit__()
        stop_node(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=4, help="hosts (127.0.0.10 ...), at most 100")
    parser.add_argument("--keys", type=int, default=8, help=f"keys per host, {STREAMS_PER_KEY} streams each")
    parser.add_argument("--unbounded", action="store_true", help="count unread bytes, never refuse")
    args = parser.parse_args()
    if not 1 <= args.sources <= 100 or not 1 <= args.keys <= 64:
        parser.error("--sources must be 1..100 and --keys 1..64")
    print(json.dumps(asyncio.run(measure(args.sources, args.keys, args.unbounded))))


if __name__ == "__main__":
    main()
