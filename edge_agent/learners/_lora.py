"""The edge learner of the federated LoRA methods (FedIT, FLoRA, LoRA-FAIR): local SGD on the adapters and
the head of a `lora` model package, the frozen base untouched.

The three methods differ only on the coordinator, so they share this learner; each method's module
(`fedit`, `flora`, `lora_fair`) registers it under the method's name. The "_" keeps this module off the list.
Task tensors: the trainable layout (`fc{i}.lora_A`, `fc{i}.lora_B`, the head) and, for FLoRA, the merged
residuals `fc{i}.merged` (held fixed). Task config: `lr` (0.01), `epochs` (1), `batch` (128), `seed`,
optional `weight_decay` (0). Result tensors: the locally trained A_k, B_k and head (values, not deltas).
Forward and backward are `fedfleet.edge_agent.nn.lora` (G_B = s·δ(Ax)ᵀ, G_A = s·Bᵀδxᵀ).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task
from fedfleet.edge_agent.nn import lora


class LoraLearner(Learner):
    name = "lora"

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        base = getattr(model, "lora", None)
        if base is None:
            raise ModelError(f"method {task.method!r} trains LoRA adapters: it needs a model package in mode 'lora'")
        cfg = task.config
        lr, epochs, batch = float(cfg.get("lr", 0.01)), int(cfg.get("epochs", 1)), int(cfg.get("batch", 128))
        wd = float(cfg.get("weight_decay", 0.0))
        rng = np.random.default_rng([int(cfg.get("seed", 0)), task.round])
        feats = model.features(data.x, cache_key="local")
        params = {k: np.array(v, np.float32) for k, v in task.tensors.items()}
        trained = [n for n, _ in model.head_layout]
        losses = []
        for _ in range(epochs):
            order = rng.permutation(len(data))
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                value, grads = lora.loss_and_grad(base, params, feats[idx], data.y[idx])
                losses.append(value)
                for k in trained:
                    params[k] -= lr * (grads[k] + wd * params[k])
        return LearnResult({k: params[k] for k in trained}, len(data),
                           {"loss": float(np.mean(losses)) if losses else 0.0})
