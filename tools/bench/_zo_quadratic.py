"""The FZooS quadratic for `fedfleet bench zo`: d-dimensional per-agent quadratics with heterogeneity `div`,
F* in closed form, FedZO against FZooS variants at the same rounds (see `fedfleet.tools.bench.zo`)."""

from __future__ import annotations

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

QUAD_FEDZO = {"lr": 0.1, "mu": 0.005, "directions": 20, "local_steps": 10}
# the spec's FZooS: Adam at lr 0.01, 20 GP restarts (the learner's defaults: M = 10000, radius 0.01, no ρ floor)
QUAD_FZOOS = {"lr": 0.01, "optimizer": "adam", "local_steps": 10, "gp_restarts": 20}
QUAD_FZOOS_GD = {"lr": 0.1, "optimizer": "sgd", "local_steps": 10, "gp_restarts": 2}  # the earlier headline
QUAD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedzo": ("fedzo", QUAD_FEDZO),
    "fzoos": ("fzoos", QUAD_FZOOS),
    "fzoos_gd": ("fzoos", QUAD_FZOOS_GD),
    "fzoos_rho_floor": ("fzoos", {**QUAD_FZOOS, "rho_floor": True}),
}


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


def _quad_job(job: tuple[str, str, dict[str, Any], dict[str, Any]]) -> tuple[str, Trace, float]:
    name, method, overrides, kw = job
    t0 = time.perf_counter()
    trace = quadratic_run(method, overrides=overrides, **kw)
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


def bench_quadratic(*, d: int, agents: int, div: float, rounds: int, seed: int,
                    fzoos_overrides: dict[str, Any] | None = None, jobs: int = 1,
                    variants: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Trace]]:
    kw = {"d": d, "agents": agents, "div": div, "rounds": rounds, "seed": seed}
    names = variants or list(QUAD_VARIANTS)
    work = [(n, QUAD_VARIANTS[n][0], {**QUAD_VARIANTS[n][1], **((fzoos_overrides or {}) if n != "fedzo" else {})},
             kw) for n in names]
    done = _pool_map(_quad_job, work, jobs)
    traces = {n: tr for n, tr, _ in done}
    times = {n: sec for n, _, sec in done}
    fz = traces["fedzo"]
    target = fz.score[-1]
    q_fedzo = queries_to_reach(fz, target)
    stats = {n: _fzoos_stats(tr, target, q_fedzo) for n, tr in traces.items() if n != "fedzo"}
    head = stats["fzoos"]
    out = {
        "d": d, "agents": agents, "div": div, "rounds": rounds,
        "queries_fedzo": fz.queries[-1], "queries_fzoos": head["queries"],
        "gap_fedzo": fz.score[-1], "gap_fzoos": head["gap"],
        "query_ratio": head["query_ratio"],
        "surrogate_cosine": head["surrogate_cosine"],
        "configs": {n: QUAD_VARIANTS[n][1] for n in names},
        "queries_to_fedzo_final_gap": {"fedzo": q_fedzo, **{n: v["queries_to_fedzo_final_gap"] for n, v in stats.items()}},
        "queries_to_gap": {f"{g:g}": {m: queries_to_reach(t, g) for m, t in traces.items()}
                           for g in (1e-1, 1e-2, 1e-3, 1e-4)},
        "variants": stats,
        "curves": {m: {"queries": t.queries, "gap": t.score} for m, t in traces.items()},
        "seconds": times,
    }
    return out, traces
