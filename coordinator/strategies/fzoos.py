"""FZooS's coordinator side: two exchanges per round, no oracle.

Phase 0: send the global ZO tensors x_{r-1} (and ν̄ from the previous round as "nu_bar"); agents return
their local iterates x^(i); set x_r = x_{r-1} − η_g Σ p_i (x_{r-1} − x^(i)) and ρ_i = mean|x_r − x^(i)|/2.
Phase 1: send x_r and ρ_i to the agents that answered phase 0; they return s_i ν_i ("nu", M floats);
set ν̄ = Σ p_i s_i ν_i (weights renormalised over the agents that answered).

The coordinator holds only the M RFF weights, never Ω, and never evaluates the objective.
Config: the learner settings of `edge_agent.learners.fzoos.DEFAULTS` (forwarded), objective, zo_tensors,
zo_path, server_lr (η_g, 1.0), seed, agent_config {agent id: {extra task config}}.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from coordinator.strategies.base import ClientResult, Strategy, TaskSpec, layout_of, register, to_numpy
from coordinator.strategies.fedzo import agent_task_config, weights_of, zo_names
from edge_agent.learners.fzoos import DEFAULTS

LEARNER_KEYS = tuple(k for k in DEFAULTS if k != "seed") + ("objective", "zo_path")


@register
class FZooS(Strategy):
    name = "fzoos"
    phases = 2

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        self.nu_bar: torch.Tensor | None = None
        self.rho: dict[str, float] = {}

    @property
    def m(self) -> int:
        return int(self.config.get("rff_features", DEFAULTS["rff_features"]))

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        down = to_numpy(self.state)
        uplink = dict(self.config.get("uplink", {"name": "none"}))
        if phase == 0:
            if self.nu_bar is not None:
                down = {**down, "nu_bar": self.nu_bar.numpy().astype(np.float32)}
            expect = layout_of({n: self.state[n] for n in zo_names(self)})
            return {a: TaskSpec(agent_task_config(self, LEARNER_KEYS, round, phase, a), down, expect, uplink)
                    for a in agents}
        tasks: dict[str, TaskSpec] = {}
        for a in agents:
            if a not in self.rho:
                continue  # only agents with a phase-0 iterate this round have a ρ_i
            cfg = agent_task_config(self, LEARNER_KEYS, round, phase, a)
            cfg["rho"] = self.rho[a]
            tasks[a] = TaskSpec(cfg, down, [("nu", (self.m,))], uplink)
        return tasks

    def update_kind(self, phase: int) -> str:
        return "model" if phase == 0 else "delta"  # phase 0: local iterates; phase 1: the nu vectors

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        if phase == 0:
            self.rho = {}
            if not results:
                return
            w = weights_of(results)
            lr = float(self.config.get("server_lr", 1.0))
            names = zo_names(self)
            for name in names:
                prev = self.state[name].double()
                stack = torch.stack([torch.from_numpy(np.asarray(r.tensors[name], np.float64)) for r in results])
                self.state[name] = (prev - lr * torch.tensordot(w, prev.unsqueeze(0) - stack, dims=1)).float()
            xr = torch.cat([self.state[n].double().flatten() for n in names])
            for r in results:
                xi = torch.cat([torch.from_numpy(np.asarray(r.tensors[n], np.float64)).flatten() for n in names])
                self.rho[r.agent] = float((xr - xi).abs().mean()) / 2.0
            return
        if not results:
            return
        w = weights_of(results)
        stack = torch.stack([torch.from_numpy(np.asarray(r.tensors["nu"], np.float64)) for r in results])
        self.nu_bar = torch.tensordot(w, stack, dims=1)

    def extra_state(self) -> dict[str, Any]:
        return {"nu_bar": self.nu_bar, "rho": dict(self.rho)}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        nu = extra["nu_bar"]
        self.nu_bar = None if nu is None else nu.clone()
        self.rho = {a: float(v) for a, v in extra["rho"].items()}
