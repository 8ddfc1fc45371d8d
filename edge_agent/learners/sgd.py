"""FedAvg's edge learner: local minibatch SGD on the trainable part, uploading the delta.

Task config: `lr` (0.1), `epochs` (1), `batch` (32), `seed` (the agent's own, from the strategy),
optional `weight_decay` (0); in a continual job, `continual` (see edge_agent.continual).
Task tensors: the global trainable tensors. Result tensors: local − global, same names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent import continual, mlp
from edge_agent.learners.base import Learner, LearnResult, LocalData, Task, register


@register
class SGDLearner(Learner):
    name = "fedavg"

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        # explicit and reproducible: the strategy gives each agent its own seed per round
        rng = np.random.default_rng([int(cfg.get("seed", 0)), task.round])
        feats = model.features(data.x, cache_key="local")
        params, losses = local_sgd(task.tensors, feats, data.y, cfg, rng,
                                   classes=continual.head_classes(cfg))  # a per-task head in a continual job
        delta = {k: params[k] - task.tensors[k] for k in params}
        return LearnResult(delta, len(data), {"loss": float(np.mean(losses)) if losses else 0.0})


def local_sgd(start: dict[str, np.ndarray], feats: np.ndarray, y: np.ndarray, cfg: dict[str, Any],
              rng: np.random.Generator, classes: Any = None) -> tuple[dict[str, np.ndarray], list[float]]:
    """`epochs` passes of shuffled minibatch SGD on (feats, y) from `start`; (final params, batch losses).
    Also used by learners that train the head on a different local set (GGEUR's augmented embeddings).
    `classes`: the output units of a per-task head (continual jobs), None for all."""
    lr, epochs, batch = float(cfg.get("lr", 0.1)), int(cfg.get("epochs", 1)), int(cfg.get("batch", 32))
    wd = float(cfg.get("weight_decay", 0.0))
    params = {k: v.astype(np.float32).copy() for k, v in start.items()}
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for begin in range(0, len(order), batch):
            idx = order[begin : begin + batch]
            value, grads = mlp.loss_and_grad(params, feats[idx], y[idx], classes)
            losses.append(value)
            for k in params:
                params[k] -= lr * (grads[k] + wd * params[k])
    return params, losses
