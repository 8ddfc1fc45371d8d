"""FZooS's coordinator side: two exchanges per round, no oracle.

Phase 0: send ν̄ from the previous round as "nu_bar" (M floats), and the global ZO tensors x_{r-1} only to
agents that do not hold them; agents return their local iterates x^(i); set
x_r = x_{r-1} − η_g Σ p_i (x_{r-1} − x^(i)) and ρ_i = mean|x_r − x^(i)|/2.
Phase 1: send x_r (d floats) and ρ_i (1 float) to the agents that answered phase 0; they return s_i ν_i
("nu", M floats); set ν̄ = Σ p_i s_i ν_i (weights renormalised over the agents that answered).

So x_r goes down once per round, in phase 1, and the downlink is the spec's d + M + 1 floats per agent and
round. Every task carries config "versions" (tensor name -> version; the ZO tensors' version moves when
phase 0 changes them, the other head tensors stay at 0) and leaves out the tensors the agent is known to
hold at that version: known because it answered a task that carried them. An agent that did not answer
its last task is assumed to hold nothing and gets everything again.

The coordinator holds only the M RFF weights, never Ω, and never evaluates the objective.
Config: the learner settings of `fedfleet.edge_agent.learners.fzoos.DEFAULTS` (forwarded), objective, zo_tensors,
zo_path, server_lr (η_g, 1.0), seed, agent_config {agent id: {extra task config}}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fedfleet.coordinator.strategies._config import own
from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    layout_of,
    register,
    to_numpy,
)
from fedfleet.coordinator.strategies.fedzo import ZO_TENSORS, agent_task_config, weights_of, zo_names
from fedfleet.edge_agent.learners.fzoos import DEFAULTS

LEARNER_KEYS = tuple(k for k in DEFAULTS if k != "seed") + ("objective", "zo_path")


@dataclass(frozen=True)
class Config:
    """FZooS's [method] fields: the GD variant (the paper's plain-GD step, tuned for this head), not the spec's
    configuration (Adam at lr 0.01, 20 GP restarts, M = 10000, radius 0.01: the learner's defaults), which costs
    about 4x the CPU per round and scored the same on digits (`fedfleet bench zo`: 0.299 against 0.296); set
    [method] optimizer = "adam", lr = 0.01, gp_restarts = 20, explore_radius = 0.01, ... for it. The learner's
    other settings (`fedfleet.edge_agent.learners.fzoos.DEFAULTS`) are forwarded when set."""

    objective: Literal["macro_f1", "quadratic"] = "macro_f1"  # what the agents minimise (1 - macro-F1)
    zo_tensors: list[str] = field(default_factory=lambda: list(ZO_TENSORS))  # tensors tuned ([]: all)
    zo_path: Literal["numpy", "runtime"] = "runtime"  # queries in numpy or in the agent's runtime
    lr: float = 1.0  # local step size
    optimizer: Literal["sgd", "adam"] = "sgd"  # local step rule
    local_steps: int = 10  # local steps per round
    gp_restarts: int = 2  # GP hyper-parameter restarts
    explore_radius: float = 0.05  # radius of the exploration queries
    init_radius: float = 0.05  # radius of the initial queries
    rff_features: int = 2000  # M, random Fourier features of the shared surrogate
    gp_kernel: str = own(DEFAULTS["gp_kernel"])
    gp_points: int = own(DEFAULTS["gp_points"])
    gp_noise: float = own(DEFAULTS["gp_noise"])
    explore_candidates: int = own(DEFAULTS["explore_candidates"])
    explore_pick: int = own(DEFAULTS["explore_pick"])
    init_points: int = own(DEFAULTS["init_points"])
    refresh_candidates: int = own(DEFAULTS["refresh_candidates"])
    refresh_pick: int = own(DEFAULTS["refresh_pick"])
    rff_points: int = own(DEFAULTS["rff_points"])
    rff_lengthscale: float = own(DEFAULTS["rff_lengthscale"])
    rff_seed: int = own(DEFAULTS["rff_seed"])
    rff_jitter: float = own(DEFAULTS["rff_jitter"])
    history_points: int = own(DEFAULTS["history_points"])
    rho_floor: bool | float = own(DEFAULTS["rho_floor"])
    correction: bool = own(DEFAULTS["correction"])
    server_lr: float = own(1.0)  # eta_g: scale of the averaged step
    agent_config: dict[str, dict[str, Any]] = own(factory=dict)  # {agent id: extra task config}


@register
class FZooS(Strategy):
    name = "fzoos"
    phases = 2
    Config = Config
    learner = "fzoos"

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        self.nu_bar: torch.Tensor | None = None
        self.rho: dict[str, float] = {}
        self.version = 1  # of the ZO tensors; the other state tensors never change (version 0)
        self.held: dict[str, dict[str, int]] = {}  # agent -> versions of the tensors it holds
        self._sent: dict[str, dict[str, int]] = {}  # agent -> versions its open task needs

    @property
    def m(self) -> int:
        # the learner's default when the config leaves it out (a job's config always carries it)
        return int(self.config.get("rff_features", DEFAULTS["rff_features"]))

    def _versions(self) -> dict[str, int]:
        zo = set(zo_names(self))
        return {n: (self.version if n in zo else 0) for n in self.state}

    def _down(self, agent: str, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """The state tensors this agent does not hold at their current version, and every version."""
        versions = self._versions()
        held = self.held.get(agent, {})
        self._sent[agent] = versions
        return {n: v for n, v in state.items() if held.get(n) != versions[n]}, versions

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        state = to_numpy(self.state)
        uplink = dict(self.config.get("uplink", {"name": "none"}))
        self._sent = {}
        if phase == 0:
            expect = layout_of({n: self.state[n] for n in zo_names(self)})
            tasks = {}
            for a in agents:
                down, versions = self._down(a, state)
                if self.nu_bar is not None:
                    down["nu_bar"] = self.nu_bar.numpy().astype(np.float32)
                cfg = {**agent_task_config(self, LEARNER_KEYS, round, phase, a), "versions": versions}
                tasks[a] = TaskSpec(cfg, down, expect, uplink)
            return tasks
        tasks = {}
        for a in agents:
            if a not in self.rho:
                continue  # only agents with a phase-0 iterate this round have a ρ_i
            down, versions = self._down(a, state)
            cfg = {**agent_task_config(self, LEARNER_KEYS, round, phase, a), "versions": versions, "rho": self.rho[a]}
            tasks[a] = TaskSpec(cfg, down, [("nu", (self.m,))], uplink)
        return tasks

    def update_kind(self, phase: int) -> str:
        return "model" if phase == 0 else "delta"  # phase 0: local iterates; phase 1: the nu vectors

    def _track(self, results: list[ClientResult]) -> None:
        """Agents that answered hold what their task needed; agents that were tasked and did not, nothing."""
        answered = {r.agent for r in results}
        for agent, versions in self._sent.items():
            if agent in answered:
                self.held[agent] = dict(versions)
            else:
                self.held.pop(agent, None)
        self._sent = {}

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        self._track(results)
        if phase == 0:
            self.rho = {}
            if not results:
                return
            self.version += 1  # x_r differs from x_{r-1}: every agent must get it (in phase 1)
            w = weights_of(results)
            lr = float(self.settings.server_lr)
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
        return {"nu_bar": self.nu_bar, "rho": dict(self.rho), "version": self.version}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        nu = extra["nu_bar"]
        self.nu_bar = None if nu is None else nu.clone()
        self.rho = {a: float(v) for a, v in extra["rho"].items()}
        self.version = int(extra.get("version", 0))
        self.held = {}  # after a restart nothing is known to be held: every agent gets x_r again
