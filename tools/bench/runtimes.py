"""Benchmark: the zoo models on ONNX Runtime and LiteRT, fp32 and int8 (size, latency, agreement, accuracy),
and zeroth-order query throughput with the head fed as graph inputs.

Every zoo model is trained centrally (seeded; `--quick` uses few epochs and only digits-mlp), exported to
ONNX (fp32, int8 static QDQ) and TFLite (fp32, full-integer int8, written without TensorFlow), and run on
the test split. For each (model, runtime, precision):
- `size_bytes`: the model file;
- `latency_b1_us`, `latency_b64_us`: median wall time of one `Runner.run` at batch 1 and batch 64
  (`--threads`, default 2), measured in alternating rounds across the two runtimes so machine noise hits
  both alike;
- `agreement`: argmax agreement with the torch fp32 model on the test split;
- `accuracy`: test accuracy.
`zo_calls_per_s` runs digits-mlp's int8 head-as-inputs variant at batch 64 with 2 threads, a different
perturbed head (w + 0.01 u, u Gaussian from PCG64) on every call, and counts calls per second.

    fedfleet bench runtimes [--quick] [--threads 2] [--seconds 0.5] [--json PATH]

Targets (issue 4): int8 agreement >= 0.99 and accuracy within 1 point of fp32; int8 size <= 0.35x fp32
on mnist-mlp; zo_calls_per_s >= 5000 on both runtimes. A summary against them goes to stderr.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import numpy as np

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.runtime import Runner, open_runner
from fedfleet.tools.bench.output import emit

RUNTIMES = {"onnxruntime": "onnx", "litert": "tflite"}
ZO_MODEL = "digits-mlp"


def _time_calls(
    runner: Runner, feeds: dict[str, np.ndarray], seconds: float, min_calls: int = 5
) -> list[float]:
    """Per-call wall times (us) of `runner.run(feeds)` for about `seconds`."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        runner.run(feeds)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def _latencies(
    runners: dict[str, Runner], x: np.ndarray, seconds: float, rounds: int
) -> dict[str, dict[int, float]]:
    """Median latency per runtime at batch 1 and 64, interleaving the runtimes round by round."""
    samples: dict[str, dict[int, list[float]]] = {rt: {1: [], 64: []} for rt in runners}
    batches = {1: x[:1], 64: np.resize(x, (64, *x.shape[1:])).astype(np.float32)}
    for runner in runners.values():  # warm-up: allocation at each batch size
        for xb in batches.values():
            runner.run({"x": xb})
    for _ in range(rounds):
        for rt, runner in runners.items():
            for b, xb in batches.items():
                samples[rt][b] += _time_calls(runner, {"x": xb}, seconds / rounds)
    return {rt: {b: statistics.median(v) for b, v in by_b.items()} for rt, by_b in samples.items()}


def _zo_calls_per_s(
    blobs: dict[str, bytes], head: dict[str, np.ndarray], x: np.ndarray, seconds: float, seed: int
) -> dict[str, float]:
    rng = np.random.Generator(np.random.PCG64(seed))
    weight, bias = (head[k] for k in head)
    pool = [
        {
            "x": np.resize(x, (64, *x.shape[1:])).astype(np.float32),
            "head.weight": (weight + 0.01 * rng.standard_normal(weight.shape)).astype(np.float32),
            "head.bias": (bias + 0.01 * rng.standard_normal(bias.shape)).astype(np.float32),
        }
        for _ in range(16)
    ]
    runners = {
        rt: open_runner(blobs[f"{prefix}-int8-headinputs"], runtime=rt, threads=2)
        for rt, prefix in RUNTIMES.items()
    }
    calls = {rt: 0 for rt in runners}
    spent = {rt: 0.0 for rt in runners}
    for runner in runners.values():
        runner.run(pool[0])
    rounds = 5
    for _ in range(rounds):  # alternate runtimes so both see the same machine load
        for rt, runner in runners.items():
            t0 = time.perf_counter()
            end = t0 + seconds / rounds
            n = 0
            while True:
                runner.run(pool[n % len(pool)])
                n += 1
                if n % 16 == 0 and time.perf_counter() >= end:
                    break
            spent[rt] += time.perf_counter() - t0
            calls[rt] += n
    return {rt: round(calls[rt] / spent[rt], 1) for rt in runners}


def run(names: list[str], *, quick: bool, threads: int, seconds: float, seed: int) -> dict[str, Any]:
    import torch

    from fedfleet.models import export_onnx, export_tflite, zoo

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small models train faster on one thread
    try:
        trained = {n: zoo.train(n, seed=seed, epochs=(3 if quick else None)) for n in names}
    finally:
        torch.set_num_threads(torch_threads)
    models: list[dict[str, Any]] = []
    zo: dict[str, float] = {}
    for name in names:
        model = trained[name]
        _, test_set = zoo.datasets(name)
        want = zoo.predict(model, test_set.x).argmax(axis=1)
        blobs = {
            **export_onnx.export_variants(name, model, seed=seed),
            **export_tflite.export_variants(name, model, seed=seed),
        }
        for precision in ("fp32", "int8"):
            runners = {
                rt: open_runner(blobs[f"{p}-{precision}"], runtime=rt, threads=threads)
                for rt, p in RUNTIMES.items()
            }
            lat = _latencies(runners, test_set.x, seconds, rounds=3)
            for rt, runner in runners.items():
                pred = runner.run({"x": test_set.x})[0].argmax(axis=1)
                models.append(
                    {
                        "model": name,
                        "runtime": rt,
                        "precision": precision,
                        "size_bytes": len(blobs[f"{RUNTIMES[rt]}-{precision}"]),
                        "latency_b1_us": round(lat[rt][1], 1),
                        "latency_b64_us": round(lat[rt][64], 1),
                        "agreement": round(float((pred == want).mean()), 4),
                        "accuracy": round(float((pred == test_set.y).mean()), 4),
                    }
                )
        if name == ZO_MODEL:
            head = {k: model.state_dict()[k].numpy() for k in zoo.get(name).head}
            zo = _zo_calls_per_s(blobs, head, test_set.x, seconds, seed)
    return {"models": models, "zo_calls_per_s": zo}


def summary(result: dict[str, Any]) -> list[str]:
    """Human-readable checks against the issue's targets."""
    lines = []
    rows = {(m["model"], m["runtime"], m["precision"]): m for m in result["models"]}
    for (model, rt, precision), m in rows.items():
        if precision != "int8":
            continue
        fp = rows[(model, rt, "fp32")]
        ok = m["agreement"] >= 0.99 and m["accuracy"] >= fp["accuracy"] - 0.01
        size = m["size_bytes"] / fp["size_bytes"]
        lines.append(
            f"{'ok ' if ok else 'MISS'} {model:10s} {rt:11s} int8 agreement {m['agreement']:.4f} "
            f"accuracy {m['accuracy']:.4f} (fp32 {fp['accuracy']:.4f}) size {size:.3f}x fp32"
        )
    for rt, v in result["zo_calls_per_s"].items():
        lines.append(f"{'ok ' if v >= 5000 else 'MISS'} zo_calls_per_s {rt}: {v:.0f} (target 5000)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet bench runtimes", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: digits-mlp only, 3 epochs, short timings"
    )
    ap.add_argument("--models", nargs="*", default=None, help="zoo model names (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="runtime threads for the latency rows")
    ap.add_argument("--seconds", type=float, default=None, help="timing budget per measurement")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs and the zeroth-order queries (default %(default)s)")
    ap.add_argument("--json", metavar="PATH", help="also write the JSON here")
    args = ap.parse_args(argv)
    from fedfleet.models import zoo

    names = args.models or ([ZO_MODEL] if args.quick else zoo.names())
    unknown = [n for n in names if n not in zoo.names()]
    if unknown:
        ap.error(f"unknown zoo model(s) {unknown}; choose from {zoo.names()}")
    if ZO_MODEL not in names:
        names = [ZO_MODEL, *names]
    seconds = args.seconds if args.seconds is not None else (0.05 if args.quick else 1.0)
    result = run(names, quick=args.quick, threads=args.threads, seconds=seconds, seed=args.seed)
    emit(result, ("models", "zo_calls_per_s"), args.json)
    for line in summary(result):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
