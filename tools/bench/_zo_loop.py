"""The zeroth-order benchmark's round loop: strategies and learners driven in one process (configure, tasks
with float32 tensors and JSON config, shape and finiteness checks, aggregate), with a query count and a score
per round. It serves objectives that have no model package (the FZooS quadratic) and budgeted query
comparisons; the runs through the real engine and agents are the method tests over MQTT.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.coordinator.strategies.base import ClientResult, Strategy
from fedfleet.edge_agent.learners.base import Learner, LocalData, Task

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
        extra: Callable[[Strategy], float] | None = None, budget: int | None = None,
        stop_at: float | None = None) -> Trace:
    """Run `rounds` rounds (or until the next round would pass `budget` total queries, or the score is <= `stop_at`)."""
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
        if stop_at is not None and trace.score[-1] <= stop_at:
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


def _one_thread() -> None:
    import torch as _torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    _torch.set_num_threads(1)


def _pool_map(fn: Callable[[Any], Any], jobs: list[Any], workers: int) -> list[Any]:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread) as pool:
        return list(pool.map(fn, jobs))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
