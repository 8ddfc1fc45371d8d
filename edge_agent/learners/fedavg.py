"""The one plain-SGD edge learner (FedAvg's, and robust FedAvg's): local minibatch SGD on the trainable
part, uploading the delta local - global.

The loss is the one the model package declares (`fedfleet.edge_agent.nn.losses`: classification by default, the
denoising loss of a diffusion package), and the step is `optimizer` ("sgd", the default, or "adam" with its
moments fresh each round; `fedfleet.edge_agent.nn.optimizers`). The moving-digits diffusion task trains with local Adam.

Two schedules:
- `epochs` (default 1): passes over the local set in a seeded shuffle, batches of `batch` (FedAvg);
- `local_steps` (when set): that many steps, each on a fresh minibatch of `batch` distinct samples drawn
  with the task's PCG64 Generator (robust FedAvg, and FedAvg in `fedfleet bench fedamd`).

`weight_decay` is weight decay: the gradient gains weight_decay * theta (the squared L2 penalty
weight_decay / 2 * |theta|^2). With `flip_grad` set (the omniscient label-flip experiment only), the
result also carries "flip.<name>", the gradient at the received model on the first batch with labels
y -> C - 1 - y. In a continual job with per-task heads, `continual` names the task's output units
(fedfleet.edge_agent.continual).

Task config: `lr` (0.1), `epochs` (1) or `local_steps`, `batch` (32), `seed` (the agent's own, from the
strategy), `weight_decay` (0), `optimizer` ("sgd"), `flip_grad`, `continual`.

`local_sgd` and `sgd_steps` are the same loop for learners that train on another local set (GGEUR's
augmented embeddings).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent import continual
from fedfleet.edge_agent.learners._inputs import features, flipped_labels, minibatch, task_rng
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, Tensors, register
from fedfleet.edge_agent.nn import losses as objectives
from fedfleet.edge_agent.nn import mlp, optimizers


def _batches(task: Task, n: int, batch: int) -> list[np.ndarray]:
    cfg = task.config
    if cfg.get("local_steps") is not None:
        rng = task_rng(task)
        return [minibatch(rng, n, batch) for _ in range(int(cfg["local_steps"]))]
    # explicit and reproducible: the strategy gives each agent its own seed per round
    return epoch_batches(np.random.default_rng([int(cfg.get("seed", 0)), task.round]), n, batch,
                         int(cfg.get("epochs", 1)))


def epoch_batches(rng: np.random.Generator, n: int, batch: int, epochs: int) -> list[np.ndarray]:
    out = []
    for _ in range(epochs):
        order = rng.permutation(n)
        out.extend(order[start : start + batch] for start in range(0, n, batch))
    return out


def sgd_steps(start: dict[str, np.ndarray], feats: np.ndarray, y: np.ndarray, batches: list[np.ndarray],
              cfg: dict[str, Any], classes: Any = None,
              loss: objectives.Loss | None = None) -> tuple[dict[str, np.ndarray], list[float]]:
    """Minibatch steps of `cfg`'s optimizer (SGD by default) from `start` over `batches` of (feats, y), on
    `loss` (default: classification over `classes`); (final params, batch losses)."""
    loss = loss or objectives.classification(classes)
    opt = optimizers.create(cfg)
    params = {k: np.asarray(v, np.float32).copy() for k, v in start.items()}
    losses = []
    for idx in batches:
        value, grads = loss(params, feats[idx], y[idx])
        losses.append(value)
        opt.step(params, grads)
    return params, losses


def local_sgd(start: dict[str, np.ndarray], feats: np.ndarray, y: np.ndarray, cfg: dict[str, Any],
              rng: np.random.Generator, classes: Any = None) -> tuple[dict[str, np.ndarray], list[float]]:
    """`epochs` passes of shuffled minibatch SGD on (feats, y) from `start`; (final params, batch losses)."""
    batches = epoch_batches(rng, len(y), int(cfg.get("batch", 32)), int(cfg.get("epochs", 1)))
    return sgd_steps(start, feats, y, batches, cfg, classes)


@register
class SGDLearner(Learner):
    name = "fedavg"

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        feats = features(model, data, "local")
        start = {k: np.asarray(v, np.float32) for k, v in task.tensors.items()}
        batches = _batches(task, len(data), int(cfg.get("batch", 32)))
        extra: Tensors = {}
        if batches and cfg.get("flip_grad"):
            idx = batches[0]
            _, flip = mlp.loss_and_grad(start, feats[idx], flipped_labels(start, data.y[idx]))
            extra = {f"flip.{k}": v.astype(np.float32) for k, v in flip.items()}
        loss = objectives.for_model(model, task_rng(task, salt=1),
                                    classes=continual.head_classes(cfg))  # a per-task head in a continual job
        params, losses = sgd_steps(start, feats, data.y, batches, cfg, loss=loss)
        delta = {k: params[k] - start[k] for k in params}
        return LearnResult({**delta, **extra}, len(data), {"loss": float(np.mean(losses)) if losses else 0.0})
