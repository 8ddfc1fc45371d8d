"""What a learner reads from its task and its local data, shared by every learner that trains a numpy MLP.

- `params_from`: separate float32 copies of the trainable tensors in a task (optionally under a prefix);
- `features`: the trainable part's input for the local samples (the backbone's cached features when the
  agent has a model package, else the raw samples);
- `task_rng`: the agent's Generator for one task, PCG64 seeded by (config seed, round, salt);
- `minibatch`: one batch of distinct local indices;
- `flipped_labels`: the label-flip attack's labels y -> C - 1 - y.

Numpy only. The module name starts with "_" so the registry does not take it for a method.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners.base import LocalData, Task, Tensors

__all__ = ["features", "flipped_labels", "minibatch", "params_from", "task_rng"]


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


def minibatch(rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
    if n == 0:
        raise ConfigError("this agent has no local samples; give it data or leave it out of the run")
    return rng.choice(n, size=min(batch, n), replace=False)


def flipped_labels(params: Tensors, y: np.ndarray) -> np.ndarray:
    """Labels y -> C - 1 - y, with C the width of the MLP's last layer (the label-flip attack's labels)."""
    last = max(int(k[2:].split(".")[0]) for k in params if k.startswith("fc") and k.endswith(".bias"))
    classes = int(params[f"fc{last}.bias"].shape[0])
    return (classes - 1 - np.asarray(y)).astype(np.int64)
