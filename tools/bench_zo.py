"""Benchmark of the zeroth-order methods, FedZO against FZooS, driven in-process through their Strategy and
Learner classes (the round engine's loop without MQTT: configure, tasks with float32 tensors and JSON
config, shape checks, aggregate).

`fedfleet bench zo --json PATH [--plot PNG] [--quick]` writes {"quadratic", "digits_f1"}:
- quadratic: the FZooS quadratic (d=50, 5 agents, div 0.5, F* in closed form), the same rounds for both
  methods and the same step rule (plain GD, same lr, T = H = 10), so only the gradient estimate differs.
  query_ratio = queries FedZO used to reach its final gap F−F* / queries FZooS used to reach that gap;
  surrogate_cosine = mean cosine between FZooS's GP mean gradient and the true ∇f_i at its iterates.
- digits_f1: 1 − macro-F1 through the int8 ONNX digits-mlp with its last layer fed as graph inputs,
  class-skewed shards (Dirichlet 0.5), the same total query budget for both; test-set macro-F1 of the
  resulting global head.
The objective's true value is used only to score rounds here; no strategy evaluates it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from coordinator.strategies import create as create_strategy
from coordinator.strategies.base import ClientResult, Strategy
from coordinator.zo_rff import rff_tensors, surrogate_grad
from edge_agent.learners import create as create_learner
from edge_agent.learners.base import Learner, LocalData, Task
from edge_agent.zo.objectives import (
    global_quadratic,
    macro_f1,
    quadratic_coeffs,
    quadratic_configs,
    quadratic_optimum,
)
from tools.benchio import emit

EMPTY = LocalData(np.zeros((0, 1), np.float32), np.zeros(0, np.int64))


@dataclass
class Trace:
    """Per round (index 0 = start): cumulative queries over all agents and the caller's score."""

    queries: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    metrics: list[dict[str, dict[str, float]]] = field(default_factory=list)  # per round: "agent/phase" -> metrics
    extra: list[float] = field(default_factory=list)


def run(strategy: Strategy, learners: dict[str, Learner], data: dict[str, LocalData], rounds: int, *,
        model: Any = None, score: Callable[[Strategy], float] | None = None,
        extra: Callable[[Strategy], float] | None = None, budget: int | None = None) -> Trace:
    """Run `rounds` rounds (or until the next round would pass `budget` total queries)."""
    agents = sorted(learners)
    trace = Trace()
    total = 0
    trace.queries.append(0)
    trace.score.append(float(score(strategy)) if score else float("nan"))
    for r in range(1, rounds + 1):
        per: dict[str, dict[str, float]] = {}
        for phase in range(strategy.phases):
            tasks = strategy.configure(r, phase, agents)
            results: list[ClientResult] = []
            for agent, spec in tasks.items():
                config = json.loads(json.dumps(spec.config))  # only what survives the wire
                tensors = {k: np.array(v, np.float32) for k, v in spec.tensors.items()}
                res = learners[agent].learn(Task("bench", r, strategy.name, config, tensors, phase=phase),
                                            data[agent], model)
                got = sorted((k, tuple(v.shape)) for k, v in res.tensors.items())
                if got != sorted((k, tuple(s)) for k, s in spec.expect):
                    raise ValueError(f"{agent} returned {got}, the task expects {spec.expect}")
                if not all(np.isfinite(v).all() for v in res.tensors.values()):
                    raise ValueError(f"{agent} returned non-finite tensors in round {r}.{phase}")
                total += int(res.metrics["queries"])
                per[f"{agent}/{phase}"] = dict(res.metrics)
                results.append(ClientResult(agent, {k: np.asarray(v, np.float32) for k, v in res.tensors.items()},
                                            res.samples, dict(res.metrics)))
            strategy.aggregate(r, phase, results)
        trace.metrics.append(per)
        trace.queries.append(total)
        trace.score.append(float(score(strategy)) if score else float("nan"))
        if extra is not None:
            trace.extra.append(float(extra(strategy)))
        if budget is not None and total + (total / r) > budget:
            break
    return trace


def queries_to_reach(trace: Trace, target: float) -> int | None:
    """Cumulative queries at the first recorded round whose score is <= target (None if never)."""
    for q, s in zip(trace.queries, trace.score):
        if s <= target:
            return q
    return None


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


# ---- the quadratic ---------------------------------------------------------------------------------

QUAD_FEDZO = {"lr": 0.1, "mu": 0.005, "directions": 20, "local_steps": 10}
QUAD_FZOOS = {"lr": 0.1, "optimizer": "sgd", "local_steps": 10, "gp_restarts": 2}


def quadratic_run(method: str, *, d: int, agents: int, div: float, rounds: int, seed: int,
                  overrides: dict[str, Any] | None = None) -> Trace:
    """One federated run on the FZooS quadratic; score = F(x_r) − F*."""
    c1, c2 = quadratic_coeffs(d, agents, div, seed)
    big = global_quadratic(c1, c2, np.ones(agents))
    _, f_star = quadratic_optimum(big)
    names = [f"agent-{i}" for i in range(agents)]
    x0 = np.random.Generator(np.random.PCG64(seed + 1)).uniform(0.0, 1.0, d)
    base = dict(QUAD_FEDZO if method == "fedzo" else QUAD_FZOOS)
    base.update(overrides or {})
    strategy = create_strategy(method, {"x": torch.from_numpy(x0)}, objective="quadratic", seed=seed,
                               agent_config=dict(zip(names, quadratic_configs(d, agents, div, seed))), **base)
    learners = {a: create_learner(method) for a in names}

    def gap(s: Strategy) -> float:
        return big(s.state["x"].double().numpy()) - f_star

    extra = None
    if method == "fzoos":  # cosine of the coordinator-side global surrogate ∇F̂ with ∇F at x_r
        m = int(base.get("rff_features", 10000))
        omega, b = rff_tensors(d, m, float(base.get("rff_lengthscale", 1.0)), int(base.get("rff_seed", 0)))

        def extra(s: Strategy) -> float:
            if s.nu_bar is None:
                return float("nan")
            x = s.state["x"].double()
            return _cos(surrogate_grad(x, s.nu_bar, omega, b).numpy(), big.grad(x.numpy()))

    return run(strategy, learners, {a: EMPTY for a in names}, rounds, score=gap, extra=extra)


def bench_quadratic(*, d: int, agents: int, div: float, rounds: int, seed: int,
                    fzoos_overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Trace]]:
    traces = {}
    times = {}
    for method, over in (("fedzo", None), ("fzoos", fzoos_overrides)):
        t0 = time.perf_counter()
        traces[method] = quadratic_run(method, d=d, agents=agents, div=div, rounds=rounds, seed=seed,
                                       overrides=over)
        times[method] = time.perf_counter() - t0
    fz, fo = traces["fedzo"], traces["fzoos"]
    target = fz.score[-1]
    q_fedzo = queries_to_reach(fz, target)
    q_fzoos = queries_to_reach(fo, target)
    gp_cos = [m["gp_cosine"] for per in fo.metrics for m in per.values() if "gp_cosine" in m]
    rff_cos = [m["rff_cosine"] for per in fo.metrics for m in per.values() if "rff_cosine" in m]
    glob = [c for c in fo.extra if np.isfinite(c)]
    # the same FZooS with the reference code's step rule (Adam, lr 0.01): small steps keep the iterate among
    # its own queries, which is where the GP gradient is most accurate
    t0 = time.perf_counter()
    adam = quadratic_run("fzoos", d=d, agents=agents, div=div, rounds=min(rounds, 3), seed=seed,
                         overrides={**(fzoos_overrides or {}), "optimizer": "adam", "lr": 0.01})
    times["fzoos_adam"] = time.perf_counter() - t0
    adam_cos = [m["gp_cosine"] for per in adam.metrics for m in per.values() if "gp_cosine" in m]
    out = {
        "d": d, "agents": agents, "div": div, "rounds": rounds,
        "queries_fedzo": fz.queries[-1], "queries_fzoos": fo.queries[-1],
        "gap_fedzo": fz.score[-1], "gap_fzoos": fo.score[-1],
        "query_ratio": (q_fedzo / q_fzoos) if q_fedzo and q_fzoos else None,
        "queries_to_fedzo_final_gap": {"fedzo": q_fedzo, "fzoos": q_fzoos},
        "queries_to_gap": {f"{g:g}": {m: queries_to_reach(t, g) for m, t in traces.items()}
                           for g in (1e-1, 1e-2, 1e-3, 1e-4)},
        "surrogate_cosine": float(np.mean(gp_cos)) if gp_cos else None,
        "surrogate_cosine_min": float(np.min(gp_cos)) if gp_cos else None,
        "surrogate_cosine_adam_lr0.01": float(np.mean(adam_cos)) if adam_cos else None,
        "rff_local_cosine": float(np.mean(rff_cos)) if rff_cos else None,
        "rff_global_cosine": float(np.mean(glob)) if glob else None,
        "curves": {m: {"queries": t.queries, "gap": t.score} for m, t in traces.items()},
        "seconds": times,
    }
    return out, traces


# ---- digits, macro-F1 through the int8 runtime ------------------------------------------------------

# step sizes from small sweeps at a 5,000-query budget (FedZO: mu in {0.3, 1, 3} x lr in {0.01, 0.03, 0.1, 0.3};
# FZooS: (lr, radius) in {(0.2, 0.05), (0.5, 0.05), (1, 0.05), (2, 0.1), (1, 0.3), (3, 0.3)})
DIGITS_FEDZO = {"lr": 0.3, "mu": 3.0, "directions": 20, "local_steps": 10}
DIGITS_FZOOS = {"lr": 1.0, "optimizer": "sgd", "local_steps": 10, "gp_restarts": 2, "explore_radius": 0.05,
                "init_radius": 0.05}


def digits_head(runtime: str, seed: int, quick: bool) -> tuple[Any, Any]:
    """The int8 digits-mlp with its last layer as graph inputs, on `runtime`; returns (RunnerHead, torch net)."""
    from edge_agent.runtime import open_runner
    from edge_agent.zo.problem import RunnerHead
    from models import zoo
    from models.export_onnx import HEAD_INPUTS

    net = zoo.train("digits-mlp", seed=seed, epochs=5 if quick else None)
    if runtime == "litert":
        from models.export_tflite import export_variants as tflite_variants

        blob = tflite_variants("digits-mlp", net, seed=seed)["tflite-int8-headinputs"]
    else:
        from models.export_onnx import export_variants as onnx_variants

        blob = onnx_variants("digits-mlp", net, seed=seed)["onnx-int8-headinputs"]
    runner = open_runner(blob, runtime=runtime, threads=1)
    return RunnerHead(runner, dict(zip(zoo.get("digits-mlp").head, HEAD_INPUTS))), net


def bench_digits(*, agents: int, budget: int, seed: int, quick: bool, runtime: str = "onnxruntime",
                 fzoos_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from coordinator.data import partition_dirichlet
    from models import zoo

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

    res: dict[str, Any] = {"runtime": runtime, "d": out_dim * in_dim + out_dim, "agents": agents}
    for method, base in (("fedzo", DIGITS_FEDZO), ("fzoos", {**DIGITS_FZOOS, **(fzoos_overrides or {})})):
        strategy = create_strategy(method, init, objective="macro_f1", zo_path="runtime", seed=seed, **base)
        learners = {a: create_learner(method) for a in names}
        t0 = time.perf_counter()
        tr = run(strategy, learners, data, 10_000, model=head, score=test_f1, budget=budget)
        res[f"{method}_f1"] = tr.score[-1]
        res[f"{method}_queries"] = tr.queries[-1]
        res[f"{method}_rounds"] = len(tr.queries) - 1
        res[f"{method}_seconds"] = time.perf_counter() - t0
        res[f"{method}_curve"] = {"queries": tr.queries, "f1": tr.score}
        res["start_f1"] = tr.score[0]
    res["queries"] = budget
    res["trained_head_f1"] = test_f1(create_strategy("fedzo", {k: v.detach() for k, v in net.state_dict().items()
                                                               if k in entry.head}))
    return res


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
    ax.set_title("FZooS quadratic: d=50, 5 agents, div 0.5")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedfleet bench zo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here (they are printed too)")
    ap.add_argument("--plot", help="PNG of F − F* against cumulative queries on the quadratic")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--rounds", type=int, default=20, help="rounds on the quadratic (both methods)")
    ap.add_argument("--budget", type=int, default=10000, help="total query budget on digits (both methods)")
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "litert", "both"],
                    help="runtime for the digits objective; 'both' adds a LiteRT run under digits_f1.by_runtime")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:  # one BLAS thread: the GP and RFF solves are small, and threads only contend on a busy machine
        from threadpoolctl import threadpool_limits

        limits: Any = threadpool_limits(1)
    except ImportError:  # pragma: no cover
        limits = None
    try:
        if args.quick:
            small = {"rff_features": 500, "local_steps": 3, "explore_candidates": 30, "refresh_candidates": 40,
                     "refresh_pick": 10}
            quad, traces = bench_quadratic(d=8, agents=3, div=0.5, rounds=2, seed=args.seed, fzoos_overrides=small)
            kw: dict[str, Any] = {"agents": 3, "budget": 600, "quick": True, "fzoos_overrides": small}
        else:
            quad, traces = bench_quadratic(d=50, agents=5, div=0.5, rounds=args.rounds, seed=args.seed)
            kw = {"agents": 5, "budget": args.budget, "quick": False}
        runtimes = ["onnxruntime", "litert"] if args.runtime == "both" else [args.runtime]
        by_rt = {rt: bench_digits(seed=args.seed, runtime=rt, **kw) for rt in runtimes}
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
