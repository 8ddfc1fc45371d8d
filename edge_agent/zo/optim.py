"""First-order update rules for ZO learners on a flat float64 vector: plain SGD and Adam."""

from __future__ import annotations

import numpy as np

from fedfleet.edge_agent.errors import ConfigError


class SGD:
    def __init__(self, lr: float):
        self.lr = lr

    def step(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x - self.lr * g


class Adam:
    """Adam with bias correction; state starts fresh at construction (FZooS resets it every round)."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, beta1, beta2, eps
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self.t = 0

    def step(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        if self.m is None or self.v is None:
            self.m, self.v = np.zeros_like(g), np.zeros_like(g)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        mh = self.m / (1 - self.b1**self.t)
        vh = self.v / (1 - self.b2**self.t)
        return x - self.lr * mh / (np.sqrt(vh) + self.eps)


def make(name: str, lr: float) -> SGD | Adam:
    if name == "sgd":
        return SGD(lr)
    if name == "adam":
        return Adam(lr)
    raise ConfigError(f"unknown optimiser {name!r}; use 'sgd' or 'adam'")
