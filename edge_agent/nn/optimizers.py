"""Local optimizers for the numpy learners: one `step(params, grads)` that updates params in place.

- `sgd` (the default): theta -= lr * (g + weight_decay * theta);
- `adam`: Adam (Kingma and Ba) with beta1 0.9, beta2 0.999, eps 1e-8 and bias correction, on
  g + weight_decay * theta (L2 weight decay in the gradient, not AdamW's decoupled form).

Each learner call makes a fresh optimizer, so Adam's moments start at zero every round: local Adam with the
state reset per round, the usual way to run FedAvg with a local Adam (nothing but the model crosses rounds).
Task config: `optimizer` ("sgd" | "adam"), `lr`, `weight_decay`. Numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError

Params = dict[str, np.ndarray]
NAMES = ("sgd", "adam")


class SGD:
    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.lr, self.wd = lr, weight_decay

    def step(self, params: Params, grads: Params) -> None:
        for k in params:
            params[k] -= self.lr * (grads[k] + self.wd * params[k])


class Adam:
    def __init__(self, lr: float, weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, beta1, beta2, eps
        self.t = 0
        self.m: Params = {}
        self.v: Params = {}

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        c1, c2 = 1.0 - self.b1**self.t, 1.0 - self.b2**self.t
        for k in params:
            g = grads[k] + self.wd * params[k] if self.wd else grads[k]
            m = self.m.get(k)
            if m is None:
                m = self.m[k] = np.zeros_like(params[k])
                self.v[k] = np.zeros_like(params[k])
            v = self.v[k]
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
            params[k] -= (self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)


def create(cfg: dict[str, Any]) -> SGD | Adam:
    """The optimizer a task config asks for (`optimizer`, default "sgd"), with its `lr` and `weight_decay`."""
    name = cfg.get("optimizer", "sgd")
    lr, wd = float(cfg.get("lr", 0.1)), float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return SGD(lr, wd)
    if name == "adam":
        return Adam(lr, wd)
    raise ConfigError(f"task field 'optimizer' must be one of {', '.join(NAMES)}, got {name!r}")
