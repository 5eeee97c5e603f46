"""Signed envelopes: what decode accepts, what it refuses and why, and message sizes."""

from __future__ import annotations

import hashlib
import tracemalloc

import msgpack
import pytest
import torch

from p2pfl.identity import Identity
from p2pfl.protocols.base import Message
from p2pfl.wire import (
    DropReason,
    SignedRecord,
    WireError,
    WireLimits,
    decode,
    encode,
    frame,
    sign_record,
    verify_record,
)
from p2pfl.wire.signed import MESSAGE_DOMAIN, RECORD_DOMAIN, TAIL_BYTES, seal

ALICE = Identity.generate(hashlib.sha256(b"alice").digest())
MALLORY = Identity.generate(hashlib.sha256(b"mallory").digest())
LIMITS = WireLimits()


def _model(n: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _encode(message: Message, identity: Identity = ALICE, **kw: object) -> bytes:
    return encode(message, identity=identity, protocol="dpsgd", seq=kw.pop("seq", 1), **kw)  # type: ignore[arg-type]


def _reason(data: bytes, **kw: object) -> DropReason:
    with pytest.raises(WireError) as info:
        decode(data, limits=kw.pop("limits", LIMITS), **kw)  # type: ignore[arg-type]
    return info.value.reason


def _tensor(message: Message) -> torch.Tensor:
    """The decoded message's tensor, which the test sent (an assertion if it is missing)."""
    assert message.params is not None, f"{message.kind} arrived without its tensor"
    return message.params


def _signed_body(body: object, payload: bytes = b"", identity: Identity = ALICE) -> bytes:
    """A correctly signed message around an arbitrary body (a hostile but real peer)."""
    return seal(identity, msgpack.packb(body, use_bin_type=True), payload, MESSAGE_DOMAIN)


def test_round_trip_keeps_everything() -> None:
    params = _model()
    meta = {"age": 3, "view": {"peer": [1, 2]}, "blob": b"\x00\x01", "loss": 0.5, "x": None}
    data = _encode(Message("model", 7, params, meta), seq=42)
    env = decode(data, limits=LIMITS)
    assert (env.sender, env.protocol, env.round, env.seq) == (ALICE.peer_id, "dpsgd", 7, 42)
    assert env.message.kind == "model" and env.message.round == 7 and env.message.meta == meta
    assert torch.equal(_tensor(env.message), params)
    _tensor(env.message).add_(1.0)  # the decoded tensor is the receiver's own
    assert not torch.equal(_tensor(env.message), params)


def test_control_messages_have_no_tensor() -> None:
    env = decode(_encode(Message("ping", 0)), limits=LIMITS)
    assert env.message.params is None and env.message.meta == {}


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "topk"])
def test_codecs_travel_by_name(codec: str) -> None:
    params = _model(4096).reshape(64, 64)
    env = decode(_encode(Message("model", 1, params), codec=codec), limits=LIMITS)
    got = _tensor(env.message)
    assert got.shape == params.shape and got.dtype == torch.float32
    assert float((got - params).norm() / params.norm()) < (1.0 if codec == "topk" else 0.02)


def test_forged_signature_is_refused() -> None:
    data = _encode(Message("model", 1, _model()))
    digest = hashlib.sha256(data[:-TAIL_BYTES]).digest()
    forged = data[:-64] + MALLORY.sign(MESSAGE_DOMAIN + digest)  # right digest, wrong key
    assert _reason(forged) is DropReason.BAD_SIGNATURE
    # Mallory's id on Alice's signed body: the signature no longer matches the sender
    spoofed = data[:3] + MALLORY.peer_id_bytes + data[41:]
    assert _reason(spoofed) is DropReason.BAD_SIGNATURE


def test_tampering_anywhere_breaks_the_signature() -> None:
    data = bytearray(_encode(Message("model", 1, _model(100), {"age": 1})))
    for pos in (50, len(data) // 2, len(data) - TAIL_BYTES - 1):  # header, tensor, last byte
        tampered = bytearray(data)
        tampered[pos] ^= 0x01
        assert _reason(bytes(tampered)) is DropReason.BAD_SIGNATURE


def test_record_signature_is_not_a_message_signature() -> None:
    body = msgpack.packb({"v": 1, "p": "x", "k": "y", "r": 0, "q": 0})
    as_record = seal(ALICE, body, b"", RECORD_DOMAIN)
    assert _reason(as_record) is DropReason.BAD_SIGNATURE


def test_sender_without_an_ed25519_key_is_unknown() -> None:
    data = bytearray(_encode(Message("ping", 0)))
    data[3] = 0x12  # sha2-256 multihash code instead of identity: no key inside
    assert _reason(bytes(data)) is DropReason.UNKNOWN_SENDER


def test_oversized_is_refused_before_anything_is_allocated() -> None:
    data = _encode(Message("model", 1, _model(1_000_000)))  # 4 MB
    small = WireLimits(max_message_bytes=len(data) - 1)
    tracemalloc.start()
    try:
        assert _reason(data, limits=small) is DropReason.OVERSIZED
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # nothing proportional to the 4 MB payload
    assert decode(data, limits=WireLimits(max_message_bytes=len(data))).seq == 1


def test_nan_and_inf_tensors_are_refused() -> None:
    for bad in (float("nan"), float("inf")):
        params = _model(10)
        params[3] = bad
        assert _reason(_encode(Message("model", 1, params))) is DropReason.NON_FINITE


def test_layout_check_fixed_and_per_kind() -> None:
    data = _encode(Message("model", 1, _model(1000)))
    assert _tensor(decode(data, limits=LIMITS, layout_check=1000).message).numel() == 1000
    assert _tensor(decode(data, limits=LIMITS, layout_check=(1000,)).message).shape == (1000,)
    assert _reason(data, layout_check=999) is DropReason.BAD_TENSOR
    assert _reason(data, layout_check=(10, 100)) is DropReason.BAD_TENSOR
    per_kind = {"model": 1000, "head": 10}
    assert decode(data, limits=LIMITS, layout_check=lambda p, k: per_kind.get(k)).seq == 1
    head = _encode(Message("head", 1, _model(11)))
    assert _reason(head, layout_check=lambda p, k: per_kind.get(k)) is DropReason.BAD_TENSOR


def test_dtype_allow_list() -> None:
    data = _encode(Message("model", 1, torch.arange(4, dtype=torch.int64)))
    assert _tensor(decode(data, limits=LIMITS).message).dtype == torch.int64
    only_f32 = WireLimits(allowed_dtypes=frozenset({"f32"}))
    assert _reason(data, limits=only_f32) is DropReason.BAD_TENSOR


GOOD_BODY = {"v": 1, "p": "dpsgd", "k": "model", "r": 1, "q": 1}
GOOD_TENSOR = {"d": "f32", "s": [2]}
EIGHT = b"\x00" * 8


@pytest.mark.parametrize(
    ("body", "payload", "reason"),
    [
        ([1, 2, 3], b"", DropReason.MALFORMED),
        ({**GOOD_BODY, "z": 1}, b"", DropReason.MALFORMED),  # unknown key
        ({k: v for k, v in GOOD_BODY.items() if k != "q"}, b"", DropReason.MALFORMED),
        ({**GOOD_BODY, "v": 2}, b"", DropReason.MALFORMED),
        ({**GOOD_BODY, "v": True}, b"", DropReason.MALFORMED),
        ({**GOOD_BODY, "r": -1}, b"", DropReason.BAD_TYPE),
        ({**GOOD_BODY, "r": 1.0}, b"", DropReason.BAD_TYPE),
        ({**GOOD_BODY, "r": True}, b"", DropReason.BAD_TYPE),
        ({**GOOD_BODY, "q": "1"}, b"", DropReason.BAD_TYPE),
        ({**GOOD_BODY, "k": ""}, b"", DropReason.BAD_TYPE),
        ({**GOOD_BODY, "p": "x" * 65}, b"", DropReason.BAD_TYPE),
        ({**GOOD_BODY, "m": [1]}, b"", DropReason.BAD_TYPE),
        ({**GOOD_BODY, "m": {"a": msgpack.ExtType(1, b"x")}}, b"", DropReason.MALFORMED),
        (GOOD_BODY, EIGHT, DropReason.MALFORMED),  # payload without a tensor description
        ({**GOOD_BODY, "t": [1]}, EIGHT, DropReason.BAD_TYPE),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "b": EIGHT}}, EIGHT, DropReason.MALFORMED),
        ({**GOOD_BODY, "t": {"d": "f32"}}, EIGHT, DropReason.MALFORMED),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "d": "f128"}}, EIGHT, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "d": 1}}, EIGHT, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": GOOD_TENSOR}, EIGHT[:7], DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": GOOD_TENSOR}, EIGHT * 2, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "s": 2}}, EIGHT, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "s": [-2]}}, EIGHT, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "s": [1] * 9}}, EIGHT, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "s": [0, 2**62]}}, b"", DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "s": [1 << 20] * 2}}, EIGHT, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "x": {"chunk": 1}}}, EIGHT, DropReason.MALFORMED),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "c": "zip"}}, EIGHT, DropReason.BAD_TENSOR),
        (
            {**GOOD_BODY, "t": {**GOOD_TENSOR, "c": "int8", "x": {"chunk": "1"}}},
            EIGHT,
            DropReason.BAD_TYPE,
        ),
        ({**GOOD_BODY, "t": {"d": "f16", "s": [4], "c": "fp16"}}, EIGHT, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "c": "topk", "s": [0]}}, EIGHT, DropReason.BAD_TENSOR),
        ({**GOOD_BODY, "t": {**GOOD_TENSOR, "c": "fp32"}}, EIGHT[:4], DropReason.BAD_TENSOR),
    ],
)
def test_signed_but_hostile_bodies(body: object, payload: bytes, reason: DropReason) -> None:
    assert _reason(_signed_body(body, payload)) is reason


def test_good_body_decodes() -> None:
    env = decode(_signed_body({**GOOD_BODY, "t": GOOD_TENSOR}, EIGHT), limits=LIMITS)
    assert torch.equal(_tensor(env.message), torch.zeros(2))
    env = decode(_signed_body({**GOOD_BODY, "t": {**GOOD_TENSOR, "c": "fp32"}}, EIGHT))
    assert torch.equal(_tensor(env.message), torch.zeros(2))


@pytest.mark.parametrize(
    "layout",
    [
        b"\x94\xc4\x26" + ALICE.peer_id_bytes,  # stops after the sender
        b"\x94\xc4\x26" + ALICE.peer_id_bytes + b"\xc4\x05abc",  # body bin runs past the end
        b"\x94\xc4\x26" + ALICE.peer_id_bytes + b"\xc4\x00\xc4\x00",  # no signature
        b"\x94\xc4\x26" + ALICE.peer_id_bytes + b"\xa1x\xc4\x00" + bytes(66),  # body not bin
        b"\x94\xc4\x26" + ALICE.peer_id_bytes + b"\xc4\x00\xc4\x00" + bytes(66),  # sig hdr
        b"\x93\xc4\x26" + ALICE.peer_id_bytes + b"\xc4\x00\xc4\x00\xc4\x40" + bytes(64),
        b"\x94\xc4\x26" + ALICE.peer_id_bytes + b"\xc4\x00\xc4\x00\xc4\x40" + bytes(65),
    ],
)
def test_container_layout_errors(layout: bytes) -> None:
    assert _reason(layout) is DropReason.MALFORMED


def test_msgpack_bombs_are_refused_by_limits() -> None:
    # an array header claiming 2**32-1 elements, a 4 GiB bin, and deep nesting
    for body in (b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\x91" * 5000 + b"\x00"):
        assert _reason(seal(ALICE, body, b"", MESSAGE_DOMAIN)) is DropReason.MALFORMED
    nested: object = 0
    for _ in range(LIMITS.max_meta_depth + 1):
        nested = [nested]
    assert _reason(_signed_body({**GOOD_BODY, "m": {"n": nested}})) is DropReason.BAD_TYPE
    many = {"m": {str(i): list(range(1000)) for i in range(300)}}
    assert _reason(_signed_body({**GOOD_BODY, **many})) is DropReason.BAD_TYPE


def test_encode_refuses_what_peers_would_drop() -> None:
    with pytest.raises(ValueError, match="meta"):
        _encode(Message("model", 1, meta={"t": torch.zeros(1)}))
    with pytest.raises(ValueError, match="meta"):
        _encode(Message("model", 1, meta={1: "int key"}))  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="round"):
        _encode(Message("model", -1))
    with pytest.raises(ValueError, match="seq"):
        _encode(Message("model", 1), seq=2**64)
    with pytest.raises(ValueError, match="dtype"):
        _encode(Message("model", 1, torch.zeros(2, dtype=torch.complex64)))


# ---------------------------------------------------------------- relayed records


def test_signed_records_verify_from_their_origin_after_relaying() -> None:
    record = {"peer": ALICE.peer_id, "history": b"\x01\x02", "round": 3}
    signed = sign_record(ALICE, record)
    assert signed.origin == ALICE.peer_id
    # relayed by Mallory inside her own message's meta
    env = decode(_encode(Message("gossip", 3, meta={"records": [signed.to_bytes()]}), MALLORY))
    relayed = SignedRecord.from_bytes(env.message.meta["records"][0])
    assert verify_record(relayed) == record and relayed.origin == ALICE.peer_id
    assert env.sender == MALLORY.peer_id


def test_tampered_or_rewrapped_records_are_refused() -> None:
    data = sign_record(ALICE, {"round": 3}).to_bytes()
    tampered = data.replace(msgpack.packb({"round": 3}), msgpack.packb({"round": 9}))
    with pytest.raises(WireError) as info:
        verify_record(tampered)
    assert info.value.reason is DropReason.BAD_SIGNATURE
    claimed = data[:3] + MALLORY.peer_id_bytes + data[41:]  # Mallory claims Alice's record
    with pytest.raises(WireError):
        verify_record(claimed)
    message_sig = _encode(Message("ping", 0))  # a message is not a record
    with pytest.raises(WireError):
        verify_record(message_sig)
    with pytest.raises(WireError):
        verify_record(b"junk")
    with pytest.raises(ValueError):
        sign_record(ALICE, {"bad": object()})


# ---------------------------------------------------------------- sizes


def test_real_size_is_close_to_the_simulators_estimate() -> None:
    """``Message.nbytes()`` (tensor + meta + 160) vs the framed wire size.

    Model messages come out 5-8 bytes over the estimate, a ping 16 under; meta-heavy
    messages come out under it (msgpack packs small ints in 1-3 bytes, the estimate
    counts 9), so the estimate is an upper bound for them.
    """
    seq = (1_700_000_000_000 << 20) | 5  # a realistic, full-width sequence number
    models = [
        Message("model", 12, _model(10_000)),
        Message("model", 123_456, _model(100_000), {"age": 17}),
        Message("push", 5, _model(50_890), {"weight": 0.25}),
    ]
    for message in models:
        real = len(frame(_encode(message, seq=seq)))
        assert abs(real - message.nbytes()) <= 16, (message.kind, real, message.nbytes())
    controls = [
        Message("ping", 12),
        Message("view", 3, None, {"view": {ALICE.peer_id: [4, 1]}}),
        Message("view", 3, None, {"view": {f"{ALICE.peer_id}{i}": [40, 1] for i in range(9)}}),
    ]
    for message in controls:
        assert len(frame(_encode(message, seq=seq))) <= message.nbytes()
