"""Canonical Huffman codes over small alphabets (at most 256 symbols), encoded and decoded with numpy.

Code lengths come from exact integer weights, so the encoder and the decoder build the same code from the
same counts on any platform (ties are broken by symbol index). A code with one used symbol is "degenerate":
that symbol costs 0 bits. Decoding finds the code length at every bit position (one table lookup when the
stream is long enough to pay for a table of 2**maxlen entries, else a binary search over the code starts)
and then walks the chain of code starts by pointer doubling (`bitio.walk`), so no Python loop runs per symbol.

Cost per tensor matters (a coordinator decodes every tensor of every update): canonical codes are assigned
with one cumulative sum, and code lengths are memoised per weight vector (`code_lengths`), so the same
counts never run the Huffman construction twice. Codes are memoised per length vector too (`from_lengths`): a
decoder meets the same few code tables in every update of a round, and a memoised `Code` keeps its decode
table, so neither is built again. A `Code` is shared between callers and never changed after it is built.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from ..errors import CodecError
from .bitio import bit_windows, pack_fields, walk

MAX_LEN = 24  # longest codeword; windows are 32 bits wide
TABLE_KEEP_LEN = 12  # decode tables of codes up to this long are kept with the code (32 KiB at most each)
_W = 32


def code_lengths(weights: Sequence[int], max_len: int | None = MAX_LEN) -> list[int]:
    """Huffman code lengths for integer `weights` (0 = unused symbol gets length 0).

    With `max_len` set, weights are halved (rounding up, so used symbols stay used) until the code fits.
    With `max_len=None` the caller checks the result itself.
    """
    w = tuple(int(x) for x in weights)
    if any(x < 0 for x in w):
        raise ValueError("code_lengths: negative weight")
    return list(_code_lengths(w, max_len))


@lru_cache(maxsize=256)  # small alphabets (gap buckets); block codes cache their own (encodings)
def _code_lengths(w: tuple[int, ...], max_len: int | None) -> tuple[int, ...]:
    while True:
        lengths = raw_lengths(w)
        if max_len is None or max(lengths, default=0) <= max_len:
            return tuple(lengths)
        w = tuple((x + 1) // 2 if x else 0 for x in w)


def code_cost(weights: Sequence[int]) -> int:
    """sum(code_lengths(weights) * weights), without building the code: the sum of the merged weights of any
    Huffman tree (all have the same cost). Exact while no length limit can bind (at most MAX_LEN + 1 used
    symbols); otherwise it falls back to the limited code."""
    heap = [int(x) for x in weights if x > 0]
    if len(heap) > MAX_LEN + 1:
        return int(np.dot(code_lengths(weights), np.asarray(weights, dtype=np.int64)))
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def raw_lengths(w: Sequence[int]) -> list[int]:
    """Huffman code lengths of non-negative weights, with no length limit and no memo (for callers that
    memoise on something smaller than the weights). The two-queue method: leaves sorted by (weight, index),
    merged nodes in the order they are made (their weights never decrease); ties prefer the leaf queue."""
    lengths = [0] * len(w)
    syms = sorted((i for i, x in enumerate(w) if x > 0), key=w.__getitem__)  # stable: ties by index
    nleaf = len(syms)
    if nleaf <= 1:
        return lengths
    lw = [w[i] for i in syms]
    parent = [0] * (2 * nleaf - 1)  # nodes 0..nleaf-1 are the sorted leaves, then merged nodes in order
    merged: list[int] = []  # weights of merged nodes
    i = j = 0
    for node in range(nleaf, 2 * nleaf - 1):
        if i < nleaf and (j >= len(merged) or lw[i] <= merged[j]):
            wa, a = lw[i], i
            i += 1
        else:
            wa, a = merged[j], nleaf + j
            j += 1
        if i < nleaf and (j >= len(merged) or lw[i] <= merged[j]):
            wb, b = lw[i], i
            i += 1
        else:
            wb, b = merged[j], nleaf + j
            j += 1
        parent[a] = parent[b] = node
        merged.append(wa + wb)
    depth = [0] * (2 * nleaf - 1)
    for node in range(2 * nleaf - 3, -1, -1):  # the root is the last node; parents come after children
        depth[node] = depth[parent[node]] + 1
    for rank, sym in enumerate(syms):
        lengths[sym] = depth[rank]
    return lengths


@dataclass(frozen=True)
class Code:
    """A canonical prefix code. `single` is set for a degenerate code (one symbol, zero bits)."""

    lengths: np.ndarray  # int64 per symbol, 0 = unused
    codes: np.ndarray  # uint64 per symbol
    single: int | None
    order: np.ndarray  # used symbols sorted by (length, symbol)
    starts: np.ndarray  # left-justified 32-bit first window of each symbol in `order`
    end: int  # first window past the last codeword (2**32 for a complete code)
    _table: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)  # built on first need

    @cached_property  # a Code never changes: computed once (instance __dict__, which a frozen dataclass allows)
    def maxlen(self) -> int:
        return int(self.lengths.max()) if self.lengths.size else 0

    @cached_property
    def minlen(self) -> int:
        used = self.lengths[self.lengths > 0]
        return int(used.min()) if used.size else 0

    def table(self) -> np.ndarray:
        """Index into `order` for each top-`maxlen`-bit window (2**maxlen entries, built once)."""
        if self._table:
            return self._table[0]
        maxlen = self.maxlen
        tops = np.arange(1 << maxlen, dtype=np.uint64) << np.uint64(_W - maxlen)
        table = (np.searchsorted(self.starts, tops, side="right") - 1).astype(np.int64)
        if maxlen <= TABLE_KEEP_LEN:  # kept with the (memoised) code; a larger one is built per stream, as it pays
            self._table.append(table)
        return table

    def bits(self, counts: np.ndarray) -> int:
        """Bits needed to code symbols with these counts."""
        return int(np.dot(self.lengths[: len(counts)], np.asarray(counts, dtype=np.int64)))


def from_lengths(lengths: Sequence[int], single: int | None = None) -> Code:
    """Build the canonical code; raises CodecError if the lengths are not a valid prefix code. Memoised on
    (lengths, single): the same lengths give the same (shared, unchanging) `Code`; invalid lengths raise every
    time (an exception is never memoised)."""
    if len(lengths) > 256:
        raise CodecError("Huffman table has too many symbols; the payload is corrupt")
    key = tuple(int(x) for x in lengths)
    return _from_lengths(key, None if single is None else int(single))


@lru_cache(maxsize=512)  # a key is at most 256 small ints; a memoised Code keeps a table of at most 2**TABLE_KEEP_LEN
def _from_lengths(lengths: tuple[int, ...], single: int | None) -> Code:
    ln = np.asarray(lengths, dtype=np.int64)
    if ln.ndim != 1 or ln.size > 256:
        raise CodecError("Huffman table has too many symbols; the payload is corrupt")
    if single is not None:
        if not 0 <= single < max(ln.size, 1) or ln.any():
            raise CodecError("degenerate Huffman table is inconsistent; the payload is corrupt")
        return Code(ln, np.zeros(ln.size, np.uint64), int(single), np.array([single]), np.zeros(1, np.uint64),
                    2**_W)
    if ln.min(initial=0) < 0 or ln.max(initial=0) > MAX_LEN:
        raise CodecError(f"Huffman code length outside 1..{MAX_LEN}; the payload is corrupt")
    used = np.flatnonzero(ln)
    if used.size == 0:
        raise CodecError("Huffman table has no symbols; the payload is corrupt")
    lu = ln[used]
    if int(np.left_shift(1, MAX_LEN - lu).sum()) > 1 << MAX_LEN:
        raise CodecError("Huffman code lengths violate the Kraft inequality; the payload is corrupt")
    order = used[np.lexsort((used, lu))]
    lo = ln[order].astype(np.uint64)
    # canonical code: each codeword, left-justified in _W bits, starts where the previous one's range ends
    span = np.left_shift(np.uint64(1), np.uint64(_W) - lo)
    ends = np.cumsum(span, dtype=np.uint64)
    starts = ends - span
    codes = np.zeros(ln.size, dtype=np.uint64)
    codes[order] = starts >> (np.uint64(_W) - lo)
    return Code(ln, codes, None, order, starts, int(ends[-1]))


def from_weights(weights: Sequence[int], max_len: int | None = MAX_LEN) -> Code:
    """The canonical Huffman code for these weights (degenerate if only one symbol is used)."""
    lengths = code_lengths(weights, max_len)
    used = [i for i, x in enumerate(weights) if x > 0]
    if len(used) == 1:
        return from_lengths([0] * len(lengths), single=used[0])
    return from_lengths(lengths)


def encode(symbols: np.ndarray, code: Code) -> tuple[bytes, int]:
    """Concatenated codewords of `symbols`. Returns (bytes, number of bits)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if code.single is not None:
        return b"", 0
    return pack_fields(code.codes[symbols], code.lengths[symbols])


def decode(buf: bytes | np.ndarray, nbits: int, count: int, code: Code) -> np.ndarray:
    """Decode exactly `count` symbols that fill exactly `nbits` bits."""
    if code.single is not None:
        if nbits:
            raise CodecError("degenerate Huffman stream must be empty; the payload is corrupt")
        return np.full(count, code.single, dtype=np.int64)
    if not count * code.minlen <= nbits <= count * code.maxlen:
        raise CodecError(f"Huffman stream of {nbits} bits cannot hold {count} symbols; the payload is corrupt")
    win = bit_windows(buf, nbits, _W)
    maxlen = code.maxlen
    if maxlen <= 16 and 1 << maxlen <= nbits:  # a table pays for itself (same result as the search)
        idx = code.table()[(win >> np.uint64(_W - maxlen)).astype(np.int64)]
    else:
        idx = np.searchsorted(code.starts, win, side="right") - 1
    valid = win < np.uint64(code.end) if code.end < 2**_W else np.ones(win.size, dtype=bool)
    idx = np.where(valid, idx, 0)
    step = code.lengths[code.order[idx]]
    pos = np.arange(nbits, dtype=np.int64)
    nxt = np.empty(nbits + 2, dtype=np.int64)
    nxt[:nbits] = np.where(valid & (pos + step <= nbits), pos + step, nbits + 1)
    starts = walk(nxt, count)
    return code.order[idx[starts]].astype(np.int64)
