"""Drive a coordinator Strategy and one edge Learner per agent in one process, without a broker.

`inprocess_runner(strategy, agents, rounds, *, model=None, on_round=None)` runs configure -> learn ->
aggregate phase by phase, as the round engine does, with the same upload checks (layout and finiteness;
a refused upload is left out of the round). It is the fast twin of `fedfleet.tools.bench.mqtt_runner.mqtt_runner`, which
has the same signature and sends every task and result over a real broker; benchmarks take either as
their `runner`, and tests use this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedfleet.coordinator.strategies.base import ClientResult, Strategy
from fedfleet.edge_agent.errors import ProtocolError
from fedfleet.edge_agent.learners import Learner, LocalData, Task
from fedfleet.edge_agent.learners import create as create_learner

OnRound = Callable[[int, Strategy], None]
Runner = Callable[..., None]

__all__ = ["OnRound", "Runner", "check_upload", "inprocess_runner"]


def check_upload(agent: str, tensors: dict[str, np.ndarray], expect: list[tuple[str, tuple[int, ...]]]) -> None:
    """Refuse an upload whose tensors are not exactly the expected layout or hold non-finite values."""
    extra = set(tensors) - {name for name, _ in expect}
    if extra:
        raise ProtocolError("shape", f"{agent} uploaded tensors the task does not expect: {sorted(extra)[:5]}")
    for name, shape in expect:
        t = tensors.get(name)
        if t is None or tuple(t.shape) != tuple(shape):
            raise ProtocolError("shape", f"{agent} uploaded {name!r} with the wrong shape or not at all")
        if not np.all(np.isfinite(t)):
            raise ProtocolError("nonfinite", f"{agent} uploaded non-finite values in {name!r}")


def inprocess_runner(
    strategy: Strategy,
    agents: dict[str, LocalData],
    rounds: int,
    *,
    model: Any = None,
    on_round: OnRound | None = None,
) -> None:
    """Drive a strategy and one learner object per agent without a broker, phase by phase.

    The learner an agent runs is `config["learner"]` (default: the strategy's name). Uploads are checked
    against the TaskSpec's `expect` layout and for finiteness, as the engine does; a refused upload
    is left out of the round (the engine records it as rejected and goes on).
    """
    learners: dict[tuple[str, str], Learner] = {}
    names = list(agents)
    rejected = [0]
    for r in range(rounds):
        for phase in range(strategy.phases):
            specs = strategy.configure(r, phase, names)
            results = []
            for agent, spec in specs.items():
                method = str(spec.config.get("learner", strategy.name))
                learner = learners.get((agent, method))
                if learner is None:
                    learner = learners[(agent, method)] = create_learner(method)
                task = Task(run="bench", round=r, method=method, config=spec.config, tensors=spec.tensors, phase=phase)
                with np.errstate(all="ignore"):  # a diverged model overflows; the check below refuses it
                    out = learner.learn(task, agents[agent], model)
                try:
                    check_upload(agent, out.tensors, spec.expect)
                except ProtocolError:
                    rejected[0] += 1
                    continue  # refused like the engine does: the round goes on without it
                results.append(ClientResult(agent, out.tensors, out.samples, out.metrics))
            strategy.aggregate(r, phase, results)
        if on_round is not None:
            on_round(r, strategy)


