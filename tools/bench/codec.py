"""Benchmark: the FedZip codec on a real model update (size, distance to the information bound, speed).

The update is the weight delta of an MLP 784-H-10 after a few SGD steps (batch 64) on the MNIST 5k images,
from a seeded He-uniform init (`fedfleet.edge_agent.nn.mlp.init`). H is the smallest width whose parameter count
reaches d; the tensors are taken in layout order, the tensor that crosses d is flattened and cut, the
rest are dropped, so the update has exactly d entries and nothing is tiled. Speeds count float32 input
megabytes (4 d / 1e6) per second in this one process: encode includes top-z and k-means, decode rebuilds
the dense tensors; each is the median of --repeat runs. `zstd_only_ratio` is plain zstd (same level,
3 if the codec's is 0) on the float32 bytes, the baseline. `bound_ratio` is the payload's bits over
`bound_bits` of the same quantised update.

    fedfleet bench codec [--d 1000000] [--z 0.01] [--encoding e4] [--json PATH]
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import zstandard

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.fedzip import ENCODINGS, FedZipParams, bound_bits, decode, encode, quantize
from fedfleet.edge_agent.nn import mlp
from fedfleet.tools.bench.output import emit, progress


def model_update(d: int, steps: int, seed: int, lr: float = 0.05) -> tuple[dict[str, np.ndarray], str]:
    """The delta of a 784-H-10 MLP after `steps` SGD steps on MNIST 5k, trimmed to d entries."""
    import torch

    from fedfleet.models import data as datasets

    hidden = max(1, math.ceil((d - 10) / (784 + 1 + 10)))
    sizes = [784, hidden, 10]
    start = mlp.init(sizes, seed)
    ds = datasets.mnist5k()
    rng = np.random.Generator(np.random.PCG64(seed))
    params = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in start.items()}
    x_all, y_all = torch.from_numpy(ds.x), torch.from_numpy(ds.y)
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(ds), 64, replace=False))
        h = torch.relu(x_all[idx] @ params["fc0.weight"].T + params["fc0.bias"])
        logits = h @ params["fc1.weight"].T + params["fc1.bias"]
        loss = torch.nn.functional.cross_entropy(logits, y_all[idx])
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= lr * g
    update: dict[str, np.ndarray] = {}
    left = d
    for name, _ in mlp.layout(sizes):
        if left == 0:
            break
        delta = params[name].detach().numpy() - start[name]
        if delta.size > left:
            delta = delta.ravel()[:left].copy()
        update[name] = delta.astype(np.float32)
        left -= delta.size
    source = f"MLP 784-{hidden}-10, {steps} SGD steps (lr {lr}, batch 64) on MNIST 5k, seed {seed}, trimmed to d"
    return update, source


def _median_seconds(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(update: dict[str, np.ndarray], p: FedZipParams, repeat: int) -> dict[str, float]:
    d = sum(v.size for v in update.values())
    layout = [(k, v.shape) for k, v in update.items()]
    payload = encode(update, p)
    out = decode(payload, layout, p, max_bytes=8 * 4 * d + 1024)
    q = quantize(update, p)
    for k in q:
        if out[k].tobytes() != q[k].tobytes():
            raise AssertionError(f"decode(encode(x)) differs from quantize(x) in {k} ({p.encoding})")
    enc_s = _median_seconds(lambda: encode(update, p), repeat)
    dec_s = _median_seconds(lambda: decode(payload, layout, p, max_bytes=8 * 4 * d + 1024), repeat)
    mb = 4 * d / 1e6
    return {
        "bytes": len(payload),
        "ratio_vs_float32": 4 * d / len(payload),
        "bound_ratio": 8 * len(payload) / bound_bits(q),
        "encode_mb_s": mb / enc_s,
        "decode_mb_s": mb / dec_s,
    }


def run(d: int, z: float, encoding: str, k: int, zstd_level: int, steps: int, seed: int, repeat: int,
        others: bool) -> dict[str, Any]:
    progress("codec", f"making the update: {d} entries from {steps} SGD steps on MNIST 5k")
    update, source = model_update(d, steps, seed)
    p = FedZipParams(z=z, k=k, encoding=encoding, zstd_level=zstd_level)
    progress("codec", f"encoding {encoding}: {repeat} timed encode/decode runs")
    main = measure(update, p, repeat)
    flat = np.concatenate([v.ravel() for v in update.values()]).astype(np.float32)
    zstd_bytes = len(zstandard.ZstdCompressor(level=zstd_level or 3).compress(flat.tobytes()))
    result: dict[str, Any] = {
        "d": d,
        "z": z,
        "encoding": encoding,
        "ratio_vs_float32": round(main["ratio_vs_float32"], 3),
        "bound_ratio": round(main["bound_ratio"], 4),
        "encode_mb_s": round(main["encode_mb_s"], 1),
        "decode_mb_s": round(main["decode_mb_s"], 1),
        "zstd_only_ratio": round(4 * d / zstd_bytes, 4),
    }
    if others:
        table = {}
        for enc in ENCODINGS:
            if enc != encoding:
                progress("codec", f"encoding {enc}: {repeat} timed encode/decode runs")
            m = main if enc == encoding else measure(update, FedZipParams(z=z, k=k, encoding=enc,
                                                                          zstd_level=zstd_level), repeat)
            table[enc] = {key: round(val, 4) for key, val in m.items()}
        result["encodings"] = table
        noise = {"w": np.random.Generator(np.random.PCG64(seed)).standard_normal(d).astype(np.float32)}
        progress("codec", "the Gaussian-noise baseline")
        m = measure(noise, p, 1)
        result["gaussian_noise"] = {key: round(m[key], 4) for key in ("ratio_vs_float32", "bound_ratio")}
    result["update"] = source
    result["timing"] = f"median of {repeat} runs, one process; 1-min load average {os.getloadavg()[0]:.1f}"
    return result


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet bench codec", description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1_000_000, help="entries in the update (default 1e6)")
    ap.add_argument("--z", type=float, default=0.01, help="fraction kept by top-z (default 0.01)")
    ap.add_argument("--k", type=int, default=3, help="clusters (default 3)")
    ap.add_argument("--encoding", choices=ENCODINGS, default="e4", help="FedZip encoding of the kept values (default %(default)s)")
    ap.add_argument("--zstd-level", type=int, default=3, help="zstd level of the lossless stage (default %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="SGD steps that make the update (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model update (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement; the median is kept")
    ap.add_argument("--no-others", action="store_true", help="skip the other encodings and the noise baseline")
    ap.add_argument("--json", metavar="PATH", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.d < 1:
        ap.error("--d must be at least 1")
    result = run(args.d, args.z, args.encoding, args.k, args.zstd_level, args.steps, args.seed,
                 max(1, args.repeat), not args.no_others)
    emit(result, ("d", "z", "encoding", "ratio_vs_float32", "bound_ratio", "encode_mb_s", "decode_mb_s", "zstd_only_ratio"), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
