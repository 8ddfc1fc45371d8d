"""The edge-side learner interface: a task plus local data plus the model becomes a result.

Every method has one module in `fedfleet.edge_agent.learners` that defines a `Learner` subclass and registers
it by name with `@register`. Learners are pure numpy; they never import torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Tensors = dict[str, np.ndarray]


@dataclass
class LocalData:
    """An agent's local shard. `x` is the raw model input (N, ...) float32, `y` int64 labels (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Task:
    """One unit of work sent by the coordinator to one agent.

    `tensors` are the tensors the strategy sent down (the global head, a bullseye, RFF weights, ...).
    `config` holds the method's hyper-parameters (lr, epochs, batch, seed, role, ...).
    """

    run: str
    round: int
    method: str
    config: dict[str, Any]
    tensors: Tensors
    phase: int = 0
    deadline: float = 0.0  # unix time; 0 means none


@dataclass
class LearnResult:
    """What a learner hands back for upload. `tensors` must match the layout the strategy expects."""

    tensors: Tensors
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Learner(ABC):
    """One edge-side method. A learner may keep state across rounds (momentum, error feedback)."""

    name: str = ""

    @abstractmethod
    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        """Run the local work of one task. `model` is the agent's `fedfleet.edge_agent.model.EdgeModel`."""


_REGISTRY: dict[str, type[Learner]] = {}


def register(cls: type[Learner]) -> type[Learner]:
    """Class decorator: make a learner available by its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Learner]]:
    return dict(_REGISTRY)
