"""What stalled stream windows cost a node: peak RSS growth under a window hoard.

One node runs in its own process (``tests.hostile.serve``: a ``Node`` over libp2p,
idle in discovery); ``--sources`` hosts (127.0.0.10, .11, ...) with ``--keys`` keys each
open 32 message streams per key, announce a 64 MiB frame on each and send its first
256 KiB (the whole initial yamux window), then stall. Reported: the node's peak and
current RSS growth, its unread-bytes counters (``p2pfl/transport/_unread.py``) and the
streams reset for the budget. ``--unbounded`` counts without refusing (the node as it
was before the budget: ``network.max_unread_bytes`` too large to be reached).

    python benchmarks/unread_windows.py --sources 1 --keys 16
    python benchmarks/unread_windows.py --sources 4 --keys 8 --unbounded

Needs Linux (/proc); runs on loopback only; a run takes ~10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hostile import HostileClient, memory_kb
from tests.test_r3_windows import BASE_WINDOW, STREAMS_PER_KEY, hoard
from tests.test_transport_bounds import NodeProcess

#: an unbounded node: its budget counts (the counters are reported) but a cap this large
#: never refuses, as before the budget existed
UNBOUNDED = 1 << 50


async def measure(sources: int, keys: int, unbounded: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="unread-windows-"))
    node = NodeProcess(tmp, **({"max_unread_bytes": UNBOUNDED} if unbounded else {}))
    peer, addr = node.peer_id, node.addr
    hosts = [f"127.0.0.{10 + i}" for i in range(sources)]
    clients = [HostileClient(f"unread-bench-{s}-{k}") for s in range(sources) for k in range(keys)]
    try:
        await asyncio.sleep(2.0)  # the node settles (imports, first status write)
        base = node.reset_peak()
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
            stats = node.report()["transport"]
            now = (stats["unread_bytes"], stats["unread_resets"])
            if now == last:
                break
            last = now
            await asyncio.sleep(0.5)
        stats = node.report()["transport"]
        memory = memory_kb(node.process.pid)
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
        node.stop()


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
