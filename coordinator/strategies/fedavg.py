"""FedAvg: every selected agent runs local SGD from the global tensors; the server adds the
sample-weighted mean of the deltas, scaled by `server_lr` (1.0)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedfleet.coordinator.strategies._config import FEDZIP_UPLINK, own
from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    layout_of,
    register,
    task_seed,
    to_numpy,
)


@dataclass(frozen=True)
class Config:
    """FedAvg's [method] fields; the learner is the SGD learner (`fedfleet.edge_agent.learners.fedavg`)."""

    lr: float = 0.1  # local learning rate
    epochs: int = 2  # local epochs per round
    batch: int = 16  # local minibatch size
    weight_decay: float = own(0.0)  # the learner's L2 weight decay
    optimizer: Literal["sgd", "adam"] = own("sgd")  # local optimizer (the diffusion task's default: adam)
    server_lr: float = own(1.0)  # scale of the averaged delta the server adds
    local_steps: int = own(None)  # when set: that many minibatch steps per round instead of `epochs`


@register
class FedAvg(Strategy):
    name = "fedavg"
    tasks_carry_state = True
    Config = Config
    learner = "fedavg"
    default_uplink = FEDZIP_UPLINK
    continual = True

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        cfg = {k: self.config[k] for k in ("lr", "epochs", "batch", "weight_decay", "optimizer", "local_steps") if k in self.config}
        down = to_numpy(self.state)
        expect = layout_of(self.state)
        uplink = dict(self.config.get("uplink", {"name": "none"}))
        seed = int(self.config.get("seed", 0))
        return {a: TaskSpec(config={**cfg, "seed": task_seed(seed, round, phase, a)}, tensors=down, expect=expect,
                            uplink_codec=uplink) for a in agents}

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        if not results:
            return
        weights = torch.tensor([float(r.samples) for r in results])
        weights /= weights.sum()
        lr = float(self.settings.server_lr)
        for name in self.state:
            stack = torch.stack([torch.from_numpy(r.tensors[name]) for r in results])
            self.state[name] += lr * torch.tensordot(weights, stack, dims=1)
