"""Top-z sparsification and 1-D k-means over the kept entries: a tensor becomes a `Sparse` update.

The pruned entries are exactly 0 and are not clustered; only the kept entries are (see the package
docstring for why). A `Sparse` is canonical: positions ascending, centroids float32, ascending, distinct
and nonzero, every centroid used. The decoder rebuilds exactly `Sparse.dense()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CodecError

KMEANS_ITERS = 4  # Lloyd iterations, as in the reference code
_SAMPLE = 16384  # sample size for the top-z pre-threshold
_SAMPLE_MIN = 8 * _SAMPLE


@dataclass(frozen=True)
class Sparse:
    n: int
    positions: np.ndarray  # int64, strictly ascending, < n
    ids: np.ndarray  # int64 cluster index of each position
    centroids: np.ndarray  # float32, strictly ascending, nonzero

    @property
    def m(self) -> int:
        return int(self.positions.size)

    def counts(self) -> np.ndarray:
        return np.bincount(self.ids, minlength=self.centroids.size).astype(np.int64)

    def dense(self, shape: tuple[int, ...]) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        out[self.positions] = self.centroids[self.ids]
        return out.reshape(shape)


def top_z(a: np.ndarray, m: int) -> np.ndarray:
    """Ascending positions of the m largest entries of `a` (>= 0); ties at the threshold go to the lowest
    positions, so exactly m are kept.

    For large tensors a strided sample gives a safe lower threshold first, so the exact selection only
    partitions the few candidates above it; the result is the same as partitioning everything.
    """
    n = a.size
    if m >= n:
        return np.arange(n, dtype=np.int64)
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    cand: np.ndarray | None = None
    if n >= _SAMPLE_MIN and m <= n // 8:
        sample = a[:: n // _SAMPLE]
        r = sample.size - 2 * -(-m * sample.size // n) - 16
        if r > 0:
            low = np.partition(sample, r)[r]
            cand = np.flatnonzero(a >= low)
            if cand.size < m:  # the sample misled us: fall back to the full selection
                cand = None
    if cand is None:
        cand = np.arange(n, dtype=np.int64)
        sub = a
    else:
        sub = a[cand]
    kth = sub.size - m
    tau = np.partition(sub, kth)[kth]
    above = cand[sub > tau]
    at = cand[sub == tau][: m - above.size]
    return np.sort(np.concatenate((above, at))).astype(np.int64)


def kmeans_1d(v: np.ndarray, k: int, iters: int = KMEANS_ITERS) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm in 1-D from centroids linspace(min, max, k). Returns (ascending centroids, ids).

    Empty clusters are dropped (so fewer than k distinct values just give fewer centroids); every returned
    centroid is the mean of its members.
    """
    lo, hi = float(v.min()), float(v.max())
    c = np.linspace(lo, hi, k) if hi > lo else np.array([lo])
    ids = np.zeros(v.size, dtype=np.int64)
    for _ in range(max(1, iters)):
        ids = np.searchsorted((c[:-1] + c[1:]) / 2, v, side="left").astype(np.int64)
        cnt = np.bincount(ids, minlength=c.size)
        tot = np.bincount(ids, weights=v, minlength=c.size)
        used = cnt > 0
        new = tot[used] / cnt[used]
        ids = (np.cumsum(used) - 1)[ids]
        if new.size == c.size and np.array_equal(new, c):
            break
        c = new
    return c, ids


def sparsify(x: np.ndarray, m: int, k: int) -> Sparse:
    """Keep the m largest-magnitude entries of x, cluster them into at most k float32 centroids."""
    flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
    mag = np.abs(flat)
    if flat.size and not np.isfinite(mag.max()):  # max() propagates NaN
        raise CodecError("tensor has NaN or infinite entries; fix the local update before encoding it")
    if m == 1 and flat.size:  # a bias-sized tensor keeps one entry: its own centroid (what k-means gives)
        p = int(np.argmax(mag))  # the first of equal maxima, as top_z breaks ties
        one = np.array([p], dtype=np.int64)
        if flat[p] == 0:
            return Sparse(flat.size, one[:0], one[:0].copy(), np.zeros(0, np.float32))
        return Sparse(flat.size, one, np.zeros(1, dtype=np.int64), flat[one].astype(np.float32))
    pos = top_z(mag, m)
    vals = flat[pos]
    nonzero = vals != 0
    pos, vals = pos[nonzero], vals[nonzero]
    if pos.size == 0:
        return Sparse(flat.size, pos, pos.copy(), np.zeros(0, np.float32))
    c, ids = kmeans_1d(vals.astype(np.float64), k)
    # float32 rounding can merge centroids or flush one to zero: canonicalise
    table, inv = np.unique(c.astype(np.float32), return_inverse=True)
    ids = inv.reshape(-1)[ids]
    zero = np.flatnonzero(table == 0)
    if zero.size:
        keep = ids != zero[0]
        pos, ids = pos[keep], ids[keep]
        ids = ids - (ids > zero[0])
        table = np.delete(table, zero[0])
    return Sparse(flat.size, pos, ids.astype(np.int64), table.astype(np.float32))
