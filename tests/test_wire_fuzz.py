"""Property tests of the wire codec (hypothesis, derandomized, example counts stated).

- round trips of random messages: 300 examples
- arbitrary bytes: 1000 examples; mutated valid messages: 300
- validly *signed* hostile bodies (random bytes: 300, random msgpack maps: 200, mutated
  real bodies and payloads: 200), because the signature is checked first and unsigned
  garbage never reaches the msgpack parser or the schema checks
In every refusal the error is a ``WireError`` and never the decoder's last-resort
"internal error" (which would mean an unexpected exception was caught).
"""

from __future__ import annotations

import hashlib
import math

import msgpack
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.identity import Identity
from p2pfl.protocols.base import Message
from p2pfl.wire import DTYPES, DropReason, WireError, WireLimits, decode, encode
from p2pfl.wire.signed import MESSAGE_DOMAIN, bin_header, open_sealed, seal

ALICE = Identity.generate(hashlib.sha256(b"alice").digest())
LIMITS = WireLimits(max_message_bytes=1 << 20)


def prop(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True)


# ---------------------------------------------------------------- strategies

keys = st.text(max_size=8)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),  # non-finite meta is refused
    st.text(max_size=20),
    st.binary(max_size=20),
)


def plain(depth: int) -> st.SearchStrategy[object]:
    if depth == 0:
        return scalars
    inner = plain(depth - 1)
    return st.one_of(scalars, st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3))


metas = st.dictionaries(keys, plain(3), max_size=4)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen) * 100).to(dtype)
    elif dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=gen).bool()
    else:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        t = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).view(dtype)
        t = t.reshape(shape)
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t()  # non-contiguous input
    return t


messages = st.builds(
    Message,
    kind=st.text(min_size=1, max_size=16),
    round=st.integers(0, 2**63 - 1),
    params=st.none() | tensors(),
    meta=metas,
)


def encoded(message: Message, seq: int = 1) -> bytes:
    return encode(message, identity=ALICE, protocol="proto", seq=seq)


def refused(data: bytes) -> WireError:
    """Decode must refuse ``data`` with a WireError that is not a caught bug."""
    try:
        decode(data, limits=LIMITS)
    except WireError as exc:
        assert not exc.detail.startswith("internal error"), exc.detail
        return exc
    raise AssertionError("decoded")


def decodes_or_refuses(data: bytes) -> None:
    try:
        decode(data, limits=LIMITS)
    except WireError as exc:
        assert not exc.detail.startswith("internal error"), exc.detail


# ---------------------------------------------------------------- round trips


@prop(300)
@given(messages, st.integers(0, 2**64 - 1), st.text(min_size=1, max_size=64))
def test_round_trip(message: Message, seq: int, protocol: str) -> None:
    data = encode(message, identity=ALICE, protocol=protocol, seq=seq)
    env = decode(data, limits=LIMITS)
    assert (env.sender, env.protocol, env.round, env.seq) == (
        ALICE.peer_id,
        protocol,
        message.round,
        seq,
    )
    assert env.message.kind == message.kind and env.message.round == message.round
    assert env.message.meta == message.meta
    if message.params is None:
        assert env.message.params is None
    else:
        got = env.message.params
        assert got is not None
        assert got.dtype == message.params.dtype and got.shape == message.params.shape
        assert torch.equal(got, message.params)


# ---------------------------------------------------------------- unsigned garbage

sealed_prefix = b"\x94\xc4\x26" + ALICE.peer_id_bytes


@prop(1000)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=200).map(lambda b: sealed_prefix + b),
        st.binary(max_size=200).map(lambda b: sealed_prefix + b + b"\xc4\x40" + bytes(64)),
        st.binary(max_size=200).map(
            lambda b: sealed_prefix + bin_header(len(b)) + b + b"\xc4\x00\xc4\x40" + bytes(64)
        ),
    )
)
def test_arbitrary_bytes_only_raise_wire_error(data: bytes) -> None:
    refused(data)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, bytes]:
    data = encoded(draw(messages))
    op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
    pos = draw(st.integers(0, len(data) - 1))
    if op == "flip":
        bit = draw(st.integers(0, 7))
        mutated = data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]
    elif op == "truncate":
        mutated = data[:pos]
    elif op == "insert":
        mutated = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    elif op == "delete":
        mutated = data[:pos] + data[pos + draw(st.integers(1, 8)) :]
    else:
        mutated = data[:pos] + draw(st.binary(min_size=1, max_size=16))
    return data, mutated


@prop(300)
@given(mutations())
def test_mutated_messages_are_refused(pair: tuple[bytes, bytes]) -> None:
    original, mutated = pair
    if mutated == original:
        return
    assert refused(mutated).reason in {
        DropReason.BAD_SIGNATURE,
        DropReason.MALFORMED,
        DropReason.UNKNOWN_SENDER,
    }


# ---------------------------------------------------------------- signed hostile bodies


def signed(body: bytes, payload: bytes = b"") -> bytes:
    return seal(ALICE, body, payload, MESSAGE_DOMAIN)


@prop(300)
@given(st.binary(max_size=300), st.binary(max_size=64))
def test_signed_random_bodies(body: bytes, payload: bytes) -> None:
    decodes_or_refuses(signed(body, payload))


tensor_fields = st.dictionaries(
    st.sampled_from(list("dscxz")),
    st.one_of(
        scalars,
        st.sampled_from(sorted(DTYPES) + ["fp32", "fp16", "int8", "topk"]),
        st.lists(st.integers(-3, 1 << 21), max_size=4),
        st.dictionaries(st.sampled_from(["chunk", "k"]), st.integers(-2, 300), max_size=2),
    ),
    max_size=5,
)
body_values = st.one_of(
    scalars, st.integers(0, 10), st.text(min_size=1, max_size=4), metas, tensor_fields
)
bodies = st.dictionaries(st.sampled_from(list("vpkrqmtz")), body_values, max_size=8)


@prop(200)
@given(bodies, st.binary(max_size=64))
def test_signed_random_msgpack_bodies(body: dict[str, object], payload: bytes) -> None:
    decodes_or_refuses(signed(msgpack.packb(body, use_bin_type=True), payload))


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A real message's body and payload, mutated, then signed again."""
    opened = open_sealed(encoded(draw(messages)), 1 << 30, MESSAGE_DOMAIN)
    body, payload = bytearray(opened.body), bytearray(opened.payload)
    for _ in range(draw(st.integers(1, 4))):
        target = body if not payload or draw(st.booleans()) else payload
        if target:
            target[draw(st.integers(0, len(target) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return bytes(body), bytes(payload)


@prop(200)
@given(mutated_bodies())
def test_signed_mutated_bodies(pair: tuple[bytes, bytes]) -> None:
    decodes_or_refuses(signed(*pair))
