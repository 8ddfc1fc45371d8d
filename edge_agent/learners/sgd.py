"""The one plain-SGD edge learner (FedAvg's, and robust FedAvg's): local minibatch SGD on the trainable
part, uploading the delta local - global.

Two schedules:
- `epochs` (default 1): passes over the local set in a seeded shuffle, batches of `batch` (FedAvg);
- `local_steps` (when set): that many steps, each on a fresh minibatch of `batch` distinct samples drawn
  with the task's PCG64 Generator (robust FedAvg, and FedAvg in `fedfleet bench fedamd`).

`weight_decay` is weight decay: the gradient gains weight_decay * theta (the squared L2 penalty
weight_decay / 2 * |theta|^2). With `flip_grad` set (the omniscient label-flip experiment only), the
result also carries "flip.<name>", the gradient at the received model on the first batch with labels
y -> C - 1 - y.

Task config: `lr` (0.1), `epochs` (1) or `local_steps`, `batch` (32), `seed` (the agent's own, from the
strategy), `weight_decay` (0), `flip_grad`.
Task tensors: the global trainable tensors. Result tensors: local − global, same names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent import mlp
from edge_agent.learners._inputs import features, flipped_labels, minibatch, task_rng
from edge_agent.learners.base import Learner, LearnResult, LocalData, Task, Tensors, register


def _batches(task: Task, n: int, batch: int) -> list[np.ndarray]:
    cfg = task.config
    if cfg.get("local_steps") is not None:
        rng = task_rng(task)
        return [minibatch(rng, n, batch) for _ in range(int(cfg["local_steps"]))]
    # explicit and reproducible: the strategy gives each agent its own seed per round
    rng = np.random.default_rng([int(cfg.get("seed", 0)), task.round])
    out = []
    for _ in range(int(cfg.get("epochs", 1))):
        order = rng.permutation(n)
        out.extend(order[start : start + batch] for start in range(0, n, batch))
    return out


@register
class SGDLearner(Learner):
    name = "fedavg"

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        lr, batch = float(cfg.get("lr", 0.1)), int(cfg.get("batch", 32))
        wd = float(cfg.get("weight_decay", 0.0))
        feats = features(model, data, "local")
        start = {k: np.asarray(v, np.float32) for k, v in task.tensors.items()}
        params = {k: v.copy() for k, v in start.items()}
        extra: Tensors = {}
        losses = []
        for i, idx in enumerate(_batches(task, len(data), batch)):
            if i == 0 and cfg.get("flip_grad"):
                _, flip = mlp.loss_and_grad(params, feats[idx], flipped_labels(params, data.y[idx]))
                extra = {f"flip.{k}": v.astype(np.float32) for k, v in flip.items()}
            value, grads = mlp.loss_and_grad(params, feats[idx], data.y[idx])
            losses.append(value)
            for k in params:
                params[k] -= lr * (grads[k] + wd * params[k])
        delta = {k: params[k] - start[k] for k in params}
        return LearnResult({**delta, **extra}, len(data), {"loss": float(np.mean(losses)) if losses else 0.0})
