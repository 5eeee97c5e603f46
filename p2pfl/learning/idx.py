"""The IDX file format of MNIST-style datasets, read and written with numpy.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), then each dimension as a big-endian uint32, then the values in C order.
Files are usually gzip-compressed; the gzip container differs between distributors (the
Debian package of Fashion-MNIST recompressed it), so checksums are taken of the
*decompressed* payload, which is the same wherever the file came from.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from p2pfl.errors import P2PFLError

__all__ = [
    "IdxError",
    "decompress",
    "parse_idx",
    "read_idx",
    "read_payload",
    "payload_md5",
    "write_idx",
]

# IDX type code -> numpy dtype (big-endian where it matters).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}

_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(P2PFLError, ValueError):
    """A file is not a well-formed IDX file."""


def decompress(data: bytes) -> bytes:
    """The raw IDX bytes of a file's content: gunzipped if gzip-compressed, else as is."""
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise IdxError(f"corrupt gzip data ({exc})") from exc


def read_payload(path: Path) -> bytes:
    """The raw IDX bytes of the file at ``path`` (see ``decompress``)."""
    try:
        return decompress(Path(path).read_bytes())
    except IdxError as exc:
        raise IdxError(f"{path}: {exc}") from None


def payload_md5(data: bytes) -> str:
    """Hex md5 of decompressed IDX bytes (what the dataset tables record)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def parse_idx(data: bytes) -> np.ndarray:
    """Decode IDX bytes into a native-endian numpy array (a copy, writable)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError("bad IDX magic number")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise IdxError(f"unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError("truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise IdxError(
            f"IDX body has {len(data) - header} bytes, shape {shape} needs {expected - header}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a numpy array."""
    data = read_payload(path)
    try:
        return parse_idx(data)
    except IdxError as exc:
        raise IdxError(f"{path}: {exc}") from None


def write_idx(path: Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file; gzip it when ``compress`` (default: name ends in .gz)."""
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=")
    if key not in _CODES:
        raise IdxError(f"dtype {array.dtype} has no IDX type code")
    code = _CODES[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    data = header + body
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
