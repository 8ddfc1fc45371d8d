"""FedZip's wire format is frozen: payloads and decodes match expectations stored from an earlier version.

`tests/data/fedzip_golden.json` holds, for a deterministic corpus of tensors (shapes and value patterns of
real updates, tiny and degenerate ones, every encoding and several z and k), the SHA-256 (first 16 hex digits) of each payload
and of its decode, and for damaged copies of each payload (bit flips, truncations) whether the decoder
refused it or the SHA-256 of what it returned. The file was written by the codec before its speed work
(`python -m tests.edge_agent.test_fedzip_golden --write`); any change in the bytes on the wire, in a decode, or in
which damaged payloads are refused fails here.

The values come from an integer hash, not from numpy's random generators, so the corpus is the same on
every platform and numpy version.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from fedfleet.edge_agent.errors import CodecError
from fedfleet.edge_agent.fedzip import FedZipParams, decode, encode, quantize

GOLDEN = Path(__file__).parents[1] / "data" / "fedzip_golden.json"
CAP = 1 << 22
_M64 = (1 << 64) - 1


def _hash01(seed: int, n: int) -> np.ndarray:
    """n floats in [0, 1) from a splitmix64-style integer hash of (seed, index): platform independent."""
    x = (np.arange(n, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & _M64)) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(29)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _values(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    u = _hash01(seed, n)
    if kind == "gauss":  # a Box-Muller-free heavy-ish tail: the inverse of a logistic
        u = np.clip(u, 1e-9, 1 - 1e-9)
        x = np.log(u / (1 - u)) * 0.01
    elif kind == "rows":  # updates concentrated in a few rows (real heads look like this)
        x = (u - 0.5) * 1e-3
        rows = x.reshape(shape[0], -1) if len(shape) > 1 else x.reshape(1, -1)
        rows[:: max(1, rows.shape[0] // 3)] *= 40.0
        x = rows.ravel()
    elif kind == "signs":  # neighbouring entries share a sign (cheap id deltas)
        x = np.where(np.arange(n) // 7 % 2 == 0, 1.0, -1.0) * (0.5 + u)
    elif kind == "few":  # fewer distinct values than k, ties at the threshold
        x = np.choose((u * 4).astype(int), [0.0, 1.0, -1.0, 2.5])
    elif kind == "const":
        x = np.full(n, 0.25)
    else:
        x = np.zeros(n)
    return x.astype(np.float32).reshape(shape)


DEMO_LAYOUT = [("fc0.weight", (32, 64)), ("fc0.bias", (32,)), ("fc1.weight", (10, 32)), ("fc1.bias", (10,))]
SHAPES = [(32, 64), (32,), (10, 32), (10,), (128, 784), (3, 3), (1,), (1000,), (0,), (7, 11, 5)]


def cases() -> list[tuple[str, dict[str, np.ndarray], FedZipParams]]:
    out = []
    seed = 0
    for enc in ("e1", "e2", "e3", "e4"):
        for z, k in ((0.03, 3), (0.01, 3), (0.1, 2), (0.5, 4), (1.0, 1), (0.003, 16), (0.2, 8)):
            for kind in ("gauss", "rows", "signs", "few"):
                seed += 1
                tensors = {name: _values(kind, shape, seed * 31 + i) for i, (name, shape) in enumerate(DEMO_LAYOUT)}
                out.append((f"demo-{enc}-{z}-{k}-{kind}", tensors, FedZipParams(z=z, k=k, encoding=enc)))
        for shape in SHAPES:
            for kind in ("gauss", "rows", "signs", "few", "const", "zero"):
                seed += 1
                p = FedZipParams(z=0.03 if shape != (128, 784) else 0.01, k=3, encoding=enc,
                                 zstd_level=0 if seed % 3 == 0 else 3)
                out.append((f"{enc}-{'x'.join(map(str, shape))}-{kind}", {"t": _values(kind, shape, seed)}, p))
    return out


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())
    return h.hexdigest()[:16]


def _damaged(data: bytes) -> list[bytes]:
    """Deterministic damaged copies: single bit flips spread over the payload and three truncations."""
    if not data:
        return []
    out = []
    for j in range(12):
        pos = (j * 2654435761) % (8 * len(data))
        b = bytearray(data)
        b[pos // 8] ^= 0x80 >> (pos % 8)
        out.append(bytes(b))
    out += [data[: len(data) // 2], data[:-1], data + b"\0"]
    return out


def _outcome(data: bytes, layout: list, p: FedZipParams) -> str:
    try:
        return _digest(decode(data, layout, p, max_bytes=CAP))
    except CodecError:
        return "refused"


def compute() -> dict[str, dict[str, object]]:
    result = {}
    for name, tensors, p in cases():
        layout = [(k, tuple(v.shape)) for k, v in tensors.items()]
        data = encode(tensors, p)
        result[name] = {"payload": hashlib.sha256(data).hexdigest()[:16], "decoded": _outcome(data, layout, p),
                        "damaged": [_outcome(d, layout, p) for d in _damaged(data)]}
    return result


def test_payloads_decodes_and_refusals_match_the_stored_expectations() -> None:
    want = json.loads(GOLDEN.read_text())
    got = compute()
    assert set(got) == set(want)
    for name, tensors, p in cases():
        assert got[name]["payload"] == want[name]["payload"], f"{name}: the payload bytes changed"
        assert got[name]["decoded"] == want[name]["decoded"], f"{name}: the decode changed"
        assert got[name]["damaged"] == want[name]["damaged"], f"{name}: a damaged payload decodes differently"
        assert got[name]["decoded"] == _digest(quantize(tensors, p)), name  # and the decode is the quantisation


def test_corpus_covers_what_the_fast_paths_branch_on() -> None:
    """The corpus reaches refusals, accepted damage, empty and degenerate codes: it can fail."""
    want = json.loads(GOLDEN.read_text())
    outcomes = [o for v in want.values() for o in v["damaged"]]
    assert "refused" in outcomes and any(o != "refused" for o in outcomes)
    assert len(want) >= 200


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.edge_agent.test_fedzip_golden --write  (only when the wire format changes on purpose)")
    GOLDEN.write_text(json.dumps(compute(), indent=0, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
