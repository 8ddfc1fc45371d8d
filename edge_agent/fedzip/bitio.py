"""Vectorised bit packing for the FedZip codec: variable-width fields, bit windows and prefix-code walks.

Everything here works on whole numpy arrays; there is no Python loop per element. Bit order is MSB-first
inside each byte (the order of `np.packbits`). Decoders receive `nbits`, the exact length of a stream, and
never read a bit at or beyond it (the buffer is zero-padded in memory so that windows near the end are defined).
"""

from __future__ import annotations

import numpy as np

from ..errors import CodecError

# Widest field that `read_fields` can extract: a 64-bit window shifted by up to 7 bits.
MAX_FIELD_BITS = 57


def pack_fields(values: np.ndarray, widths: np.ndarray) -> tuple[bytes, int]:
    """Concatenate `values[i]` written in `widths[i]` bits (MSB first). Returns (bytes, number of bits)."""
    values = np.asarray(values, dtype=np.uint64)
    widths = np.asarray(widths, dtype=np.int64)
    if values.shape != widths.shape:
        raise ValueError("pack_fields: values and widths differ in shape")
    total = int(widths.sum()) if widths.size else 0
    if total == 0:
        return b"", 0
    if widths.max() > 64:
        raise ValueError("pack_fields: a field is wider than 64 bits")
    uniform = widths.size and widths.min() == widths.max()
    if uniform:
        w = int(widths[0])
        shifts = np.arange(w - 1, -1, -1, dtype=np.uint64)
        bits = ((values[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8).ravel()
    else:
        nz = widths > 0
        v, w = values[nz], widths[nz]
        ends = np.cumsum(w)
        # global bit t of field i (which ends at bit ends_i) holds bit (ends_i - 1 - t) of its value
        shift = (np.repeat(ends, w) - 1 - np.arange(total, dtype=np.int64)).astype(np.uint64)
        bits = ((np.repeat(v, w) >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes(), total


def _padded(buf: bytes | np.ndarray, nbits: int) -> np.ndarray:
    nbytes = (nbits + 7) // 8
    arr = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else buf
    if arr.size < nbytes:
        raise CodecError(f"bit stream truncated: need {nbytes} bytes, have {arr.size}; resend the update")
    out = np.zeros(nbytes + 8, dtype=np.uint8)
    out[:nbytes] = arr[:nbytes]
    # bits past nbits inside the last byte must be zero so that every encoding is canonical
    if nbits % 8:
        out[nbytes - 1] &= np.uint8((0xFF << (8 - nbits % 8)) & 0xFF)
    return out


def byte_windows(buf: bytes | np.ndarray, nbits: int) -> np.ndarray:
    """For every byte index i < ceil(nbits/8)+1, the big-endian uint64 made of bytes i..i+7 (zero past the end)."""
    padded = _padded(buf, nbits)
    n = (nbits + 7) // 8 + 1
    # an overlapping view: element i is the big-endian 8 bytes at offset i (padded holds n + 7 bytes)
    view = np.ndarray((n,), dtype=">u8", buffer=padded, strides=(1,))
    return view.astype(np.uint64)


def read_fields(buf: bytes | np.ndarray, nbits: int, offsets: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Read fields of `widths` bits (<= 57) starting at bit `offsets` from a stream of `nbits` bits."""
    offsets = np.asarray(offsets, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    if offsets.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if widths.max() > MAX_FIELD_BITS or widths.min() < 0:
        raise CodecError("bit field width out of range; the payload is corrupt")
    if offsets.min() < 0 or int((offsets + widths).max()) > nbits:
        raise CodecError("bit field runs past the end of its stream; the payload is truncated or corrupt")
    win = byte_windows(buf, nbits)
    w = win[offsets >> 3] << (offsets & 7).astype(np.uint64)
    out = np.where(widths > 0, w >> (64 - np.maximum(widths, 1)).astype(np.uint64), np.uint64(0))
    return out.astype(np.uint64)


def bit_windows(buf: bytes | np.ndarray, nbits: int, width: int = 32) -> np.ndarray:
    """The `width`-bit window (MSB first, zero past the end) starting at every bit position 0..nbits-1."""
    win = byte_windows(buf, nbits)
    p = np.arange(nbits, dtype=np.int64)
    return (win[p >> 3] << (p & 7).astype(np.uint64)) >> np.uint64(64 - width)


def walk(nxt: np.ndarray, count: int) -> np.ndarray:
    """Positions 0, nxt[0], nxt[nxt[0]], ... (`count` of them) by pointer doubling: O(S log count) numpy work.

    `nxt` has length S + 2 where S is the stream length in bits; index S means "stream ends exactly here"
    and S + 1 means "invalid". Raises CodecError unless the walk visits `count` valid positions and then lands
    exactly on S.
    """
    s = nxt.size - 2
    end, bad = s, s + 1
    if count == 0:
        if s != 0:
            raise CodecError("bit stream has trailing data; the payload is corrupt")
        return np.zeros(0, dtype=np.int64)
    if s == 0:
        raise CodecError("bit stream is empty but symbols were declared; the payload is truncated")
    nxt = nxt.astype(np.int64, copy=True)
    nxt[end] = bad
    nxt[bad] = bad
    pos = np.empty(count, dtype=np.int64)
    pos[0] = 0
    jump = nxt
    filled = 1
    while filled < count:
        take = min(filled, count - filled)
        pos[filled : filled + take] = jump[pos[:take]]
        filled += take
        if filled < count:
            jump = jump[jump]
    if pos.max() >= s:
        raise CodecError("bit stream ends before all symbols were read, or holds an invalid code; resend")
    if nxt[pos[-1]] != end:
        raise CodecError("bit stream length disagrees with its symbol count; the payload is corrupt")
    return pos
