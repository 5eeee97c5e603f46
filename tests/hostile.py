"""Tools of a hostile peer, for tests: its own libp2p host and identity, raw frames below
the envelope, crafted (validly signed or forged) messages, raw TCP garbage.

Everything here talks to a node on 127.0.0.1 only. A ``HostileClient`` is a real
``Libp2pTransport`` (so Noise authenticates it as its own peer id), reached below the
``Transport`` interface when a test needs to write frames no honest sender would.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Callable
from typing import Any

import torch
import trio
from libp2p.peer.id import ID

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.protocols.base import Message
from p2pfl.transport.libp2p import HEADER_SIZE, PROTOCOL_ID, Libp2pTransport
from p2pfl.wire import encode
from p2pfl.wire.signed import TAIL_BYTES


def identity(name: str) -> Identity:
    """A deterministic identity named ``name``."""
    return Identity.generate(hashlib.sha256(name.encode()).digest())


class Crafter:
    """Makes the messages of the hostile peer named ``name``, validly signed or forged."""

    def __init__(self, name: str) -> None:
        self.identity = identity(name)
        self.peer_id = self.identity.peer_id
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def message(
        self,
        round_: int,
        params: torch.Tensor | None,
        *,
        protocol: str = "dpsgd",
        seq: int | None = None,
        signer: Identity | None = None,
        kind: str = "model",
    ) -> bytes:
        """A validly signed message (by ``signer``, this client's own key by default)."""
        return encode(
            Message(kind, round_, params),
            identity=signer or self.identity,
            protocol=protocol,
            seq=self.next_seq() if seq is None else seq,
        )

    def hello(self) -> bytes:
        """The node's own peer-exchange greeting, announcing no addresses."""
        message = Message("hello", 0, None, {"addrs": {}, "reply": False})
        return encode(message, identity=self.identity, protocol="p2pfl", seq=self.next_seq())


class HostileClient(Crafter):
    """A peer with its own key and libp2p host that sends whatever a test tells it to."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.transport = Libp2pTransport(self.identity.libp2p_keypair)

    async def __aenter__(self) -> HostileClient:
        await self.transport.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    async def connect(self, addr: str) -> str:
        return await self.transport.connect(addr, timeout=10.0)

    async def send(self, peer: str, data: bytes) -> None:
        """A well-framed payload, acknowledged by the receiver's transport."""
        await self.transport.send(peer, data, timeout=10.0)

    async def raw_frame(self, peer: str, chunks: list[bytes], *, reset: bool = False) -> str:
        """Open a message stream and write ``chunks`` as they are (no framing added).

        The stream is then closed for writing (``reset``: reset instead); the result
        names what came back: the ack's ``repr``, or the exception a sender sees.
        """
        bridge, host = self.transport._bridge, self.transport._host
        assert bridge is not None and host is not None

        async def write() -> str:
            stream = await host.new_stream(ID.from_base58(peer), [PROTOCOL_ID])
            for chunk in chunks:
                await stream.write(chunk)
            if reset:
                await stream.reset()
                return "reset"
            await stream.close()
            try:
                with trio.fail_after(10):
                    return repr(await stream.read(1))
            except trio.TooSlowError:
                raise
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
                return type(exc).__name__

        return await bridge.run(write)


def libp2p_node(config: NodeConfig, name: str) -> Node:
    """An honest node over libp2p, its key derived from ``name`` (``identity``)."""
    who = identity(name)
    transport = Libp2pTransport(
        who.libp2p_keypair,
        listen_addrs=config.network.listen,
        max_message_size=config.network.max_message_bytes,
    )
    return Node(config, transport, who)


def length_prefix(size: int) -> bytes:
    return size.to_bytes(HEADER_SIZE, "big")


def tampered(data: bytes) -> bytes:
    """``data`` with one byte of its signed part flipped (the signature stays as it was)."""
    flipped = bytearray(data)
    flipped[len(data) - TAIL_BYTES - 1] ^= 0x01
    return bytes(flipped)


def port_of(addr: str) -> int:
    return int(addr.split("/tcp/")[1].split("/")[0])


def raw_tcp_garbage(port: int) -> None:
    """Below libp2p: a TCP client that sends junk instead of a handshake, then leaves."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(bytes(range(256)) * 16)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x13/multistream/1.0.0\n" + b"\x07/noise\n" + b"\xff" * 4096)


def on_round(node: Any, callback: Callable[[int], None]) -> None:
    """Call ``callback(finished_round)`` after each round ``node`` completes."""
    original = node._on_round

    def hooked(finished: int, model: Any) -> None:
        original(finished, model)
        callback(finished)

    node._on_round = hooked


def gate_training(node: Any, at_round: int) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold ``node``'s local training of round ``at_round`` until released.

    Returns ``(reached, release)``: ``reached`` is set when the node waits, setting
    ``release`` lets it go on. The node's loop keeps running meanwhile (it receives,
    answers, drops), so an attack timed with this lands in a known round.
    """
    reached, release = asyncio.Event(), asyncio.Event()
    original = node._train

    async def gated(effect: Any) -> None:
        if node.protocol is not None and node.protocol.round == at_round:
            reached.set()
            await release.wait()
        await original(effect)

    node._train = gated
    return reached, release


async def tear_down(nodes: list[Any], runs: list[Any], clients: list[HostileClient]) -> None:
    """Stop ``nodes``, wait for their ``runs`` (whatever they raised) and close the
    attackers' ``clients``: the ``finally`` of a hostile test's run."""
    for node in nodes:
        node.stop()
    await asyncio.gather(*runs, return_exceptions=True)
    for client in clients:
        await client.__aexit__()


# ---------------------------------------------------------------- a node in its own process


def memory_kb(pid: int | str = "self") -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak since start, or since ``reset_peak``) in kB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def reset_peak(pid: int | str = "self") -> None:
    """Start VmHWM over from the current RSS (Linux: ``clear_refs`` 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


def serve(config_path: str, report_path: str) -> None:
    """Run one node from a JSON config in this process, for tests that watch it from outside.

    Prints ``LISTENING <multiaddr>`` once it listens, then rewrites ``report_path``
    (atomically) every 50 ms with its transport counters, the peers its guard bans, the
    peers connected to it, its drops per peer and its own RSS, until it is stopped
    (SIGTERM).
    """
    import json
    import os
    from pathlib import Path

    from p2pfl.config import NodeConfig
    from p2pfl.node import Node
    from p2pfl.transport.limits import TransportLimits

    config = NodeConfig.model_validate(json.loads(Path(config_path).read_text()))
    who = identity("bounds-node")
    transport = Libp2pTransport(
        who.libp2p_keypair,
        listen_addrs=config.network.listen,
        max_message_size=config.network.max_message_bytes,
        limits=TransportLimits.from_config(config.network),
    )
    node = Node(config, transport, who)
    report, partial = Path(report_path), Path(report_path + ".tmp")

    def write_report() -> None:
        guard = node.guard.status()
        partial.write_text(
            json.dumps(
                {
                    "transport": transport.stats(),
                    "banned": guard["banned"],
                    "dropped": {p: s["dropped"] for p, s in guard["peers"].items()},
                    "connected": transport.connected_peers(),
                    "memory_kb": memory_kb(),
                }
            )
        )
        os.replace(partial, report)

    async def main() -> None:
        run = asyncio.ensure_future(node.run())
        await asyncio.wait_for(node.listening.wait(), 60)
        write_report()
        print("LISTENING", transport.listen_addrs[0], flush=True)
        while not run.done():
            write_report()
            await asyncio.wait([run], timeout=0.05)
        await run

    asyncio.run(main())


if __name__ == "__main__":  # python -m tests.hostile serve CONFIG.json REPORT.json
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "serve":
        sys.exit("usage: python -m tests.hostile serve CONFIG.json REPORT.json")
    serve(sys.argv[2], sys.argv[3])
