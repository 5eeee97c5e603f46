"""The cost of signed relayed data (issue 8): MoDeST view entries, SybilWall histories.

    python benchmarks/relayed.py [--peers 100 1000] [--params 100000 1000000] [--repeats 5]

Prints medians of ``--repeats`` runs, signed vs unsigned, same run:

- one record: ``IdentitySigner.sign`` and ``.verify`` of a view entry;
- one MoDeST view message (a ``"view"`` answer: the whole view, no model) for a view of
  ``--peers`` members, every entry carrying its subject's record as on a real node: the
  sender's meta (``_view_wire``), ``wire.encode``, and on the receiver ``wire.decode`` +
  the protocol's merge, (a) in the steady state (nothing new: no verification at all) and
  (b) when every entry is new to the receiver (one verification per entry, the worst
  case, e.g. a joiner's first view); plus the encoded bytes;
- one SybilWall history message for a ``--params`` model: the subject's round cost
  (add to ``D``, SHA-256, sign), and the receiver's check (verify + SHA-256) next to
  ``wire.encode`` + ``wire.decode`` of the same tensor.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import platform
import statistics
import time
from collections.abc import Callable

import torch

from p2pfl.identity import Identity
from p2pfl.protocols.base import Message, MessageReceived
from p2pfl.protocols.modest import ModestProtocol, ViewEntry
from p2pfl.protocols.modest.protocol import entry_record
from p2pfl.protocols.records import IdentitySigner
from p2pfl.protocols.sybilwall import history_digest, history_record
from p2pfl.wire import decode, encode


def median_seconds(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def identities(n: int) -> list[Identity]:
    return [Identity.generate(hashlib.sha256(f"bench:{i}".encode()).digest()) for i in range(n)]


def modest(peer: Identity, population: list[str], signed: bool) -> ModestProtocol:
    signer = IdentitySigner(peer) if signed else None
    return ModestProtocol(peer.peer_id, torch.zeros(4), [], population=population, signer=signer)


def bench_view(n: int, repeats: int) -> dict[str, dict[str, float]]:
    keys = identities(n + 1)
    ids = [k.peer_id for k in keys[:n]]
    receiver_key = keys[n]
    population = [*ids, receiver_key.peer_id]
    # every member took part in some round and signed its entry, as in a running system
    entries = {k.peer_id: ViewEntry(5 + i % 7, False, i % 3) for i, k in enumerate(keys[:n])}
    records = {
        k.peer_id: IdentitySigner(k).sign(entry_record(entries[k.peer_id])) for k in keys[:n]
    }
    out: dict[str, dict[str, float]] = {}
    for signed in (False, True):
        sender = modest(keys[0], population, signed)
        for peer, entry in entries.items():
            sender.view.set(peer, entry)
            if signed and peer != sender.peer_id:
                sender._proofs[peer] = (entry, records[peer])
        sender._view_wire()  # the sender's own record, signed once
        meta_time = median_seconds(sender._view_wire, repeats)
        message = Message("view", 9, None, {"view": sender._view_wire(), "at": 9, "done": 8})
        data = encode(message, identity=keys[0], protocol="modest", seq=1)
        encode_time = median_seconds(
            functools.partial(encode, message, identity=keys[0], protocol="modest", seq=1),
            repeats,
        )
        receiver: list[ModestProtocol] = []

        def fresh(signed: bool = signed, receiver: list[ModestProtocol] = receiver) -> None:
            receiver[:] = [modest(receiver_key, population, signed)]

        def receive(data: bytes = data, receiver: list[ModestProtocol] = receiver) -> None:
            envelope = decode(data)
            receiver[0].handle(MessageReceived(1.0, envelope.sender, envelope.message))

        first = median_seconds(receive, repeats, setup=fresh)
        fresh()
        receive()
        assert dict(receiver[0].view) == dict(sender.view)  # the whole view got through
        steady = median_seconds(receive, repeats)
        out["signed" if signed else "unsigned"] = {
            "bytes": len(data),
            "meta_ms": meta_time * 1e3,
            "encode_ms": encode_time * 1e3,
            "steady_ms": steady * 1e3,
            "first_ms": first * 1e3,
        }
    return out


def bench_history(d: int, repeats: int) -> dict[str, float]:
    subject, relayer = identities(2)
    signer = IdentitySigner(subject)
    total = torch.randn(d, generator=torch.Generator().manual_seed(1))
    sent = torch.randn(d, generator=torch.Generator().manual_seed(2))

    def declare() -> bytes:
        return signer.sign(history_record(total + sent, 12))

    proof = declare()

    def check() -> bool:
        opened = signer.verify(proof)
        return opened is not None and opened[1] == history_record(total + sent, 12)

    declared = total + sent
    assert check()
    message = Message("history", 12, declared, {"subject": subject.peer_id, "hops": 1, "hr": 12, "proof": proof})
    data = encode(message, identity=relayer, protocol="sybilwall", seq=1)
    return {
        "declare_ms": median_seconds(declare, repeats) * 1e3,
        "digest_ms": median_seconds(lambda: history_digest(declared), repeats) * 1e3,
        "check_ms": median_seconds(check, repeats) * 1e3,
        "wire_ms": median_seconds(
            lambda: decode(encode(message, identity=relayer, protocol="sybilwall", seq=1)), repeats
        )
        * 1e3,
        "bytes": len(data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} thread(s)")

    key = Identity.generate(b"\x07" * 32)
    signer = IdentitySigner(key)
    record = entry_record(ViewEntry(123, False, 2))
    data = signer.sign(record)
    sign_us = median_seconds(lambda: [signer.sign(record) for _ in range(200)], args.repeats) / 200 * 1e6
    verify_us = median_seconds(lambda: [signer.verify(data) for _ in range(200)], args.repeats) / 200 * 1e6
    print(f"\none view entry record: {len(data)} bytes; sign {sign_us:.1f} us, verify {verify_us:.1f} us")

    print("\nMoDeST view message (whole view, no model); ms, medians")
    header = "peers | mode     |  bytes  | sender meta | encode | receive, steady | receive, all new"
    print(header)
    for n in args.peers:
        rows = bench_view(n, args.repeats)
        for mode in ("unsigned", "signed"):
            r = rows[mode]
            print(
                f"{n:5d} | {mode:8s} | {r['bytes']:7d} | {r['meta_ms']:11.2f} | {r['encode_ms']:6.2f} |"
                f" {r['steady_ms']:15.2f} | {r['first_ms']:16.2f}"
            )
        u, s = rows["unsigned"], rows["signed"]
        print(
            f"{n:5d} | ratio    | {s['bytes'] / u['bytes']:6.2f}x | {s['meta_ms'] / u['meta_ms']:10.2f}x |"
            f" {s['encode_ms'] / u['encode_ms']:5.2f}x | {s['steady_ms'] / u['steady_ms']:14.2f}x |"
            f" {s['first_ms'] / u['first_ms']:15.2f}x"
        )
        sender_u = u["meta_ms"] + u["encode_ms"]
        sender_s = s["meta_ms"] + s["encode_ms"]
        print(
            f"        per message, sender + steady receiver: {sender_u + u['steady_ms']:.2f} ms unsigned,"
            f" {sender_s + s['steady_ms']:.2f} ms signed ({(sender_s + s['steady_ms']) / (sender_u + u['steady_ms']):.2f}x);"
            f" {s['bytes'] - u['bytes']} more bytes ({(s['bytes'] - u['bytes']) / n:.0f} per entry)"
        )

    print("\nSybilWall history message; ms, medians")
    print("params  | bytes     | subject: D + digest + sign | digest alone | receiver: verify + digest | wire encode+decode")
    for d in args.params:
        r = bench_history(d, args.repeats)
        print(
            f"{d:7d} | {r['bytes']:9d} | {r['declare_ms']:26.2f} | {r['digest_ms']:12.2f} |"
            f" {r['check_ms']:25.2f} | {r['wire_ms']:18.2f}"
        )
        print(f"        receiver's check / wire encode+decode: {r['check_ms'] / r['wire_ms']:.2f}x")


if __name__ == "__main__":
    main()
