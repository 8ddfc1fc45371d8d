"""MoNNA's edge side: Polyak momentum with dampening = beta, then a half step; uploads the model.

Per task (one step t): take the model theta sent by the coordinator (this node's own mixed model), draw a
minibatch, g = grad[NLL(theta; B) + lambda * |theta|_2] (the norm, NOT squared: its gradient is
lambda * theta / |theta|; the config calls lambda `norm_penalty`, because it is not weight decay),
m <- beta * m + (1 - beta) * g, and upload theta+ = theta - lr * m. The momentum m stays on this learner
between tasks.

With `flip_grad` set (the omniscient label-flip experiment only), the node also uploads "flip.<name>":
grad NLL(theta; the same batch with labels y -> C - 1 - y), which the coordinator averages over the honest
nodes for the spec's label-flip attack (mu - gamma_t * mean_i of these gradients).

Task config: lr, beta, norm_penalty (lambda), batch, seed, flip_grad.
Task tensors: the trainable tensors (fedfleet.edge_agent.nn.mlp names). Numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners._inputs import features, flipped_labels, minibatch, params_from, task_rng
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, Tensors, register
from fedfleet.edge_agent.nn import mlp


def norm_penalty_grad(params: Tensors, lam: float) -> Tensors:
    """Gradient of lam * |theta|_2 over all tensors jointly (zero at theta = 0)."""
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in params.values())))
    if lam == 0.0 or norm == 0.0:
        return {k: np.zeros_like(v) for k, v in params.items()}
    return {k: (lam / norm * v).astype(np.float32) for k, v in params.items()}


@register
class MonnaLearner(Learner):
    name = "monna"

    def __init__(self) -> None:
        self.momentum: Tensors | None = None

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        if "weight_decay" in cfg:
            raise ConfigError("monna: 'weight_decay' is now 'norm_penalty' (lambda of the unsquared |theta|_2 term)")
        lr = float(cfg["lr"])
        beta = float(cfg.get("beta", 0.9))
        lam = float(cfg.get("norm_penalty", 0.0))
        batch = int(cfg.get("batch", 16))
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"monna: beta must be in [0, 1), got {beta}")
        theta = params_from(task)
        if self.momentum is None or any(
            k not in self.momentum or self.momentum[k].shape != v.shape for k, v in theta.items()
        ):
            self.momentum = {k: np.zeros_like(v) for k, v in theta.items()}
        x = features(model, data, "train")
        idx = minibatch(task_rng(task), len(data), batch)
        loss, grads = mlp.loss_and_grad(theta, x[idx], data.y[idx])
        out: Tensors = {}
        if cfg.get("flip_grad"):
            _, flip = mlp.loss_and_grad(theta, x[idx], flipped_labels(theta, data.y[idx]))
            out = {f"flip.{k}": v.astype(np.float32) for k, v in flip.items()}
        reg = norm_penalty_grad(theta, lam)
        for k in theta:
            g = grads[k] + reg[k]
            self.momentum[k] = (beta * self.momentum[k] + (1.0 - beta) * g).astype(np.float32)
            theta[k] = theta[k] - lr * self.momentum[k]
        return LearnResult(
            tensors={**theta, **out},
            samples=len(data),
            metrics={"loss": float(loss), "grad_evals": float(len(idx))},  # training only, not the attack hook
        )
