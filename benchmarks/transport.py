"""Model-transfer throughput: our libp2p transport against plain asyncio TCP, on loopback.

Both sides speak the same framing: a 4-byte big-endian length, the payload, and
a 1-byte acknowledgement once the receiver holds the whole payload.  A transfer
is timed from the first byte sent to the acknowledgement, over a connection
that is already open and warmed up by one transfer of the same size (for ours,
as in a node, successive transfers to a peer reuse one libp2p stream).

By default both ends run in this process and each transfer is also charged the
CPU time the process spent on it (sender and receiver together): on a shared,
busy machine the wall-clock rates swing with the load, the CPU rates much less.
``--receiver-process`` runs each receiver in its own process instead, as a real
peer would (wall clock only).  ``--stock-yamux`` measures our transport with
py-libp2p's own yamux, to show what ``p2pfl.transport._yamux`` buys.

    python benchmarks/transport.py                      # 1, 10, 50 MB, median of 5
    python benchmarks/transport.py --sizes 1 10 --repeats 3 --receiver-process

MB is 10**6 bytes.  The target is a ratio (asyncio / ours) of at most 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

import p2pfl.transport.libp2p as libp2p_transport
from p2pfl.transport.libp2p import Libp2pTransport

MB = 1_000_000
ACK = b"\x01"
Sender = Callable[[bytes], Awaitable[None]]


# -- plain asyncio TCP --------------------------------------------------------


async def _tcp_serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(4), "big")
            await reader.readexactly(size)
            writer.write(ACK)
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def tcp_receiver() -> tuple[str, Callable[[], Awaitable[None]]]:
    server = await asyncio.start_server(_tcp_serve_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return f"127.0.0.1:{port}", close


async def tcp_sender(address: str) -> tuple[Sender, Callable[[], Awaitable[None]]]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send(data: bytes) -> None:
        writer.write(len(data).to_bytes(4, "big"))
        writer.write(data)
        await writer.drain()
        if await reader.readexactly(1) != ACK:
            raise RuntimeError("bad acknowledgement")

    async def close() -> None:
        writer.close()
        await writer.wait_closed()

    return send, close


# -- our libp2p transport -------------------------------------------------------


async def libp2p_receiver() -> tuple[str, Callable[[], Awaitable[None]]]:
    transport = Libp2pTransport(create_new_key_pair())
    transport.set_handler(lambda sender, data: None)
    await transport.start()
    return transport.listen_addrs[0], transport.close


async def libp2p_sender(address: str) -> tuple[Sender, Callable[[], Awaitable[None]]]:
    transport = Libp2pTransport(create_new_key_pair())
    await transport.start()
    peer = await transport.connect(address)

    async def send(data: bytes) -> None:
        await transport.send(peer, data, timeout=300)

    return send, transport.close


RECEIVERS = {"asyncio": tcp_receiver, "libp2p": libp2p_receiver}
SENDERS = {"asyncio": tcp_sender, "libp2p": libp2p_sender}


# -- receivers in another process ---------------------------------------------


async def serve_until_stdin_closes(kind: str) -> None:
    """``--serve KIND``: print the receiver's address, then serve until stdin closes."""
    address, close = await RECEIVERS[kind]()
    print(address, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await close()


class RemoteReceiver:
    def __init__(self, kind: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.address = self.process.stdout.readline().strip()
        if not self.address:
            raise RuntimeError(f"{kind} receiver did not start")

    async def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.get_running_loop().run_in_executor(None, self.process.wait, 30)


# -- measurement ----------------------------------------------------------------


async def measure(
    kind: str, sizes: list[int], repeats: int, in_process: bool
) -> dict[int, tuple[float, float]]:
    """Per size: median wall-clock MB/s and median MB per CPU-second, after one warm-up."""
    if in_process:
        address, close_receiver = await RECEIVERS[kind]()
    else:
        remote = RemoteReceiver(kind)
        address, close_receiver = remote.address, remote.close
    send, close_sender = await SENDERS[kind](address)
    results = {}
    try:
        for size in sizes:
            payload = os.urandom(size)
            await send(payload)  # warm-up: connection, windows, allocator
            walls, cpus = [], []
            for _ in range(repeats):
                cpu, began = time.process_time(), time.perf_counter()
                await send(payload)
                walls.append(time.perf_counter() - began)
                cpus.append(time.process_time() - cpu)
            results[size] = (
                size / MB / statistics.median(walls),
                size / MB / statistics.median(cpus),
            )
    finally:
        await close_sender()
        await close_receiver()
    return results


def _keep_stock_yamux(host: IHost, on_abuse: Callable[[ID, str], None] | None = None) -> None:
    """Stand-in for ``use_patched_yamux`` (same signature) that leaves py-libp2p's own yamux."""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50], help="MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--receiver-process", action="store_true", help="receivers in a subprocess")
    parser.add_argument("--stock-yamux", action="store_true", help="py-libp2p's unpatched yamux")
    parser.add_argument("--serve", choices=sorted(RECEIVERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stock_yamux:
        libp2p_transport.use_patched_yamux = _keep_stock_yamux
    if args.serve:
        await serve_until_stdin_closes(args.serve)
        return

    sizes = [int(mb * MB) for mb in args.sizes]
    in_process = not args.receiver_process
    where = "both ends in one process" if in_process else "receiver in its own process"
    yamux = "stock" if args.stock_yamux else "patched"
    print(f"loopback, {where}, {yamux} yamux, median of {args.repeats} warm transfers")
    print(f"MB = 10^6 bytes; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    plain = await measure("asyncio", sizes, args.repeats, in_process)
    ours = await measure("libp2p", sizes, args.repeats, in_process)
    columns = ["payload", "asyncio MB/s", "p2pfl MB/s", "ratio"]
    if in_process:
        columns += ["asyncio MB/cpu-s", "p2pfl MB/cpu-s", "cpu ratio"]
    print("  ".join(f"{c:>16}" for c in columns))
    worst = 0.0
    for size in sizes:
        ratio = plain[size][0] / ours[size][0]
        worst = max(worst, ratio)
        cells = [
            f"{size / MB:g} MB",
            f"{plain[size][0]:.0f}",
            f"{ours[size][0]:.0f}",
            f"{ratio:.2f}x",
        ]
        if in_process:
            cpu_ratio = plain[size][1] / ours[size][1]
            cells += [f"{plain[size][1]:.0f}", f"{ours[size][1]:.0f}", f"{cpu_ratio:.2f}x"]
        print("  ".join(f"{c:>16}" for c in cells))
    verdict = "within" if worst <= 3 else "NOT within"
    print(f"worst wall-clock ratio {worst:.2f}x: {verdict} the 3x target")


if __name__ == "__main__":
    asyncio.run(main())
