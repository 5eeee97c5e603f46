"""Length-prefixed framing: any chunking, oversized prefixes, truncated streams."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.wire import DropReason, FrameReader, WireError, frame, frame_header

PAYLOADS = [b"first frame", b"", b"\x00" * 300, b"last"]
STREAM = b"".join(frame(p) for p in PAYLOADS)


def _feed_all(reader: FrameReader, chunks: list[bytes]) -> list[bytes]:
    return [bytes(f) for chunk in chunks for f in reader.feed(chunk)]


def test_frame_layout() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(memoryview(b"abc")) == frame(b"abc")
    assert frame_header(2**32 - 1) == b"\xff\xff\xff\xff"
    with pytest.raises(ValueError):
        frame_header(2**32)


def test_split_at_every_position() -> None:
    for cut in range(len(STREAM) + 1):
        reader = FrameReader(max_frame_bytes=1024)
        assert _feed_all(reader, [STREAM[:cut], STREAM[cut:]]) == PAYLOADS
        reader.eof()


def test_split_at_every_pair_of_positions_of_a_short_stream() -> None:
    stream = frame(b"ab") + frame(b"") + frame(b"cde")
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            reader = FrameReader(max_frame_bytes=16)
            got = _feed_all(reader, [stream[:i], stream[i:j], stream[j:]])
            assert got == [b"ab", b"", b"cde"]


def test_byte_by_byte() -> None:
    reader = FrameReader(max_frame_bytes=1024)
    assert _feed_all(reader, [bytes([b]) for b in STREAM]) == PAYLOADS
    assert reader.pending == 0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(st.binary(max_size=100), max_size=6),
    st.lists(st.integers(0, 700), max_size=10),
)
def test_any_chunking_gives_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    points = sorted({0, len(stream), *(min(c, len(stream)) for c in cuts)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    reader = FrameReader(max_frame_bytes=100)
    assert _feed_all(reader, chunks) == payloads
    reader.eof()


def test_oversized_prefix_fails_at_once_and_stays_failed() -> None:
    reader = FrameReader(max_frame_bytes=1000)
    assert _feed_all(reader, [frame(b"ok")]) == [b"ok"]
    with pytest.raises(WireError) as info:
        reader.feed(frame_header(1001)[:3])  # not yet a complete prefix: nothing to say
        reader.feed(frame_header(1001)[3:])  # the 4th byte decides, before any payload
    assert info.value.reason is DropReason.OVERSIZED
    assert reader.pending == 0  # nothing of the announced frame was buffered
    with pytest.raises(WireError):
        reader.feed(b"more")
    with pytest.raises(WireError):
        reader.eof()


def test_frames_grow_only_as_data_arrives() -> None:
    reader = FrameReader(max_frame_bytes=1 << 30)
    assert reader.feed(frame_header(1 << 30)) == []  # announces 1 GiB, sends nothing
    assert reader.pending == 0
    reader.feed(b"x" * 10)
    assert reader.pending == 10


@pytest.mark.parametrize("cut", [1, 3, 4, 5, len(frame(b"payload")) - 1])
def test_truncated_stream_is_detected_at_eof(cut: int) -> None:
    reader = FrameReader(max_frame_bytes=64)
    reader.feed(frame(b"payload")[:cut])
    with pytest.raises(WireError) as info:
        reader.eof()
    assert info.value.reason is DropReason.MALFORMED
    assert "truncated" in info.value.detail


def test_clean_eof_after_whole_frames() -> None:
    reader = FrameReader(max_frame_bytes=64)
    reader.feed(frame(b"a") + frame(b"b"))
    reader.eof()


def test_frame_length_reads_what_frame_header_wrote() -> None:
    from p2pfl.wire.framing import frame_header, frame_length

    for length in (0, 1, 65_535, 2**32 - 1):
        assert frame_length(frame_header(length)) == length


def test_the_libp2p_transport_frames_with_the_wire_format() -> None:
    """One definition of the frame format: the transport's names are the wire's."""
    from p2pfl.transport import libp2p
    from p2pfl.wire import framing

    assert libp2p.ACK is framing.ACK
    assert libp2p.HEADER_SIZE == framing.FRAME_HEADER_BYTES
    assert libp2p.frame_header is framing.frame_header
    assert libp2p.frame_length is framing.frame_length
