"""FedZO's coordinator side: send the global ZO tensors, add the sample-weighted mean of the agents' deltas.

Config (all optional): objective ("macro_f1" | "quadratic"), zo_tensors (names of the tensors to tune;
default every state tensor), zo_path ("numpy" | "runtime"), local_steps, lr, mu, directions, optimizer ("sgd" |
"adam"), basis ("sphere" | "orthonormal"), scale ("d" | "one": the FZooS reference's 1/mu FedZO), server_lr
(η_g, 1.0), seed, and agent_config {agent id: {extra task config}} (e.g. each agent's quadratic c1, c2).
The coordinator never evaluates the objective: there is no accept/reject oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fedfleet.coordinator.strategies._config import own
from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    layout_of,
    register,
    task_seed,
    to_numpy,
)

LEARNER_KEYS = ("objective", "zo_path", "local_steps", "lr", "mu", "directions", "optimizer", "basis", "scale")

# the zeroth-order methods tune the head's last layer (330 numbers) against 1 - macro-F1 on each shard, each
# query one call of the head graph (head tensors as graph inputs) in the agent's runtime on the int8
# backbone's cached features
ZO_TENSORS = ("fc1.weight", "fc1.bias")


@dataclass(frozen=True)
class Config:
    """FedZO's [method] fields (step sizes from the zeroth-order benchmark's sweeps)."""

    objective: Literal["macro_f1", "quadratic"] = "macro_f1"  # what the agents minimise (1 - macro-F1)
    zo_tensors: list[str] = field(default_factory=lambda: list(ZO_TENSORS))  # tensors tuned ([]: all)
    zo_path: Literal["numpy", "runtime"] = "runtime"  # queries in numpy or in the agent's runtime
    lr: float = 0.3  # local ZO step size
    mu: float = 3.0  # smoothing radius of the two-point estimates
    directions: int = 20  # random directions per estimate
    local_steps: int = 10  # local ZO steps per round
    optimizer: Literal["sgd", "adam"] = "sgd"  # the local update (adam: fresh each round; the FZooS reference's)
    basis: Literal["sphere", "orthonormal"] = "sphere"  # directions uniform on the sphere, or orthonormal
    scale: Literal["d", "one"] = "d"  # d/mu (the spec's estimator) or 1/mu (the FZooS reference's FedZO)
    server_lr: float = own(1.0)  # eta_g: scale of the averaged delta
    agent_config: dict[str, dict[str, Any]] = own(factory=dict)  # {agent id: extra task config}


def zo_names(strategy: Strategy) -> list[str]:
    names = strategy.config.get("zo_tensors") or list(strategy.state)
    missing = [n for n in names if n not in strategy.state]
    if missing:
        raise KeyError(f"zo_tensors {missing} are not in the global state {sorted(strategy.state)}")
    return list(names)


def agent_task_config(strategy: Strategy, keys: tuple[str, ...], round: int, phase: int, agent: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {k: strategy.config[k] for k in keys if k in strategy.config}
    cfg["zo_tensors"] = zo_names(strategy)
    cfg["seed"] = task_seed(int(strategy.config.get("seed", 0)), round, phase, agent)
    cfg.update((strategy.config.get("agent_config") or {}).get(agent, {}))
    return cfg


def weights_of(results: list[ClientResult]) -> torch.Tensor:
    w = torch.tensor([float(max(r.samples, 0)) for r in results], dtype=torch.float64)
    if float(w.sum()) <= 0:
        w = torch.ones(len(results), dtype=torch.float64)
    return w / w.sum()


@register
class FedZO(Strategy):
    name = "fedzo"
    phases = 1
    Config = Config
    learner = "fedzo"

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        down = to_numpy(self.state)
        expect = layout_of({n: self.state[n] for n in zo_names(self)})
        uplink = dict(self.config.get("uplink", {"name": "none"}))
        return {a: TaskSpec(config=agent_task_config(self, LEARNER_KEYS, round, phase, a), tensors=down,
                            expect=expect, uplink_codec=uplink) for a in agents}

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        if not results:
            return
        w = weights_of(results)
        lr = float(self.settings.server_lr)
        for name in zo_names(self):
            stack = torch.stack([torch.from_numpy(np.asarray(r.tensors[name], np.float64)) for r in results])
            self.state[name] += (lr * torch.tensordot(w, stack, dims=1)).float()
