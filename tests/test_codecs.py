"""Model compression codecs: documented error bounds, sizes, hostile payloads."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from p2pfl.codecs import (
    CODECS,
    CodecError,
    EncodedMessage,
    Int8Codec,
    TopKCodec,
    all_finite,
    get_codec,
)

# hypothesis runs derandomized: the same examples on every run
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)

vectors = arrays(
    np.float32,
    st.integers(0, 400),
    elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
)


def _round_trip(name: str, x: torch.Tensor, **options: object) -> tuple[torch.Tensor, bytes]:
    codec = get_codec(name, **options)
    payload, meta = codec.encode(x)
    y = get_codec(name).decode(payload, meta, x.numel())
    assert y.dtype == torch.float32 and y.shape == (x.numel(),)
    return y, payload


@PROPERTY
@given(vectors)
def test_fp32_is_exact(x: np.ndarray) -> None:
    t = torch.from_numpy(x)
    y, payload = _round_trip("fp32", t)
    assert torch.equal(y, t) and len(payload) == 4 * t.numel()


@PROPERTY
@given(vectors)
def test_fp16_relative_error_bound(x: np.ndarray) -> None:
    t = torch.from_numpy(x)
    y, payload = _round_trip("fp16", t)
    assert len(payload) == 2 * t.numel()
    bound = torch.maximum(t.abs() * 2.0**-11, torch.full_like(t, 2.0**-25))
    assert bool(((y - t).abs() <= bound).all())


@PROPERTY
@given(vectors, st.sampled_from([1, 7, 64, 256]))
def test_int8_error_is_half_a_step_per_chunk(x: np.ndarray, chunk: int) -> None:
    t = torch.from_numpy(x)
    y, payload = _round_trip("int8", t, chunk=chunk)
    n = t.numel()
    assert len(payload) == n + 4 * math.ceil(n / chunk)
    pad = -n % chunk
    blocks = torch.nn.functional.pad(t, (0, pad)).view(-1, chunk)
    errors = torch.nn.functional.pad(y - t, (0, pad)).view(-1, chunk).abs()
    half_step = blocks.abs().amax(dim=1, keepdim=True) / 254
    assert bool((errors <= half_step * (1 + 1e-5) + 2.0**-149).all())


@PROPERTY
@given(vectors.filter(lambda a: a.size > 0), st.floats(0.001, 1.0))
def test_topk_keeps_the_largest_exactly(x: np.ndarray, ratio: float) -> None:
    t = torch.from_numpy(x)
    y, payload = _round_trip("topk", t, ratio=ratio)
    n, k = t.numel(), len(payload) // 8
    assert k == max(1, math.ceil(ratio * n))
    kept = y != 0
    assert bool((y[kept] == t[kept]).all())
    # no dropped value is larger than a kept one
    if kept.any() and (~kept).any():
        assert float(t[~kept].abs().max()) <= float(t[kept].abs().min())
    err, norm = float((y - t).norm()), float(t.norm())
    assert err <= math.sqrt(1 - k / n) * norm * (1 + 1e-5) + 1e-6


def test_typical_errors_on_a_gaussian_model() -> None:
    t = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    rel = {}
    for name in CODECS:
        y, _ = _round_trip(name, t)
        rel[name] = float((y - t).norm() / t.norm())
    assert rel["fp32"] == 0.0
    assert rel["fp16"] < 3e-4
    assert rel["int8"] < 1.5e-2
    assert 0.9 < rel["topk"] < 1.0  # 1% of a Gaussian vector holds little of its energy


def test_encode_refuses_what_it_cannot_represent() -> None:
    for name in CODECS:
        with pytest.raises(ValueError, match="NaN"):
            get_codec(name).encode(torch.tensor([1.0, float("nan")]))
        with pytest.raises(ValueError, match="float"):
            get_codec(name).encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="range"):
        get_codec("fp16").encode(torch.tensor([1e6]))
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("zip")
    with pytest.raises(ValueError):
        Int8Codec(chunk=0)
    with pytest.raises(ValueError):
        TopKCodec(ratio=0.0)


def test_empty_vectors_round_trip() -> None:
    for name in CODECS:
        y, _ = _round_trip(name, torch.zeros(0))
        assert y.numel() == 0


def _u32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


@pytest.mark.parametrize(
    ("name", "payload", "meta", "numel"),
    [
        ("fp32", b"\x00" * 7, {}, 2),
        ("fp32", b"\x00" * 8, {"extra": 1}, 2),
        ("fp16", b"\x00" * 3, {}, 2),
        ("int8", _f32(1.0) + b"\x01\x02", {}, 2),  # no chunk
        ("int8", _f32(1.0) + b"\x01\x02", {"chunk": 0}, 2),
        ("int8", _f32(1.0) + b"\x01\x02", {"chunk": True}, 2),
        ("int8", _f32(1.0) + b"\x01", {"chunk": 4}, 2),  # short
        ("int8", _f32(-1.0) + b"\x01\x02", {"chunk": 4}, 2),  # negative scale
        ("int8", _f32(float("nan")) + b"\x01\x02", {"chunk": 4}, 2),
        ("topk", _u32(0) + _f32(1.0) + b"\x00", {}, 4),  # not k*8 bytes
        ("topk", _u32(4) + _f32(1.0), {}, 4),  # index out of range
        ("topk", _u32(2, 1) + _f32(1.0, 2.0), {}, 4),  # not increasing
        ("topk", _u32(1, 1) + _f32(1.0, 2.0), {}, 4),  # duplicate
        ("topk", _u32(0, 1, 2) + _f32(1.0, 2.0, 3.0), {}, 2),  # k > numel
    ],
)
def test_hostile_payloads_raise_codec_error(
    name: str, payload: bytes, meta: dict[str, object], numel: int
) -> None:
    with pytest.raises(CodecError):
        get_codec(name).decode(payload, meta, numel)


def test_all_finite() -> None:
    assert all_finite(torch.zeros(0))
    assert all_finite(torch.tensor([1.0, -3e38], dtype=torch.float32))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert not all_finite(torch.tensor([0.0, bad, 1.0], dtype=dtype))
            grid = torch.zeros(4, 5, dtype=dtype)
            grid[3, 1] = bad
            assert not all_finite(grid.t())  # not contiguous
            assert all_finite(grid[:3].t())
    assert all_finite(torch.ones(3, requires_grad=True))
    assert not all_finite(torch.tensor([1.0, float("nan")], requires_grad=True))


@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
     torch.int16, torch.int8, torch.uint8, torch.bool],
)  # fmt: skip
def test_little_endian_bytes_read_back_as_new_writable_tensors(dtype: torch.dtype) -> None:
    from p2pfl.codecs import tensor_from_le_bytes, tensor_to_le_bytes

    for shape in ((7, 3), (21,), (0,), (2, 0, 3)):
        x = (torch.randn(*shape) * 50).to(dtype)
        data = bytes(tensor_to_le_bytes(x))
        assert len(data) == x.numel() * x.element_size()
        back = tensor_from_le_bytes(data, dtype, shape)
        assert back.dtype == dtype and back.shape == x.shape and torch.equal(back, x)
        if back.numel():
            back.view(-1)[0] = back.view(-1)[-1]  # a copy of its own, writable
            assert bytes(tensor_to_le_bytes(x)) == data
    # the bytes are little-endian whatever the host: 1.0 as float32 is 00 00 80 3f
    one = tensor_from_le_bytes(b"\x00\x00\x80\x3f", torch.float32, (1,))
    assert one.item() == 1.0
    with pytest.raises(CodecError):
        tensor_from_le_bytes(b"\x00" * 5, dtype, (2,))  # 5 bytes are never 2 elements


# ---------------------------------------------------------------- encoded messages on the wire


def _encoded(name: str, x: torch.Tensor) -> EncodedMessage:
    from p2pfl.codecs import EncodedMessage, Encoding
    from p2pfl.messages import Message

    codec = get_codec(name, **({"k": 5} if name == "topk" else {}))
    payload, meta = codec.encode(x)
    decoded = codec.decode(payload, meta, x.numel())
    return EncodedMessage.of(Message("model", 3, x, {"a": 1}), decoded, Encoding(name, payload, meta))


@pytest.mark.parametrize("name", ["fp16", "int8", "topk"])
def test_an_encoded_message_travels_as_its_payload_and_decodes_to_its_params(name: str) -> None:
    """The wire sends the sender's one encoding; the receiver decodes exactly ``params``."""
    from p2pfl.codecs import EncodedMessage
    from p2pfl.identity import Identity
    from p2pfl.wire import decode, encode

    x = torch.linspace(-2.0, 3.0, 700)
    message = _encoded(name, x)
    assert isinstance(message, EncodedMessage) and message.encoding is not None
    data = encode(message, identity=Identity.generate(b"\x01" * 32), protocol="dpsgd", seq=1)
    received = decode(data, layout_check=700).message
    assert isinstance(received, EncodedMessage) and received.encoding is not None
    assert received.encoding.payload == message.encoding.payload
    assert received.params is not None and message.params is not None
    assert torch.equal(received.params, message.params)
    # what the simulator counts is within a few bytes of the real envelope
    assert abs(message.nbytes() - len(data)) < 100 < 4 * 700 - len(message.encoding.payload)


def test_rewriting_an_encoded_message_drops_its_payload() -> None:
    """``dataclasses.replace`` (an attacker's rewrite) never sends a stale payload."""
    import dataclasses

    from p2pfl.codecs import EncodedMessage

    message = _encoded("fp16", torch.ones(10))
    rewritten = dataclasses.replace(message, params=torch.zeros(10))
    assert isinstance(rewritten, EncodedMessage) and rewritten.encoding is None
    assert rewritten.nbytes() > message.nbytes()  # 4 bytes a value again


def test_a_codec_payload_larger_than_any_codec_makes_is_refused_before_decoding() -> None:
    import msgpack

    from p2pfl.identity import Identity
    from p2pfl.wire import DropReason, WireError, decode
    from p2pfl.wire.signed import MESSAGE_DOMAIN, seal

    body = {"v": 1, "p": "dpsgd", "k": "model", "r": 0, "q": 1}
    body["t"] = {"d": "f32", "s": [10], "c": "topk", "x": {}}
    data = seal(Identity.generate(b"\x02" * 32), msgpack.packb(body), b"\x00" * 88, MESSAGE_DOMAIN)
    with pytest.raises(WireError) as caught:
        decode(data, layout_check=10)
    assert caught.value.reason is DropReason.BAD_TENSOR and "88 codec bytes" in str(caught.value)
