"""Per-tensor sections of a FedZip payload: the four encodings E1..E4 of one `Sparse` tensor.

Every section starts the same way:
    varint m (kept entries; the decoder refuses m > ceil(z n)); if m == 0 the section ends here
    u8 k' (centroids, 1..k), k' float32 centroids (ascending, nonzero), k'-1 varint cluster counts
Then, by encoding:
    E1  canonical Huffman over all n entries, alphabet {zero, cluster 1..k'}; the code is rebuilt from the
        counts on both sides, so no table is sent and the stream length is implied.
    E2  for each cluster in turn its ascending absolute positions, ceil(log2 n) bits each.
    E3  for each cluster in turn its position gaps (first gap = position + 1), Elias-gamma coded;
        varint stream length in bits.
    E4  positions of all kept entries as gaps, Huffman-coded buckets plus raw low bits (`gapcodes`), or fixed
        width positions when that is smaller (tiny tensors); then the cluster ids in blocks of B ids, each
        block one symbol of a Huffman code built from the product of the cluster frequencies (near the
        entropy m H(ids) without sending a table). The ids go either directly or as deltas mod k' from the
        previous id, whichever is smaller: in a real update neighbouring kept entries often share a sign.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import CodecError
from . import huffman
from .bitio import pack_fields, read_fields
from .gapcodes import (
    MAX_BUCKETS,
    MAX_VALUE_BITS,
    bitlength,
    bucket_join,
    bucket_split,
    bucket_widths,
    choose_b,
    gamma_decode,
    gamma_encode,
)
from .params import FedZipParams
from .quantize import Sparse
from .wire import Reader, Writer


def _width(n: int) -> int:
    return int(n - 1).bit_length() if n > 1 else 0


def _grouped(s: Sparse) -> np.ndarray:
    """Positions grouped by cluster (cluster 0 first), ascending inside each group."""
    return s.positions[np.argsort(s.ids, kind="stable")]


def _ungroup(vals: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-cluster ascending positions and merge them into (positions, ids)."""
    if vals.size and int(vals.max()) >= n:
        raise CodecError(f"position beyond the tensor size {n}; the payload is corrupt")
    ids = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    d = np.diff(vals)
    same = ids[1:] == ids[:-1]
    if (d[same] <= 0).any():
        raise CodecError("positions of a cluster are not strictly ascending; the payload is corrupt")
    order = np.argsort(vals, kind="stable")
    pos = vals[order]
    if (np.diff(pos) <= 0).any():
        raise CodecError("two clusters claim the same position; the payload is corrupt")
    return pos, ids[order]


# -- cluster ids in blocks (E4) ----------------------------------------------------------------------------

def _max_block(kp: int) -> int:
    b = 1
    while kp ** (b + 1) <= 256:
        b += 1
    return b


def _block_weights(counts: list[int], block: int) -> list[int]:
    w = [1]
    for _ in range(block):
        w = [a * c for a in w for c in counts]
    return w


@lru_cache(maxsize=512)  # about 1 MB at most: a tuple of up to 256 lengths per entry
def _block_lengths(counts: tuple[int, ...], block: int) -> tuple[int, ...]:
    """Huffman code lengths of the block alphabet (up to 256 symbols), memoised on the cluster counts: the
    encoder tries several block sizes and the decoder rebuilds the chosen one, from the same counts."""
    return tuple(huffman.raw_lengths(_block_weights(list(counts), block)))


def _block_code(counts: list[int], block: int) -> huffman.Code:
    """The block code the encoder used: `huffman.from_weights(_block_weights(counts, block), max_len=None)`."""
    used = [i for i, c in enumerate(counts) if c > 0]
    if len(used) == 1:  # one used block symbol: the all-`used` block, degenerate
        kp = len(counts)
        return huffman.from_lengths([0] * kp**block, single=sum(used[0] * kp**e for e in range(block)))
    return huffman.from_lengths(_block_lengths(tuple(counts), block))


def _block_symbols(digits: np.ndarray, kp: int, block: int, pad: int) -> np.ndarray:
    nblocks = -(-digits.size // block)
    padded = np.full(nblocks * block, pad, dtype=np.int64)
    padded[: digits.size] = digits
    place = kp ** np.arange(block - 1, -1, -1, dtype=np.int64)
    return padded.reshape(nblocks, block) @ place


def _delta(ids: np.ndarray, kp: int) -> np.ndarray:
    """Each id minus the previous one, mod k' (cheap when neighbours share a cluster, e.g. a row's sign)."""
    return (ids - np.concatenate(([0], ids[:-1]))) % kp


def _entropy_bits(freq: list[int]) -> float:
    f = np.asarray(freq, dtype=np.float64)
    f = f[f > 0]
    return float(-(f * np.log2(f / f.sum())).sum())


def _write_ids(w: Writer, ids: np.ndarray, counts: list[int]) -> None:
    """Cluster ids, directly (mode 0) or as deltas mod k' (mode 1), in Huffman-coded blocks of B ids.

    The mode with the lower empirical entropy is used; the largest block sizes are tried and the smallest
    stream kept.
    """
    kp = len(counts)
    delta = _delta(ids, kp)
    dfreq = np.bincount(delta, minlength=kp).tolist()
    mode = 1 if _entropy_bits(dfreq) + 8 * (kp - 1) < _entropy_bits(counts) else 0
    digits, freq = (delta, dfreq) if mode else (ids, counts)
    pad = int(np.argmax(freq))
    best: tuple[int, int, list[int], np.ndarray] | None = None
    top = _max_block(kp)
    for block in range(top, max(0, top - 3), -1):
        if block > 1 and kp**block > 4 * ids.size:  # alphabets far larger than the data only cost time
            continue
        lengths = _block_lengths(tuple(freq), block)
        if max(lengths) > huffman.MAX_LEN:
            continue
        sym = _block_symbols(digits, kp, block, pad)
        bits = int(np.dot(lengths, np.bincount(sym, minlength=len(lengths))))
        if best is None or bits < best[0]:
            best = (bits, block, lengths, sym)
    if best is None:  # block 1 always fits: at most 16 symbols, so the code is at most 15 bits long
        lengths = huffman.code_lengths(freq, max_len=None)
        best = (0, 1, lengths, digits)
    _, block, lengths, sym = best
    # the decoder rebuilds this code with _block_code(freq, block); a degenerate code is rebuilt the same way
    code = huffman.from_lengths(lengths) if any(lengths) else _block_code(freq, block)
    data, nbits = huffman.encode(sym, code)
    w.u8(block | mode << 4)
    if mode == 1:
        for c in freq[:-1]:
            w.varint(c)
    w.varint(nbits)
    w.raw(data)


def _read_ids(r: Reader, counts: np.ndarray) -> np.ndarray:
    kp, m = counts.size, int(counts.sum())
    head = r.u8()
    block, mode = head & 15, head >> 4
    if mode > 1 or not 1 <= block <= _max_block(kp):
        raise CodecError(f"cluster-id mode {mode} / block size {block} is invalid; the payload is corrupt")
    freq = counts.tolist()
    if mode == 1:
        part = [r.varint(limit=m) for _ in range(kp - 1)]
        if sum(part) > m:
            raise CodecError("cluster-id delta counts exceed the kept count; the payload is corrupt")
        freq = part + [m - sum(part)]
    code = _block_code(freq, block)
    if code.maxlen > huffman.MAX_LEN:
        raise CodecError("cluster-id code is longer than allowed; the payload is corrupt")
    nblocks = -(-m // block)
    nbits = r.varint(limit=nblocks * huffman.MAX_LEN)
    sym = huffman.decode(r.bits(nbits), nbits, nblocks, code)
    place = kp ** np.arange(block - 1, -1, -1, dtype=np.int64)
    digits = ((sym[:, None] // place[None, :]) % kp).ravel()
    if (digits[m:] != int(np.argmax(freq))).any():
        raise CodecError("cluster-id padding is not canonical; the payload is corrupt")
    digits = digits[:m]
    if not np.array_equal(np.bincount(digits, minlength=kp), freq):
        raise CodecError("cluster-id symbols disagree with their declared counts; the payload is corrupt")
    ids = digits if mode == 0 else np.cumsum(digits) % kp
    if not np.array_equal(np.bincount(ids, minlength=kp), counts):
        raise CodecError("cluster ids disagree with the declared cluster counts; the payload is corrupt")
    return ids


# -- positions as gaps (E4) --------------------------------------------------------------------------------

_BUCKET_OVERHEAD = 16 + 8 * 3  # bits of a bucket-coded section besides its codes, raw bits and 5-bit lengths


def _write_gaps(w: Writer, pos: np.ndarray, n: int) -> None:
    m = pos.size
    fixed_bits = m * _width(n)
    if fixed_bits <= _BUCKET_OVERHEAD + 5:  # no bucket code can be smaller (tiny tensors): skip fitting one
        w.u8(1)
        w.raw(pack_fields(pos.astype(np.uint64), np.full(m, _width(n)))[0])
        return
    v = np.diff(pos, prepend=-1) - 1
    b = choose_b(v)
    sym, raw, width = bucket_split(v, b)
    counts = np.bincount(sym)
    code = huffman.from_weights(counts.tolist())
    bucket_bits = code.bits(counts) + int(width.sum()) + _BUCKET_OVERHEAD + 5 * counts.size
    if fixed_bits <= bucket_bits:
        w.u8(1)
        w.raw(pack_fields(pos.astype(np.uint64), np.full(m, _width(n)))[0])
        return
    w.u8(0)
    w.u8(b)
    if code.single is not None:
        w.u8(0)
        w.u8(code.single)
    else:
        w.u8(counts.size)
        w.raw(pack_fields(code.lengths.astype(np.uint64), np.full(counts.size, 5))[0])
    data, nbits = huffman.encode(sym, code)
    w.varint(nbits)
    w.raw(data)
    w.raw(pack_fields(raw.astype(np.uint64), width)[0])


def _read_gaps(r: Reader, m: int, n: int) -> np.ndarray:
    mode = r.u8()
    if mode == 1:
        wd = _width(n)
        nbits = m * wd
        pos = read_fields(r.bits(nbits), nbits, np.arange(m, dtype=np.int64) * wd, np.full(m, wd)).astype(np.int64)
        if pos.size and (int(pos.max()) >= n or (np.diff(pos) <= 0).any()):
            raise CodecError("fixed-width positions are out of range or not ascending; the payload is corrupt")
        return pos
    if mode != 0:
        raise CodecError(f"unknown position mode {mode}; the payload is corrupt or from a newer version")
    b = r.u8()
    if b > MAX_VALUE_BITS - 2:
        raise CodecError(f"gap parameter b={b} is out of range; the payload is corrupt")
    size = r.u8()
    if size == 0:
        single = r.u8()
        if single >= MAX_BUCKETS:
            raise CodecError("gap bucket out of range; the payload is corrupt")
        code = huffman.from_lengths([0] * (single + 1), single=single)
    else:
        if size > MAX_BUCKETS:
            raise CodecError(f"gap table has {size} buckets, more than {MAX_BUCKETS}; the payload is corrupt")
        lengths = read_fields(r.bits(5 * size), 5 * size, np.arange(size, dtype=np.int64) * 5, np.full(size, 5))
        code = huffman.from_lengths(lengths.astype(np.int64).tolist())
    nbits = r.varint(limit=m * huffman.MAX_LEN)
    sym = huffman.decode(r.bits(nbits), nbits, m, code)
    widths = bucket_widths(sym, b)
    if widths.size and int(widths.max()) >= MAX_VALUE_BITS:
        raise CodecError("gap larger than any tensor; the payload is corrupt")
    raw_bits = int(widths.sum())
    offsets = np.cumsum(widths) - widths
    raw = read_fields(r.bits(raw_bits), raw_bits, offsets, widths).astype(np.int64)
    v = bucket_join(sym, raw, b)
    if v.size and int(v.max()) >= n:
        raise CodecError(f"gap beyond the tensor size {n}; the payload is corrupt")
    pos = np.cumsum(v + 1) - 1
    if pos.size and int(pos[-1]) >= n:
        raise CodecError(f"position beyond the tensor size {n}; the payload is corrupt")
    return pos


# -- sections ----------------------------------------------------------------------------------------------

def write_tensor(w: Writer, s: Sparse, encoding: str) -> None:
    m, n = s.m, s.n
    w.varint(m)
    if m == 0:
        return
    counts = s.counts()
    kp = counts.size
    w.u8(kp)
    w.f32(s.centroids)
    for c in counts[:-1].tolist():
        w.varint(c)
    if encoding == "e1":
        sym = np.zeros(n, dtype=np.int64)
        sym[s.positions] = s.ids + 1
        code = huffman.from_weights([n - m] + counts.tolist())
        w.raw(huffman.encode(sym, code)[0])
    elif encoding == "e2":
        wd = _width(n)
        w.raw(pack_fields(_grouped(s).astype(np.uint64), np.full(m, wd))[0])
    elif encoding == "e3":
        vals = _grouped(s)
        ids = np.repeat(np.arange(kp), counts)
        prev = np.concatenate(([-1], vals[:-1]))
        prev[np.flatnonzero(np.diff(ids, prepend=-1))] = -1
        data, nbits = gamma_encode(vals - prev)
        w.varint(nbits)
        w.raw(data)
    elif encoding == "e4":
        _write_gaps(w, s.positions, n)
        if kp > 1:
            _write_ids(w, s.ids, counts.tolist())
    else:
        raise CodecError(f"unknown encoding {encoding!r}")


def read_tensor(r: Reader, n: int, p: FedZipParams) -> Sparse:
    m = r.varint(limit=p.keep_count(n))
    if m == 0:
        z = np.zeros(0, dtype=np.int64)
        return Sparse(n, z, z.copy(), np.zeros(0, np.float32))
    kp = r.u8()
    if not 1 <= kp <= min(p.k, m):
        raise CodecError(f"{kp} clusters declared, allowed 1..{min(p.k, m)}; the payload is corrupt")
    cent = r.f32(kp)
    if not np.isfinite(cent).all() or (cent == 0).any() or (np.diff(cent.astype(np.float64)) <= 0).any():
        raise CodecError("centroids must be finite, nonzero and ascending; the payload is corrupt")
    head = [r.varint(limit=m) for _ in range(kp - 1)]
    counts = np.array(head + [m - sum(head)], dtype=np.int64)
    if (counts < 1).any():
        raise CodecError("cluster counts are empty or exceed the kept count; the payload is corrupt")
    if p.encoding == "e1":
        weights = [n - m] + counts.tolist()
        code = huffman.from_weights(weights)
        nbits = code.bits(np.array(weights))
        sym = huffman.decode(r.bits(nbits), nbits, n, code)
        if not np.array_equal(np.bincount(sym, minlength=kp + 1), weights):
            raise CodecError("E1 symbols disagree with the declared counts; the payload is corrupt")
        pos = np.flatnonzero(sym).astype(np.int64)
        ids = sym[pos] - 1
    elif p.encoding == "e2":
        wd = _width(n)
        nbits = m * wd
        vals = read_fields(r.bits(nbits), nbits, np.arange(m, dtype=np.int64) * wd, np.full(m, wd))
        pos, ids = _ungroup(vals.astype(np.int64), counts, n)
    elif p.encoding == "e3":
        nbits = r.varint(limit=m * (2 * MAX_VALUE_BITS - 1))
        g = gamma_decode(r.bits(nbits), nbits, m)
        if int(g.max()) > n:
            raise CodecError(f"gap beyond the tensor size {n}; the payload is corrupt")
        cs = np.cumsum(g)
        starts = np.cumsum(counts) - counts
        before = np.where(starts > 0, cs[np.maximum(starts - 1, 0)], 0)
        vals = cs - np.repeat(before, counts) - 1
        pos, ids = _ungroup(vals, counts, n)
    else:
        pos = _read_gaps(r, m, n)
        ids = _read_ids(r, counts) if kp > 1 else np.zeros(m, dtype=np.int64)
    return Sparse(n, pos, ids, cent)


__all__ = ["read_tensor", "write_tensor", "bitlength"]
