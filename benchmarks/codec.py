"""Wire codec throughput: encode + decode of a model vs a plain memory copy, same run.

    python benchmarks/codec.py [--params 10000000] [--repeats 5] [--threads N] [--no-codecs]

Prints, for a ``--params`` float32 model (default 10M parameters, 40 MB), the median of
``--repeats`` runs of:

- the baselines: ``bytes(...)`` of the tensor's memory and a numpy ``copy()``;
- ``wire.encode`` (sign included) and ``wire.decode`` (signature check, msgpack, tensor
  checks included), in MB/s of tensor payload and as a ratio to the copy baselines;
- signing: Ed25519 over the whole encoded message vs over a SHA-256 or BLAKE2b digest
  of it, and the matching verifications (why the wire signs a SHA-256 digest);
- the compression codecs' encode/decode speed, size and error (unless ``--no-codecs``).
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

from p2pfl.codecs import CODECS, get_codec
from p2pfl.identity import Identity, public_key_from_bytes, verify_with_key
from p2pfl.protocols.base import Message
from p2pfl.wire import DEFAULT_LIMITS, WireLimits, decode, encode, frame

MB = 1e6


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-codecs", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, reps = args.params, args.repeats

    identity = Identity.generate(hashlib.sha256(b"bench").digest())
    params = torch.randn(n, generator=torch.Generator().manual_seed(0))
    message = Message("model", 7, params, {"age": 3})
    payload = n * 4
    limits = WireLimits(max_message_bytes=max(DEFAULT_LIMITS.max_message_bytes, payload * 2))
    array = params.numpy()
    data = encode(message, identity=identity, protocol="dpsgd", seq=1)

    print(f"# wire codec, {n:,} float32 parameters ({payload / MB:.1f} MB), median of {reps}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    print(f"encoded size {len(frame(data)):,} B framed; Message.nbytes() {message.nbytes():,} B\n")

    rows: list[tuple[str, float]] = []

    def measure(name: str, fn: Callable[[], object]) -> float:
        seconds = median_seconds(fn, reps)
        rows.append((name, seconds))
        return seconds

    t_bytes = measure("copy: bytes(memoryview)", lambda: bytes(array.data))
    t_numpy = measure("copy: numpy .copy()", array.copy)
    t_enc = measure(
        "wire.encode (raw f32, signed)",
        lambda: encode(message, identity=identity, protocol="dpsgd", seq=1),
    )
    t_dec = measure("wire.decode (verified, checked)", lambda: decode(data, limits=limits))
    t_both = t_enc + t_dec

    print(f"{'operation':42} {'ms':>9} {'MB/s':>9}  vs bytes()  vs numpy")
    for name, seconds in rows + [("encode + decode", t_both)]:
        speed = payload / seconds / MB
        print(
            f"{name:42} {seconds * 1e3:9.1f} {speed:9.0f}"
            f"  {t_bytes / seconds:9.2f}x {t_numpy / seconds:8.2f}x"
        )

    print("\n# signing: whole message vs digest (Ed25519 hashes its input twice with SHA-512)")
    signed = data[:-66]
    key = public_key_from_bytes(identity.peer_id_bytes)
    sig_full = identity.sign(signed)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("sha256 of message", lambda: hashlib.sha256(signed).digest()),
        ("blake2b-256 of message", lambda: hashlib.blake2b(signed, digest_size=32).digest()),
        ("Ed25519 sign, whole message", lambda: identity.sign(signed)),
        ("Ed25519 sign, sha256 digest", lambda: identity.sign(hashlib.sha256(signed).digest())),
        (
            "Ed25519 sign, blake2b digest",
            lambda: identity.sign(hashlib.blake2b(signed, digest_size=32).digest()),
        ),
        ("Ed25519 verify, whole message", lambda: verify_with_key(key, signed, sig_full)),
        (
            "Ed25519 verify, sha256 digest",
            lambda: verify_with_key(key, hashlib.sha256(signed).digest(), sig_full),
        ),
    ]
    for name, fn in cases:
        seconds = median_seconds(fn, reps)
        print(f"{name:42} {seconds * 1e3:9.1f} ms  {len(signed) / seconds / MB:9.0f} MB/s")

    if args.no_codecs:
        return
    print("\n# compression codecs (payload MB/s of the fp32 input)")
    print(
        f"{'codec':8} {'encode ms':>10} {'decode ms':>10} {'bytes/param':>12} {'rel. L2 error':>14}"
    )
    for name in CODECS:
        codec = get_codec(name)
        blob, meta = codec.encode(params)
        t_e = median_seconds(functools.partial(codec.encode, params), reps)
        t_d = median_seconds(functools.partial(codec.decode, blob, meta, n), reps)
        err = float((codec.decode(blob, meta, n) - params).norm() / params.norm())
        print(f"{name:8} {t_e * 1e3:10.1f} {t_d * 1e3:10.1f} {len(blob) / n:12.3f} {err:14.2e}")


if __name__ == "__main__":
    main()
