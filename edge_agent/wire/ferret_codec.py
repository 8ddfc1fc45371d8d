"""The `ferret` payload codec: only the (index, gamma) pairs of a Ferret upload travel, never a dense vector.

The layout is one 1-D tensor per block, `gamma.<l>` of length K (the seed pool). The payload holds, for each
layout tensor in order, a little-endian uint16 count n, then n uint16 seed indices, then n float32
coefficients: 2 L + 6 sum_l K_l bytes for L blocks. Entries that are exactly zero are not sent (they add
nothing to the aggregate); the decoder fills them with zeros.

Decoding refuses, with a typed `CodecError` whose reason lands in the ledger as `rejected:<reason>`:
`too_many_pairs` (more pairs than K in a block), `index_range` (an index >= K), `duplicate_index`,
`nonfinite` (a NaN or infinite gamma) and `shape` (a truncated payload or trailing bytes).
"""

from __future__ import annotations

import numpy as np

from fedfleet.edge_agent.errors import CodecError

Layout = list[tuple[str, tuple[int, ...]]]
Tensors = dict[str, np.ndarray]
MAX_POOL = 65535


def _pool_size(name: str, shape: tuple[int, ...]) -> int:
    if len(shape) != 1 or not 1 <= shape[0] <= MAX_POOL:
        raise CodecError(f"ferret tensor {name} must be 1-D with 1..{MAX_POOL} entries, got {shape}", reason="shape")
    return int(shape[0])


def encode(tensors: Tensors, layout: Layout) -> bytes:
    parts: list[bytes] = []
    for name, shape in layout:
        _pool_size(name, shape)
        vec = np.asarray(tensors[name], np.float32)
        if vec.shape != shape:
            raise CodecError(f"tensor {name} has shape {vec.shape}, layout says {shape}", reason="shape")
        idx = np.flatnonzero(vec)  # NaN is nonzero: a diverged learner's gamma is sent and refused upstream
        parts.append(np.uint16(len(idx)).astype("<u2").tobytes())
        parts.append(idx.astype("<u2").tobytes())
        parts.append(vec[idx].astype("<f4").tobytes())
    return b"".join(parts)


def decode(data: bytes, layout: Layout) -> Tensors:
    out: Tensors = {}
    view = memoryview(data)
    pos = 0
    for name, shape in layout:
        k = _pool_size(name, shape)
        if pos + 2 > len(view):
            raise CodecError(f"ferret payload ends before the count of {name}", reason="shape")
        n = int(np.frombuffer(view[pos : pos + 2], "<u2")[0])
        pos += 2
        if n > k:
            raise CodecError(f"{name}: {n} pairs for a pool of K = {k}", reason="too_many_pairs")
        end = pos + 6 * n
        if end > len(view):
            raise CodecError(f"ferret payload ends inside the pairs of {name}", reason="shape")
        idx = np.frombuffer(view[pos : pos + 2 * n], "<u2").astype(np.int64)
        val = np.frombuffer(view[pos + 2 * n : end], "<f4")
        pos = end
        if n and int(idx.max()) >= k:
            raise CodecError(f"{name}: seed index {int(idx.max())} is out of range for K = {k}", reason="index_range")
        if len(np.unique(idx)) != n:
            raise CodecError(f"{name}: a seed index appears twice", reason="duplicate_index")
        if not np.isfinite(val).all():
            raise CodecError(f"{name}: a coefficient is NaN or infinite", reason="nonfinite")
        vec = np.zeros(k, np.float32)
        vec[idx] = val
        out[name] = vec
    if pos != len(view):
        raise CodecError(f"ferret payload has {len(view) - pos} trailing bytes", reason="shape")
    return out
