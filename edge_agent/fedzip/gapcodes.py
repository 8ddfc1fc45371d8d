"""Integer codes for position gaps: Elias-gamma (E3) and Huffman-coded buckets with raw low bits (E4).

Both are vectorised: encoding is one `pack_fields`, decoding walks the code starts by pointer doubling.

E4 buckets, with a Rice-like parameter b fitted per tensor (the b in 0..Rice optimum + 2 that gives the
smallest stream): a value v >= 0 has u = v >> b. If u < 16 the
bucket is u and the b low bits of v follow raw; otherwise the bucket is 16 + bitlength(u) - 5 and the
bitlength(u) - 1 + b bits below the leading one follow raw. On geometric gaps (uniformly placed positions)
the bucket distribution is close to unary and the raw bits are close to uniform, so the cost is within a
few percent of log2 C(n, m); on clustered positions the Huffman table adapts where a plain Rice code would not.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import CodecError
from . import huffman
from .bitio import pack_fields, read_fields, walk

LINEAR = 16  # buckets 0..15 hold u directly
MAX_VALUE_BITS = 32  # gaps and positions are below 2**32
MAX_BUCKETS = LINEAR + MAX_VALUE_BITS - 4


def bitlength(x: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2**53, vectorised."""
    return np.frexp(np.asarray(x, dtype=np.float64))[1].astype(np.int64)


# -- Elias gamma -------------------------------------------------------------------------------------------

def gamma_encode(g: np.ndarray) -> tuple[bytes, int]:
    """Elias-gamma codes of integers g >= 1: floor(log2 g) zeros, then g in binary (2 floor(log2 g) + 1 bits)."""
    g = np.asarray(g, dtype=np.int64)
    return pack_fields(g.astype(np.uint64), 2 * bitlength(g) - 1)


def gamma_decode(buf: np.ndarray, nbits: int, count: int) -> np.ndarray:
    if not count <= nbits <= count * (2 * MAX_VALUE_BITS - 1):
        raise CodecError(f"Elias-gamma stream of {nbits} bits cannot hold {count} values; the payload is corrupt")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.asarray(buf, dtype=np.uint8))[:nbits]
    p = np.arange(nbits, dtype=np.int64)
    big = np.int64(nbits + 1 + 2 * MAX_VALUE_BITS)
    next_one = np.minimum.accumulate(np.where(bits == 1, p, big)[::-1])[::-1]
    zeros = next_one - p
    nxt = np.empty(nbits + 2, dtype=np.int64)
    step = 2 * zeros + 1
    nxt[:nbits] = np.where((zeros < MAX_VALUE_BITS) & (p + step <= nbits), p + step, nbits + 1)
    starts = walk(nxt, count)
    z = zeros[starts]
    return read_fields(buf, nbits, starts + z, z + 1).astype(np.int64)


# -- Huffman-coded buckets ---------------------------------------------------------------------------------

def bucket_split(v: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bucket, raw value, raw width) of each v >= 0."""
    v = np.asarray(v, dtype=np.int64)
    u = v >> b
    linear = u < LINEAR
    e = bitlength(u)
    sym = np.where(linear, u, LINEAR + e - 5)
    width = np.where(linear, b, e - 1 + b)
    raw = np.where(linear, v & ((1 << b) - 1), v - (np.left_shift(1, np.maximum(e - 1, 0)) << b))
    return sym, raw, width


def bucket_widths(sym: np.ndarray, b: int) -> np.ndarray:
    return np.where(sym < LINEAR, b, sym - LINEAR + 4 + b)


def bucket_join(sym: np.ndarray, raw: np.ndarray, b: int) -> np.ndarray:
    e = sym - LINEAR + 5
    head = np.left_shift(1, np.maximum(e - 1, 0)) << b
    return np.where(sym < LINEAR, (sym << b) | raw, head + raw)


def _table_bits(n_symbols: int) -> int:
    return 16 + 5 * n_symbols


def choose_b(v: np.ndarray) -> int:
    """The bucket parameter b that minimises the total size, from 0 up to just past the Rice optimum."""
    mean = float(v.mean()) + 1.0 if v.size else 1.0
    b0 = max(0, round(math.log2(max(mean * math.log(2), 1.0))))
    e = bitlength(v)  # bitlength(v >> b) = max(e - b, 0), so one pass serves every candidate
    bs = np.arange(min(MAX_VALUE_BITS - 2, b0 + 2) + 1, dtype=np.int64)  # small b wins on clustered positions
    eu = np.maximum(e[None, :] - bs[:, None], 0)  # every candidate at once: one row per b
    linear = eu <= 4  # u = v >> b < 16
    sym = np.where(linear, v[None, :] >> bs[:, None], LINEAR + eu - 5)
    raw_bits = (bs * linear.sum(axis=1) + np.where(linear, 0, e - 1).sum(axis=1)).tolist()
    size = int(sym.max()) + 1 if sym.size else 1
    counts = np.bincount((sym + (np.arange(bs.size) * size)[:, None]).ravel(),
                         minlength=bs.size * size).reshape(bs.size, size)
    tops = (sym.max(axis=1) + 1).tolist() if sym.size else [0] * bs.size
    best, best_b = None, 0
    for b in bs.tolist():
        row = counts[b, : tops[b]]
        cost = huffman.code_cost(row.tolist()) + raw_bits[b] + _table_bits(row.size)
        if best is None or cost < best:
            best, best_b = cost, b
    return best_b
