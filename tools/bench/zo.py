"""Benchmark of the zeroth-order methods, FedZO against FZooS, driven in-process through their Strategy and
Learner classes (the round engine's loop without MQTT: configure, tasks with float32 tensors and JSON
config, shape checks, aggregate).

`fedfleet bench zo --json PATH [--plot PNG] [--quick] [--jobs N]` writes {"quadratic", "digits_f1"}:
- quadratic: the FZooS quadratic (d=50, 5 agents, div 0.5, F* in closed form), the same rounds for every
  run, T = H = 10. The headline FZooS is the spec's configuration (Adam, lr 0.01, 20 GP restarts, M =
  10000, exploration radius 0.01, ρ_i as the spec computes it, no floor); FedZO is the spec's dense FedZO
  (plain GD, lr 0.1). query_ratio = queries FedZO used to reach its final gap F−F* / queries FZooS used to
  reach that gap; surrogate_cosine = mean cosine between FZooS's GP mean gradient and the true ∇f_i at its
  iterates. Beside it, under their own labels (quadratic_details.variants): "fzoos_gd", the earlier
  headline (plain GD, lr 0.1, 2 GP restarts), and "fzoos_rho_floor", the spec's configuration with the
  refresh radius floored at the exploration radius (the deviation the learner used to apply).
- digits_f1: 1 − macro-F1 through the int8 ONNX digits-mlp with its last layer fed as graph inputs,
  class-skewed shards (Dirichlet 0.5), the same total query budget for every run; test-set macro-F1 of
  the resulting global head. fzoos_f1 is the spec's configuration; "fzoos_gd" (plain GD, lr 1, 2
  restarts, radius 0.05, M = 10000) is beside it in digits_f1_details, with the diagnostics of why FZooS
  loses there (the fitted GP lengthscale, how often an exploration query ties the iterate's value, and
  a probe of how flat 1 − macro-F1 is around the start at several radii).
The objective's true value is used only to score rounds here; no strategy evaluates it. `--jobs N` runs
the independent runs in N processes (the results do not depend on it).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies.base import Strategy
from fedfleet.edge_agent.cli_run import ArgParser
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.learners.base import LocalData
from fedfleet.edge_agent.zo.objectives import (
    macro_f1,
    quadratic_coeffs,
    quadratic_configs,
)
from fedfleet.tools.bench._zo_loop import EMPTY, Trace, _mean, _pool_map, run
from fedfleet.tools.bench._zo_quadratic import QUAD_FZOOS, bench_quadratic
from fedfleet.tools.bench.output import emit, progress

# ---- digits, macro-F1 through the int8 runtime ------------------------------------------------------

# step sizes from small sweeps at a 5,000-query budget (FedZO: mu in {0.3, 1, 3} x lr in {0.01, 0.03, 0.1, 0.3};
# FZooS GD: (lr, radius) in {(0.2, 0.05), (0.5, 0.05), (1, 0.05), (2, 0.1), (1, 0.3), (3, 0.3)})
DIGITS_FEDZO = {"lr": 0.3, "mu": 3.0, "directions": 20, "local_steps": 10}
# the spec's FZooS (the learner's defaults: radius 0.01, init radius 0.01, M = 10000)
DIGITS_FZOOS = {"lr": 0.01, "optimizer": "adam", "local_steps": 10, "gp_restarts": 20}
DIGITS_FZOOS_GD = {"lr": 1.0, "optimizer": "sgd", "local_steps": 10, "gp_restarts": 2, "explore_radius": 0.05,
                   "init_radius": 0.05}  # the earlier headline, and the demo's default
DIGITS_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedzo": ("fedzo", DIGITS_FEDZO),
    "fzoos": ("fzoos", DIGITS_FZOOS),
    "fzoos_gd": ("fzoos", DIGITS_FZOOS_GD),
}
PROBE_RADII = (0.01, 0.05, 0.3, 1.0)


def digits_head(runtime: str, seed: int, quick: bool) -> tuple[Any, Any]:
    """The int8 digits-mlp with its last layer as graph inputs, on `runtime`; returns (RunnerHead, torch net)."""
    from fedfleet.edge_agent.runtime import open_runner
    from fedfleet.edge_agent.zo.problem import RunnerHead
    from fedfleet.models import zoo
    from fedfleet.models.export_onnx import HEAD_INPUTS

    net = zoo.train("digits-mlp", seed=seed, epochs=5 if quick else None)
    if runtime == "litert":
        from fedfleet.models.export_tflite import export_variants as tflite_variants

        blob = tflite_variants("digits-mlp", net, seed=seed)["tflite-int8-headinputs"]
    else:
        from fedfleet.models.export_onnx import export_variants as onnx_variants

        blob = onnx_variants("digits-mlp", net, seed=seed)["onnx-int8-headinputs"]
    runner = open_runner(blob, runtime=runtime, threads=1)
    return RunnerHead(runner, dict(zip(zoo.get("digits-mlp").head, HEAD_INPUTS))), net


def _digits_setup(runtime: str, seed: int, quick: bool, agents: int) -> dict[str, Any]:
    from fedfleet.models import zoo
    from fedfleet.models.data import partition_dirichlet

    entry = zoo.get("digits-mlp")
    train, test = zoo.datasets("digits-mlp")
    head, net = digits_head(runtime, seed, quick)
    w_name, b_name = entry.head
    out_dim, in_dim = tuple(net.state_dict()[w_name].shape)
    rng = np.random.Generator(np.random.PCG64(seed + 7))  # a fresh head: the ZO methods train it from scratch
    bound = 1.0 / np.sqrt(in_dim)
    init = {w_name: torch.from_numpy(rng.uniform(-bound, bound, (out_dim, in_dim)).astype(np.float32)),
            b_name: torch.zeros(out_dim)}
    parts = partition_dirichlet(train.y, agents, 0.5, seed=seed)
    names = [f"agent-{i}" for i in range(agents)]
    data = {a: LocalData(train.x[idx], train.y[idx]) for a, idx in zip(names, parts)}

    def test_f1(s: Strategy) -> float:
        h = {k: v.numpy() for k, v in s.state.items()}
        return macro_f1(test.y, head.head_logits(h, test.x).argmax(1))

    trained = {k: v.detach() for k, v in net.state_dict().items() if k in entry.head}
    return {"head": head, "init": init, "data": data, "names": names, "test_f1": test_f1, "trained": trained,
            "d": out_dim * in_dim + out_dim}


def _digits_job(job: tuple[str, str, int, bool, int, int, dict[str, Any]]) -> dict[str, Any]:
    """One run on digits, or the flatness probe ("probe"): 1 − macro-F1 on agent 0's shard at 50 points
    uniform in x0 ± r, for each r in PROBE_RADII: the fraction that ties f(x0) exactly, and the number
    of distinct values."""
    name, runtime, seed, quick, agents, budget, overrides = job
    env = _digits_setup(runtime, seed, quick, agents)
    if name == "probe":
        from fedfleet.edge_agent.zo import problem

        a0 = env["names"][0]
        tensors = {k: v.numpy() for k, v in env["init"].items()}
        prob = problem.build({"objective": "macro_f1", "zo_path": "runtime"}, tensors, env["data"][a0], env["head"])
        rng = np.random.Generator(np.random.PCG64(seed + 11))
        y0 = prob.objective(prob.x0)
        out: dict[str, Any] = {"agent": a0, "f_x0": y0}
        for r in PROBE_RADII:
            ys = [prob.objective(prob.x0 + rng.uniform(-r, r, prob.view.d)) for _ in range(50)]
            out[f"r{r:g}"] = {"tie_fraction": float(np.mean([y == y0 for y in ys])), "distinct": len(set(ys)),
                              "mean_abs_change": float(np.mean([abs(y - y0) for y in ys]))}
        return {"name": name, "probe": out, "d": env["d"], "start_f1": None,
                "trained_head_f1": env["test_f1"](create_strategy("fedzo", env["trained"]))}
    method, base = DIGITS_VARIANTS[name]
    strategy = create_strategy(method, env["init"], objective="macro_f1", zo_path="runtime", seed=seed,
                               **{**base, **overrides})
    learners = {a: create_learner(method) for a in env["names"]}
    t0 = time.perf_counter()
    tr = run(strategy, learners, env["data"], 10_000, model=env["head"], score=env["test_f1"], budget=budget)
    per = [m for r in tr.metrics for k, m in r.items() if k.endswith("/0")]
    res = {"name": name, "f1": tr.score[-1], "queries": tr.queries[-1], "rounds": len(tr.queries) - 1,
           "seconds": time.perf_counter() - t0, "curve": {"queries": tr.queries, "f1": tr.score},
           "start_f1": tr.score[0], "d": env["d"]}
    if method == "fzoos":
        ref = [m for r in tr.metrics for k, m in r.items() if k.endswith("/1")]
        res["diagnostics"] = {
            "gp_lengthscale": _mean([m["gp_lengthscale"] for m in per]),
            "gp_grad_norm": _mean([m["gp_grad_norm"] for m in per]),
            "explore_tie_fraction": _mean([m["explore_tie_fraction"] for m in per]),
            "refresh_tie_fraction": _mean([m["refresh_tie_fraction"] for m in ref]),
            "rho_mean": _mean([m["rho_given"] for m in ref]),
            "objective_change_per_round": _mean([m["objective_first"] - m["objective_last"] for m in per]),
            "steps": int(sum(1 for _ in per) * int(base.get("local_steps", 10)) / max(1, len(env["names"]))),
        }
    return res


def bench_digits(*, agents: int, budget: int, seed: int, quick: bool, runtime: str = "onnxruntime",
                 fzoos_overrides: dict[str, Any] | None = None, jobs: int = 1) -> dict[str, Any]:
    work = [(n, runtime, seed, quick, agents, budget, (fzoos_overrides or {}) if n != "fedzo" else {})
            for n in [*DIGITS_VARIANTS, "probe"]]
    done = {r["name"]: r for r in _pool_map(_digits_job, work, jobs)}
    res: dict[str, Any] = {"runtime": runtime, "d": done["fedzo"]["d"], "agents": agents, "queries": budget,
                           "configs": {n: c for n, (_, c) in DIGITS_VARIANTS.items()}}
    for n in DIGITS_VARIANTS:
        r = done[n]
        res[f"{n}_f1"] = r["f1"]
        for key in ("queries", "rounds", "seconds", "curve"):
            res[f"{n}_{key}"] = r[key]
        if "diagnostics" in r:
            res[f"{n}_diagnostics"] = r["diagnostics"]
        res["start_f1"] = r["start_f1"]
    res["flatness_probe"] = done["probe"]["probe"]
    res["trained_head_f1"] = done["probe"]["trained_head_f1"]
    return res


def history_memory(rounds: int, *, d: int = 330, history_points: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One FZooS agent on the quadratic at the digits head's d over `rounds` rounds with cheap GP settings:
    stored queries and the memory Python holds (tracemalloc, after each round), every `rounds // 10` rounds."""
    import gc
    import tracemalloc

    cheap = {"rff_features": 2000, "gp_restarts": 1, "history_points": history_points}
    c1, c2 = quadratic_coeffs(d, 1, 0.5, seed)
    cfg = quadratic_configs(d, 1, 0.5, seed)[0]
    strategy = create_strategy("fzoos", {"x": torch.full((d,), 0.5)}, objective="quadratic", seed=seed,
                               agent_config={"agent-0": cfg}, **{**QUAD_FZOOS, **cheap})
    learners = {"agent-0": create_learner("fzoos")}
    out: dict[str, Any] = {"d": d, "history_points": history_points, "rounds": [], "stored": [], "traced_mb": []}
    del c1, c2
    tracemalloc.start()
    try:
        for r in range(1, rounds + 1):
            run(strategy, learners, {"agent-0": EMPTY}, 1)
            if r % max(1, rounds // 10) == 0 or r == rounds:
                gc.collect()
                out["rounds"].append(r)
                out["stored"].append(len(learners["agent-0"].xs))
                out["traced_mb"].append(round(tracemalloc.get_traced_memory()[0] / 2**20, 2))
    finally:
        tracemalloc.stop()
    return out


def _memory_job(job: tuple[int, int]) -> dict[str, Any]:
    return history_memory(job[0], history_points=job[1])


def plot(traces: dict[str, Trace], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, tr in traces.items():
        ax.semilogy(tr.queries, np.maximum(tr.score, 1e-12), marker="o", ms=3, label=method.replace("fzoos", "FZooS")
                    .replace("fedzo", "FedZO"))
    ax.set_xlabel("cumulative queries (all agents)")
    ax.set_ylabel("F − F*")
    ax.set_title("FZooS quadratic: d=50, 5 agents, div 0.5 (fzoos: the spec's configuration)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet bench zo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here (they are printed too)")
    ap.add_argument("--plot", help="PNG of F − F* against cumulative queries on the quadratic")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--rounds", type=int, default=20, help="rounds on the quadratic (both methods)")
    ap.add_argument("--budget", type=int, default=10000, help="total query budget on digits (both methods)")
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "litert", "both"],
                    help="runtime for the digits objective; 'both' adds a LiteRT run under digits_f1.by_runtime")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shards and the directions (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=1, help="run the independent runs in this many processes")
    ap.add_argument("--memory-rounds", type=int, default=0,
                    help="instead: one FZooS agent's stored queries and memory over this many rounds, with the "
                         "history bounded and unbounded (prints JSON)")
    args = ap.parse_args(argv)
    if args.memory_rounds:
        runs = _pool_map(_memory_job, [(args.memory_rounds, 1000), (args.memory_rounds, 0)], args.jobs)
        print(json.dumps({"bounded": runs[0], "unbounded": runs[1]}))
        return 0
    try:  # one BLAS thread: the GP and RFF solves are small, and threads only contend on a busy machine
        from threadpoolctl import threadpool_limits

        limits: Any = threadpool_limits(1)
    except ImportError:  # pragma: no cover
        limits = None
    try:
        if args.quick:
            small = {"rff_features": 500, "local_steps": 3, "explore_candidates": 30, "refresh_candidates": 40,
                     "refresh_pick": 10}
            small["gp_restarts"] = 2
            quad, traces = bench_quadratic(d=8, agents=3, div=0.5, rounds=2, seed=args.seed, fzoos_overrides=small,
                                           jobs=args.jobs, variants=["fedzo", "fzoos", "fzoos_gd"])
            kw: dict[str, Any] = {"agents": 3, "budget": 600, "quick": True, "fzoos_overrides": small,
                                  "jobs": args.jobs}
        else:
            progress("zo", f"the quadratic (d=50, 5 agents): FedZO and FZooS variants, {args.rounds} rounds")
            quad, traces = bench_quadratic(d=50, agents=5, div=0.5, rounds=args.rounds, seed=args.seed,
                                           jobs=args.jobs)
            kw = {"agents": 5, "budget": args.budget, "quick": False, "jobs": args.jobs}
        runtimes = ["onnxruntime", "litert"] if args.runtime == "both" else [args.runtime]
        by_rt = {}
        for rt in runtimes:
            progress("zo", f"the digits head's macro-F1 on {rt}: FedZO and FZooS variants")
            by_rt[rt] = bench_digits(seed=args.seed, runtime=rt, **kw)
        digits = dict(by_rt[runtimes[0]])
        if len(runtimes) > 1:
            digits["by_runtime"] = by_rt
    finally:
        if limits is not None:
            limits.unregister()
    quad_keys = ("d", "agents", "queries_fedzo", "queries_fzoos", "gap_fedzo", "gap_fzoos", "query_ratio",
                 "surrogate_cosine")
    digits_keys = ("fedzo_f1", "fzoos_f1", "queries")
    result = {"quadratic": {k: quad[k] for k in quad_keys}, "digits_f1": {k: digits[k] for k in digits_keys},
              "quadratic_details": {k: v for k, v in quad.items() if k not in quad_keys},
              "digits_f1_details": {k: v for k, v in digits.items() if k not in digits_keys}}
    emit(result, ("quadratic", "digits_f1"), args.json)
    if args.plot:
        plot(traces, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
