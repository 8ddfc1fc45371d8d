"""The FZooS quadratic for `fedfleet bench zo`: d-dimensional per-agent quadratics with heterogeneity `div`,
F* in closed form, FedZO against FZooS variants at the same rounds (see `fedfleet.tools.bench.zo`)."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies._zo_rff import rff_tensors, surrogate_grad
from fedfleet.coordinator.strategies.base import Strategy
from fedfleet.edge_agent.learners import create as create_learner
from fedfleet.edge_agent.zo.objectives import (
    global_quadratic,
    quadratic_coeffs,
    quadratic_configs,
    quadratic_optimum,
)
from fedfleet.tools.bench._zo_loop import EMPTY, Trace, _cos, _mean, _pool_map, queries_to_reach, run

QUAD_FEDZO = {"lr": 0.1, "mu": 0.005, "directions": 20, "local_steps": 10}  # the spec's dense FedZO (plain GD)
# FedZO in the FZooS reference code's configuration: Adam at lr 0.01, q = 20 orthonormal directions, mu 0.01,
# the (1/q) Σ [f(x + mu u) − f(x)]/mu u estimate
QUAD_FEDZO_ADAM = {"lr": 0.01, "mu": 0.01, "directions": 20, "local_steps": 10, "optimizer": "adam",
                   "basis": "orthonormal", "scale": "one"}
# the spec's FZooS: Adam at lr 0.01, 20 GP restarts (the learner's defaults: M = 10000, radius 0.01, no ρ floor)
QUAD_FZOOS = {"lr": 0.01, "optimizer": "adam", "local_steps": 10, "gp_restarts": 20}
QUAD_FZOOS_GD = {"lr": 0.1, "optimizer": "sgd", "local_steps": 10, "gp_restarts": 2}  # the earlier headline
QUAD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedzo": ("fedzo", QUAD_FEDZO),
    "fedzo_adam": ("fedzo", QUAD_FEDZO_ADAM),
    "fzoos": ("fzoos", QUAD_FZOOS),
    "fzoos_gd": ("fzoos", QUAD_FZOOS_GD),
    "fzoos_rho_floor": ("fzoos", {**QUAD_FZOOS, "rho_floor": True}),
}


def quadratic_run(method: str, *, d: int, agents: int, div: float, rounds: int, seed: int,
                  overrides: dict[str, Any] | None = None, stop_at: float | None = None) -> Trace:
    """One federated run on the FZooS quadratic; score = F(x_r) − F*."""
    c1, c2 = quadratic_coeffs(d, agents, div, seed)
    big = global_quadratic(c1, c2, np.ones(agents))
    _, f_star = quadratic_optimum(big)
    names = [f"agent-{i}" for i in range(agents)]
    x0 = np.random.Generator(np.random.PCG64(seed + 1)).uniform(0.0, 1.0, d)
    base = dict(QUAD_FEDZO if method == "fedzo" else QUAD_FZOOS)  # overrides carry a variant's whole config
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

    return run(strategy, learners, {a: EMPTY for a in names}, rounds, score=gap, extra=extra, stop_at=stop_at)


def _quad_job(job: tuple[str, str, dict[str, Any], dict[str, Any], float | None]) -> tuple[str, Trace, float]:
    name, method, overrides, kw, stop_at = job
    t0 = time.perf_counter()
    trace = quadratic_run(method, overrides=overrides, stop_at=stop_at, **kw)
    print(f"quadratic {name}: gap {trace.score[-1]:.3g} after {len(trace.queries) - 1} rounds, "
          f"{trace.queries[-1]} queries, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return name, trace, time.perf_counter() - t0


def _fzoos_stats(tr: Trace, target: float, q_fedzo: int | None) -> dict[str, Any]:
    q = queries_to_reach(tr, target)
    per = [m for r in tr.metrics for m in r.values()]
    gp_cos = [m["gp_cosine"] for m in per if "gp_cosine" in m]
    rho = [m["rho_given"] for m in per if "rho_given" in m]
    glob = [c for c in tr.extra if np.isfinite(c)]
    return {
        "queries": tr.queries[-1], "gap": tr.score[-1], "queries_to_fedzo_final_gap": q,
        "query_ratio": (q_fedzo / q) if q_fedzo and q else None,
        "surrogate_cosine": float(np.mean(gp_cos)) if gp_cos else None,
        "surrogate_cosine_min": float(np.min(gp_cos)) if gp_cos else None,
        "rff_local_cosine": _mean([m["rff_cosine"] for m in per if "rff_cosine" in m]),
        "rff_global_cosine": _mean(glob),
        "rho_mean": _mean(rho),
        "rho_below_explore_radius": _mean([float(r < 0.01) for r in rho]),
        "gp_lengthscale": _mean([m["gp_lengthscale"] for m in per if "gp_lengthscale" in m]),
    }


# the two pairings of the headline, each (FedZO variant, FZooS variant) on the same optimiser
PAIRS = {"adam": ("fedzo_adam", "fzoos"), "gd": ("fedzo", "fzoos_gd")}
TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)


def _pair(traces: dict[str, Trace], fedzo: str, fzoos: str, target: float) -> dict[str, Any]:
    """Queries each method needs to reach F − F* <= target, and FedZO's / FZooS's. When FedZO never reaches
    it, the ratio is a lower bound (FedZO's total queries over FZooS's) and `ratio_is_lower_bound` says so."""
    qa, qb = queries_to_reach(traces[fedzo], target), queries_to_reach(traces[fzoos], target)
    bound = qa is None and qb is not None
    ratio = (qa / qb) if qa and qb else (traces[fedzo].queries[-1] / qb if bound and qb else None)
    return {"fedzo": fedzo, "fzoos": fzoos, "queries_fedzo": qa, "queries_fzoos": qb,
            "ratio": ratio, "ratio_is_lower_bound": bound,
            "final_gap_fedzo": traces[fedzo].score[-1], "final_gap_fzoos": traces[fzoos].score[-1],
            "total_queries_fedzo": traces[fedzo].queries[-1], "total_queries_fzoos": traces[fzoos].queries[-1]}


def bench_quadratic(*, d: int, agents: int, div: float, rounds: int, seed: int,
                    fzoos_overrides: dict[str, Any] | None = None, jobs: int = 1,
                    variants: list[str] | None = None, target: float = 1e-3) -> tuple[dict[str, Any], dict[str, Trace]]:
    kw = {"d": d, "agents": agents, "div": div, "rounds": rounds, "seed": seed}
    names = variants or [n for pair in PAIRS.values() for n in pair]
    work = [(n, QUAD_VARIANTS[n][0], {**QUAD_VARIANTS[n][1],
                                      **((fzoos_overrides or {}) if QUAD_VARIANTS[n][0] == "fzoos" else {})},
             kw, target) for n in names]
    for _, _, cfg, _, _ in work:  # at most d orthonormal directions (only the tiny smoke run has d < 20)
        if cfg.get("basis") == "orthonormal":
            cfg["directions"] = min(int(cfg["directions"]), d)
    done = _pool_map(_quad_job, work, jobs)
    traces = {n: tr for n, tr, _ in done}
    times = {n: sec for n, _, sec in done}
    pairs = {p: {f"{g:g}": _pair(traces, a, b, g) for g in sorted({*TARGETS, target}, reverse=True)}
             for p, (a, b) in PAIRS.items()
             if a in traces and b in traces}
    stats = {n: _fzoos_stats(tr, target, queries_to_reach(traces[PAIRS["adam"][0]], target)
                             if PAIRS["adam"][0] in traces else None)
             for n, tr in traces.items() if QUAD_VARIANTS[n][0] == "fzoos"}
    out: dict[str, Any] = {"d": d, "agents": agents, "div": div, "rounds": rounds, "target_gap": target}
    for p, by_target in pairs.items():
        head = by_target[f"{target:g}"]
        out[f"query_ratio_{p}"] = head["ratio"]
        out[f"query_ratio_{p}_is_lower_bound"] = head["ratio_is_lower_bound"]
        out[f"queries_to_target_{p}"] = {"fedzo": head["queries_fedzo"], "fzoos": head["queries_fzoos"]}
    out.update({
        "surrogate_cosine": stats["fzoos"]["surrogate_cosine"] if "fzoos" in stats else None,
        "pairs": pairs,
        "configs": {n: QUAD_VARIANTS[n][1] for n in names},
        "queries_to_gap": {f"{g:g}": {m: queries_to_reach(t, g) for m, t in traces.items()} for g in TARGETS},
        "final_gap": {m: t.score[-1] for m, t in traces.items()},
        "variants": stats,
        "curves": {m: {"queries": t.queries, "gap": t.score} for m, t in traces.items()},
        "seconds": times,
    })
    return out, traces
