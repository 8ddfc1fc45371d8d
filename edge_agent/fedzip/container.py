"""The FedZip payload: header, per-tensor sections, optional zstd frame; `encode`, `decode`, `quantize`.

Layout of a payload:
    b"FZ", u8 version (1), u8 encoding (1..4 for e1..e4), u8 flags (bit 0: body is one zstd frame),
    u32 little-endian CRC-32 of the tensor layout (names and shapes, sorted by name), varint tensor count,
    then the body: one section per tensor in name order (`encodings`).

Tensors are written in sorted-name order so that dict order never matters; the CRC lets the receiver
refuse a payload encoded for a different layout. The zstd stage is skipped (flag 0) when it would not shrink
the body, which is the usual case for E4.

Decoder safety: the payload length, the zstd frame's declared content size (which must be present) and
every count in the body are checked against their caps before anything is allocated from them; every
malformed input raises CodecError. `max_bytes` caps the payload and the decompressed body; the dense
output is sized by the caller's own layout, not by the payload, and is not counted against it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import zstandard

from ..errors import CodecError
from .encodings import read_tensor, write_tensor
from .params import ENCODINGS, FedZipParams
from .quantize import Sparse, sparsify
from .wire import Reader, Writer

MAGIC = b"FZ"
VERSION = 1
FLAG_ZSTD = 1
MAX_TENSOR = 2**31 - 1
_HEAD = struct.Struct("<2sBBBI")

Layout = Sequence[tuple[str, tuple[int, ...]]]


def _check_layout(layout: Layout) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = []
    for entry in layout:
        name, shape = entry
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape) or int(np.prod(shape, dtype=np.int64)) > MAX_TENSOR:
            raise CodecError(f"layout entry {name!r} has an invalid shape {shape}; fix the model layout")
        out.append((str(name), shape))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise CodecError("layout has duplicate tensor names; fix the model layout")
    return sorted(out)


def layout_crc(layout: Layout) -> int:
    return _layout_info(layout)[1]


def _layout_info(layout: Layout) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """The checked layout in name order and its CRC; memoised, as every update of a round has the same one."""
    try:
        key = tuple((name, tuple(shape)) for name, shape in layout)
        hash(key)
    except (TypeError, ValueError):  # not a well-formed layout: let _check_layout say why
        key = None
    if key is None:
        return _layout_info_of(layout)
    order, crc = _cached_layout_info(key)
    return list(order), crc


def _layout_info_of(layout: Layout) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    order = _check_layout(layout)
    text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in order)
    return order, zlib.crc32(text.encode()) & 0xFFFFFFFF


@lru_cache(maxsize=64)
def _cached_layout_info(key: tuple) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], int]:
    order, crc = _layout_info_of(key)
    return tuple(order), crc


def _sparsify_all(tensors: Mapping[str, np.ndarray], p: FedZipParams) -> dict[str, Sparse]:
    return {name: sparsify(x, p.keep_count(int(np.size(x))), p.k) for name, x in tensors.items()}


def quantize(tensors: Mapping[str, np.ndarray], p: FedZipParams) -> dict[str, np.ndarray]:
    """The sparsified and clustered tensors exactly as `decode` will return them (float32)."""
    return {name: s.dense(np.shape(tensors[name])) for name, s in _sparsify_all(tensors, p).items()}


def _encode(sparse: Mapping[str, Sparse], shapes: Layout, p: FedZipParams) -> bytes:
    w = Writer()
    for name in sorted(sparse):
        write_tensor(w, sparse[name], p.encoding)
    body = w.getvalue()
    flags = 0
    if p.zstd_level > 0:
        packed = zstandard.ZstdCompressor(level=p.zstd_level, write_content_size=True).compress(body)
        if len(packed) < len(body):
            body, flags = packed, FLAG_ZSTD
    head = Writer()
    head.raw(_HEAD.pack(MAGIC, VERSION, ENCODINGS.index(p.encoding) + 1, flags, layout_crc(shapes)))
    head.varint(len(shapes))
    return head.getvalue() + body


def _shapes(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(np.shape(x))) for name, x in tensors.items()]


def encode_and_quantize(tensors: Mapping[str, np.ndarray], p: FedZipParams) -> tuple[bytes, dict[str, np.ndarray]]:
    """`encode` and `quantize` in one pass (what error feedback needs)."""
    sparse = _sparsify_all(tensors, p)
    shapes = _shapes(tensors)
    return _encode(sparse, shapes, p), {name: sparse[name].dense(shape) for name, shape in shapes}


def encode(tensors: Mapping[str, np.ndarray], p: FedZipParams) -> bytes:
    """The FedZip payload of these tensors (top-z, k-means, encoding, optional zstd)."""
    return _encode(_sparsify_all(tensors, p), _shapes(tensors), p)


def _body(data: bytes, flags: int, max_bytes: int) -> bytes:
    if not flags & FLAG_ZSTD:
        return data
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd frame header is invalid ({e}); the payload is corrupt") from e
    if size < 0:
        raise CodecError("zstd frame does not declare its content size; refusing to decompress it")
    if size > max_bytes:
        raise CodecError(f"zstd frame declares {size} bytes, over the cap of {max_bytes}; refused")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_bytes, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd frame is corrupt or truncated ({e}); resend the update") from e
    if len(out) != size:
        raise CodecError("zstd frame size disagrees with its header; the payload is corrupt")
    return out


def decode(data: bytes, layout: Layout, p: FedZipParams, *, max_bytes: int) -> dict[str, np.ndarray]:
    """Rebuild the quantised tensors from a payload; raises CodecError on anything malformed or oversized."""
    try:
        return _decode(bytes(data), layout, p, max_bytes)
    except CodecError:
        raise
    except (ValueError, IndexError, OverflowError, struct.error, zstandard.ZstdError) as e:
        raise CodecError(f"malformed FedZip payload ({type(e).__name__}: {e}); resend the update") from e


def _decode(data: bytes, layout: Layout, p: FedZipParams, max_bytes: int) -> dict[str, np.ndarray]:
    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes is over the cap of {max_bytes}; refused")
    if len(data) < _HEAD.size:
        raise CodecError(f"payload of {len(data)} bytes is shorter than the FedZip header; resend the update")
    magic, version, enc, flags, crc = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("payload does not start with the FedZip magic; it is not a FedZip payload")
    if version != VERSION:
        raise CodecError(f"FedZip payload version {version}; this decoder reads version {VERSION}, upgrade it")
    if enc != ENCODINGS.index(p.encoding) + 1:
        raise CodecError(f"payload uses encoding {enc}, the task says {p.encoding}; the sender is misconfigured")
    if flags & ~FLAG_ZSTD:
        raise CodecError(f"unknown FedZip flags {flags:#x}; the payload is corrupt or from a newer version")
    order, want_crc = _layout_info(layout)
    if crc != want_crc:
        raise CodecError("payload was encoded for a different tensor layout (names or shapes); check the model")
    head = Reader(data[_HEAD.size :])
    count = head.varint(limit=len(order))
    if count != len(order):
        raise CodecError(f"payload holds {count} tensors, the layout has {len(order)}; check the model")
    r = Reader(_body(bytes(head.raw(head.left)), flags, max_bytes))
    sections = {}
    for name, shape in order:
        sections[name] = read_tensor(r, int(np.prod(shape, dtype=np.int64)), p)
    if r.left:
        raise CodecError(f"{r.left} trailing bytes after the last tensor; the payload is corrupt")
    return {str(name): sections[str(name)].dense(tuple(int(s) for s in shape)) for name, shape in layout}
