"""MoNNA's edge side: Polyak momentum with dampening = beta, then a half step; uploads the model.

Per task (one step t): take the model theta sent by the coordinator (this node's own mixed model), draw a
minibatch, g = grad[NLL(theta; B) + lambda * |theta|_2] (the norm, NOT squared: its gradient is
lambda * theta / |theta|), m <- beta * m + (1 - beta) * g, and upload theta+ = theta - lr * m.
The momentum m stays on this learner between tasks. `local_steps > 1` repeats the step (robust FedAvg
uses this as its local SGD); MoNNA itself uses one.

Task config: lr, beta, weight_decay (lambda), batch, seed, local_steps (default 1).
Task tensors: the trainable tensors (edge_agent.mlp names). Numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent import mlp
from edge_agent.errors import ConfigError
from edge_agent.learners.base import Learner, LearnResult, LocalData, Task, Tensors, register


def features(model: Any, data: LocalData, key: str) -> np.ndarray:
    """The trainable part's input: `model.features(x, key)` when the agent has a model, else raw x."""
    if model is not None and hasattr(model, "features"):
        return np.asarray(model.features(data.x, key), dtype=np.float32)
    return np.asarray(data.x, dtype=np.float32).reshape(len(data), -1)


def task_rng(task: Task, salt: int = 0) -> np.random.Generator:
    """The agent's Generator for this task: PCG64 seeded by (config seed, round, salt)."""
    return np.random.Generator(np.random.PCG64([int(task.config.get("seed", 0)), int(task.round), salt]))


def params_from(task: Task, prefix: str = "") -> Tensors:
    """Separate float32 copies of the trainable tensors named `prefix + name` in the task."""
    out = {k[len(prefix) :]: np.array(v, dtype=np.float32, copy=True) for k, v in task.tensors.items() if k.startswith(prefix)}
    if not any(k.endswith(".weight") for k in out):
        raise ConfigError(f"task for {task.method!r} carries no trainable tensors with prefix {prefix!r}")
    return out


def l2_norm_grad(params: Tensors, lam: float) -> Tensors:
    """Gradient of lam * |theta|_2 over all tensors jointly (zero at theta = 0)."""
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in params.values())))
    if lam == 0.0 or norm == 0.0:
        return {k: np.zeros_like(v) for k, v in params.items()}
    return {k: (lam / norm * v).astype(np.float32) for k, v in params.items()}


def minibatch(rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
    if n == 0:
        raise ConfigError("this agent has no local samples; give it data or leave it out of the run")
    return rng.choice(n, size=min(batch, n), replace=False)


@register
class MonnaLearner(Learner):
    name = "monna"

    def __init__(self) -> None:
        self.momentum: Tensors | None = None

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        lr = float(cfg["lr"])
        beta = float(cfg.get("beta", 0.9))
        lam = float(cfg.get("weight_decay", 0.0))
        batch = int(cfg.get("batch", 16))
        steps = int(cfg.get("local_steps", 1))
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"monna: beta must be in [0, 1), got {beta}")
        theta = params_from(task)
        if cfg.get("reset_momentum") or self.momentum is None or any(
            k not in self.momentum or self.momentum[k].shape != v.shape for k, v in theta.items()
        ):
            self.momentum = {k: np.zeros_like(v) for k, v in theta.items()}
        x = features(model, data, "train")
        rng = task_rng(task)
        losses = []
        for _ in range(steps):
            idx = minibatch(rng, len(data), batch)
            loss, grads = mlp.loss_and_grad(theta, x[idx], data.y[idx])
            reg = l2_norm_grad(theta, lam)
            for k in theta:
                g = grads[k] + reg[k]
                self.momentum[k] = (beta * self.momentum[k] + (1.0 - beta) * g).astype(np.float32)
                theta[k] = theta[k] - lr * self.momentum[k]
            losses.append(loss)
        return LearnResult(
            tensors=theta,
            samples=len(data),
            metrics={"loss": float(np.mean(losses)), "grad_evals": float(steps * min(batch, len(data)))},
        )
