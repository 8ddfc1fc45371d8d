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
        lr, epochs, batch = float(cfg.get("lr", 0.1)), int(cfg.get("epochs", 1)), int(cfg.get("batch", 32))
        wd = float(cfg.get("weight_decay", 0.0))
        # explicit and reproducible: the strategy gives each agent its own seed per round
        rng = np.random.default_rng([int(cfg.get("seed", 0)), task.round])
        feats = model.features(data.x, cache_key="local")
        params = {k: v.astype(np.float32).copy() for k, v in task.tensors.items()}
        classes = continual.head_classes(cfg)  # a per-task head in a continual job, else None
        losses = []
        for _ in range(epochs):
            order = rng.permutation(len(data))
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                value, grads = mlp.loss_and_grad(params, feats[idx], data.y[idx], classes)
                losses.append(value)
                for k in params:
                    params[k] -= lr * (grads[k] + wd * params[k])
        delta = {k: params[k] - task.tensors[k] for k in params}
        return LearnResult(delta, len(data), {"loss": float(np.mean(losses)) if losses else 0.0})
