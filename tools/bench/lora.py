"""`fedfleet bench lora`: FedIT, FLoRA and LoRA-FAIR side by side, and the spec's synthetic check.

Digits feature-shift task (the spec's second small check): a frozen 64-64-10 MLP pre-trained on MNIST
(`fedfleet.models.lora_base`), LoRA r = 4 on its hidden layer plus a trainable head, 6 agents each holding one domain
of an IID share of the digits train split (identity, flip, inversion, 1-pixel shift, noise, blur), test
accuracy averaged over the six domains of the test split. Each seed runs the three methods one after another
on one Mosquitto broker, with the same shards, package and rounds; `gain_points` is 100 × (LoRA-FAIR − FedIT)
in final accuracy, averaged over seeds.

Synthetic check (the spec's first): `fedfleet.models.mirrors.lora.synthetic_check` over the same seeds, 6 factor pairs,
r = 4, d = 32; `synthetic_cos_fedit` = cos(ΔW, B̄Ā), `synthetic_cos_fair` = cos(ΔW, B̄′Ā) after the λ = 0.01
refinement, `delta_b_rel_norm` = its ‖ΔB‖/‖B̄‖ (the synthetic one; the digits runs' per-round values are in
the details line, with per-seed accuracies, curves, a λ sweep, bytes and the optional MNIST run).

    fedfleet bench lora --json out.json [--seeds 3] [--rounds 30] [--mnist-rounds 0] [--quick]
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.tools.bench.output import emit, progress

KEYS = ("seeds", "fedit_accuracy", "flora_accuracy", "lora_fair_accuracy", "gain_points", "synthetic_cos_fedit",
        "synthetic_cos_fair", "delta_b_rel_norm")
METHODS = ("fedit", "flora", "lora_fair")
LAMBDAS = (0.0, 0.001, 0.01, 0.1, 1.0)


def synthetic(seeds: list[int]) -> dict[str, Any]:
    from fedfleet.models.mirrors.lora import synthetic_check

    rows = {lam: [synthetic_check(s, lam=lam) for s in seeds] for lam in LAMBDAS}
    sweep = [{"lam": lam, "cos_fair": float(np.mean([r.cos_fair for r in rs])),
              "delta_b_rel_norm": float(np.mean([r.delta_b_rel_norm for r in rs])),
              "p_over_t": float(np.mean([r.p_over_t for r in rs]))} for lam, rs in rows.items()]
    main = rows[0.01]
    return {"synthetic_cos_fedit": float(np.mean([r.cos_fedit for r in main])),
            "synthetic_cos_fair": float(np.mean([r.cos_fair for r in main])),
            "delta_b_rel_norm": float(np.mean([r.delta_b_rel_norm for r in main])),
            "synthetic_lambda_sweep": sweep}


def run_one(method: str, seed: int, rounds: int, agents: int, dataset: str, broker: str, run_root: Path,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import run_demo

    cfg = JobConfig(method=method, rounds=rounds, agents=agents, alpha=0.0, seed=seed, dataset=dataset,
                    fleet=f"bl{uuid.uuid4().hex[:10]}", deadline_s=60.0, method_config=dict(overrides or {}))
    run_dir = run_root / f"{dataset}-{method}-{seed}"
    result = run_demo(cfg, broker=broker, run_dir=run_dir, quiet=True)
    history = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)["extra"].get("history", [])
    out: dict[str, Any] = {"accuracy": result.final_accuracy, "curve": [round(s.accuracy, 4) for s in result.summaries],
                           "bytes_up": result.bytes_up, "bytes_down": result.bytes_down,
                           "ok": [s.ok for s in result.summaries], "wall_s": round(result.wall_s, 1)}
    if method in ("fedit", "lora_fair") and history:
        for key in ("cos_fedit", "cos_fair", "delta_b_rel_norm", "p_over_t"):
            per_round = [float(np.mean([d[key] for d in h["layers"].values()])) for h in history
                         if all(key in d for d in h["layers"].values())]
            if per_round:
                out[key] = [round(v, 5) for v in per_round]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet bench lora", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=30, help="rounds per run (default %(default)s)")
    ap.add_argument("--agents", type=int, default=6, help="agents per run (default %(default)s)")
    ap.add_argument("--mnist-rounds", type=int, default=0,
                    help="also run the 784-256-256-10 MNIST model, 10 agents, this many rounds, first seed only")
    ap.add_argument("--broker", default="mosquitto", help="mosquitto (default), embedded, or mqtt://host:port")
    ap.add_argument("--epochs", type=int, default=None,
                    help="local epochs per round for every method (default: the methods' defaults, 2)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 6 agents (smoke test)")
    ap.add_argument("--json", default=None, help="also write the result JSON to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds = 1, 2
    from fedfleet.coordinator.broker import start_broker
    from fedfleet.coordinator.job.run import small_model_threads

    small_model_threads()
    seeds = list(range(args.seeds))
    methods = [m for m in args.methods.split(",") if m]
    if not {"fedit", "lora_fair"} <= set(methods) or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods must include fedit and lora_fair, from {METHODS}")
    overrides = {"epochs": args.epochs} if args.epochs else {}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"seeds": args.seeds, **synthetic(seeds)}
    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp, start_broker(args.broker) as b:
        for seed in seeds:  # the three methods side by side within each seed
            for method in methods:
                progress("lora", f"{method}, seed {seed}: {args.rounds} rounds, {args.agents} agents")
                per_seed[method].append(run_one(method, seed, args.rounds, args.agents, "digits", b.url, Path(tmp),
                                                overrides))
        mnist = {}
        if args.mnist_rounds:
            for method in methods:
                progress("lora", f"{method} on MNIST: {args.mnist_rounds} rounds")
                mnist[method] = run_one(method, 0, args.mnist_rounds, 10, "mnist", b.url, Path(tmp), overrides)
        broker_kind = b.kind
    for method in METHODS:
        runs = per_seed.get(method)
        result[f"{method}_accuracy"] = float(np.mean([r["accuracy"] for r in runs])) if runs else None
    gains = [100 * (f["accuracy"] - e["accuracy"]) for f, e in zip(per_seed["lora_fair"], per_seed["fedit"], strict=True)]
    result["gain_points"] = float(np.mean(gains))
    result.update(per_seed_gain_points=gains, method_overrides=overrides, runs=per_seed, rounds=args.rounds, agents=args.agents,
                  broker=broker_kind, wall_s=round(time.perf_counter() - t0, 1))
    if mnist:
        result["mnist"] = mnist
    emit(result, KEYS, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
