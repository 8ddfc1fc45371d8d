"""FedAvg: every selected agent runs local SGD from the global tensors; the server adds the
sample-weighted mean of the deltas, scaled by `server_lr` (1.0)."""

from __future__ import annotations

import torch

from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    layout_of,
    register,
    task_seed,
    to_numpy,
)


@register
class FedAvg(Strategy):
    name = "fedavg"
    tasks_carry_state = True

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        cfg = {k: self.config[k] for k in ("lr", "epochs", "batch", "weight_decay", "optimizer") if k in self.config}
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
        lr = float(self.config.get("server_lr", 1.0))
        for name in self.state:
            stack = torch.stack([torch.from_numpy(r.tensors[name]) for r in results])
            self.state[name] += lr * torch.tensordot(weights, stack, dims=1)
