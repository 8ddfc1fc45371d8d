"""FedAMD (anchor sampling) on the coordinator: the per-client gradient table, roles, and the update.

- The table G[m] holds each client's last large-batch gradient (M x d); the bullseye is its mean.
- Initialisation: the first round this strategy sees is a full-participation pass in which every agent
  is an anchor at x_0; it fills G and does not move the model (`init_done` tells the two apart, and
  `t` counts the real rounds that follow).
- Round t: sample A agents uniformly (PCG64 seeded by seed and t), freeze v_t = mean(G), assign roles
  (`fedfleet.coordinator.strategies._sampling.assign_roles`, constant mode with probability p or periodic mode with period
  P >= 2; an agent not yet in the table is made an anchor). Miners get x_t and v_t, anchors get x_t.
  Periodic mode counts the initialisation pass as its round 0 (every client an anchor, as 0 mod P = 0),
  so real round t is the paper's round t + 1: the first real round is a miner round, and anchor rounds
  come every P rounds after the pass (real t = P - 1, 2P - 1, ...).
- p = "auto" (the default) is the paper's p* = sqrt(4 r^2 + 2 r) - 2 r with r = M / A, fixed at the
  first real round from the number of agents M and A = min(participants, M): 0.485 for M = 20, A = 5,
  and 0.472 for the reference's M = 20, A = 10. A fixed p refreshes about A * p table rows per round. At
  the reference's p = 0.2 with A = 5 that is one row in twenty: on digits (`fedfleet bench fedamd`) the
  table was 17.6 rounds old on average and the bullseye's error was 107% of the true gradient's norm
  (7.5 rounds and 66% at p*), which made p = 0.2 unstable at local learning rates >= 0.1. `history`
  records each round's table age (mean and max, in rounds), so a stale table shows.
- After the round: if at least one miner reported, x_{t+1} = x_t - server_lr * mean_i delta_i (uniform
  weights over miners), else x_{t+1} = x_t. Anchors' gradients then replace their rows of G, so they
  enter the bullseye one round later (the paper's v_{t+1}).

Config: participants (A, 10), mode ("constant" | "periodic"), p ("auto" = p*, or a number in [0, 1]),
period, lr (local, 0.01), server_lr (1.0), local_steps (K, 10), batch (64), large_batch (0 = whole local
set), chunk (256), divided (False), seed (2022).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedfleet.coordinator.strategies import _robust as robust
from fedfleet.coordinator.strategies import _sampling as sampling
from fedfleet.coordinator.strategies._config import FRACTION, own
from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    agent_seed,
    layout_of,
    register,
    to_wire,
)
from fedfleet.edge_agent.errors import ConfigError

log = logging.getLogger("fedfleet.fedamd")


@dataclass(frozen=True)
class Config:
    """FedAMD's [method] fields (the defaults are the strategy's; a job sends only the fields it sets)."""

    participants: int = own(10)  # A, agents sampled per round
    mode: Literal["constant", "periodic"] = own("constant")  # how roles are assigned
    p: float | Literal["auto"] = own("auto", check=FRACTION)  # anchor probability ("auto": the paper's p*)
    period: int | None = own(None, check=(lambda v: v >= 2, "an integer >= 2"))  # periodic mode's P
    lr: float = own(0.01)  # local learning rate
    server_lr: float = own(1.0)  # scale of the miners' mean delta
    local_steps: int = own(10)  # K, local steps of a miner
    batch: int = own(64)  # local minibatch size
    large_batch: int = own(0)  # an anchor's gradient batch (0: the whole local set)
    chunk: int = own(256)  # rows per chunk of the large-batch gradient
    divided: bool = own(False)  # a miner uploads its delta divided by K


@register
class FedAMDStrategy(Strategy):
    name = "fedamd"
    Config = Config
    learner = "fedamd"

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        self.layout = layout_of(self.state)
        self.participants = int(self.settings.participants)
        self.mode = str(self.settings.mode)
        self.p = self.settings.p
        self.period = self.settings.period
        self.lr = float(self.settings.lr)
        self.server_lr = float(self.settings.server_lr)
        self.local_steps = int(self.settings.local_steps)
        self.batch = int(self.settings.batch)
        self.large_batch = int(self.settings.large_batch)
        self.chunk = int(self.settings.chunk)
        self.divided = bool(self.settings.divided)
        self.seed = int(config.get("seed", 2022))
        auto_p = self.p == "auto"
        if isinstance(self.p, bool) or (isinstance(self.p, str) and not auto_p):
            raise ConfigError(f"fedamd p must be 'auto' or a number in [0, 1], got {self.p!r}")
        if self.mode == "periodic" or auto_p:
            self.p = None  # periodic: unused; auto: resolved to p* at the first real round, once M is known
        # validate the role settings once, up front (an auto p is checked as any value in [0, 1])
        sampling.assign_roles(
            [], 0, sampling.round_rng(0, 0), mode=self.mode, p=0.5 if auto_p else self.p, period=self.period
        )
        if self.local_steps < 1:
            raise ConfigError(f"fedamd local_steps must be >= 1, got {self.local_steps}")
        self.x = robust.flatten(self.state, self.layout)
        self.table: dict[str, torch.Tensor] = {}
        self.computed_at: dict[str, int] = {}  # round t of the model each table row's gradient was taken at
        self.init_done = False
        self.t = 0
        self.roles: dict[str, str] = {}
        self.history: list[dict[str, float]] = []

    def bullseye(self) -> torch.Tensor:
        if not self.table:
            raise ConfigError("fedamd: the gradient table is empty; the initialisation pass must run first")
        return torch.stack([self.table[a] for a in sorted(self.table)]).mean(dim=0)

    def _config(self, agent: str, role: str) -> dict[str, Any]:
        return {
            "learner": "fedamd",
            "role": role,
            "lr": self.lr,
            "local_steps": self.local_steps,
            "batch": self.batch,
            "large_batch": self.large_batch,
            "chunk": self.chunk,
            "divided": self.divided,
            "seed": agent_seed(self.seed, agent),
        }

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        model = to_wire(self.x, self.layout)
        if not self.init_done:
            self.roles = dict.fromkeys(agents, sampling.ANCHOR)
            return {
                a: TaskSpec(config=self._config(a, sampling.ANCHOR), tensors=model, expect=self.layout)
                for a in agents
            }
        bullseye = self.bullseye()  # frozen v_t (raises if the initialisation pass filled no row)
        if self.p is None and self.mode == "constant":
            m, a = len(agents), min(self.participants, len(agents))
            self.p = sampling.optimal_p(m, a)
            log.info("fedamd: p = %.4f (p* for M = %d agents, A = %d per round)", self.p, m, a)
        selected = sampling.uniform(sorted(agents), self.participants, sampling.round_rng(self.seed, self.t, 1))
        roles = sampling.assign_roles(  # periodic: the init pass was round 0, so this is round t + 1
            selected, self.t + 1 if self.mode == "periodic" else self.t, sampling.round_rng(self.seed, self.t, 2),
            mode=self.mode, p=self.p, period=self.period,
        )
        self.roles = {a: (sampling.ANCHOR if a not in self.table else r) for a, r in roles.items()}
        bull = to_wire(bullseye, self.layout, prefix="v.")
        out = {}
        for a, role in self.roles.items():
            tensors = {**model, **bull} if role == sampling.MINER else model
            out[a] = TaskSpec(config=self._config(a, role), tensors=tensors, expect=self.layout)
        return out

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        deltas, grads = [], {}
        evals = 0.0
        for r in results:
            role = self.roles.get(r.agent)
            vec = robust.flatten(r.tensors, self.layout)
            if role == sampling.MINER:
                deltas.append(vec)
            elif role == sampling.ANCHOR:
                grads[r.agent] = vec
            else:
                continue  # not tasked this round: ignore
            evals += float(r.metrics.get("grad_evals", 0.0))
        if deltas:
            self.x = self.x - self.server_lr * torch.stack(deltas).mean(dim=0)
            self.state = robust.unflatten(self.x, self.layout)
        ages = [float(self.t - self.computed_at[a]) for a in self.table]  # the ages v_t was built from
        self.table.update(grads)  # enters the bullseye at the next round (one-round lag)
        self.computed_at.update(dict.fromkeys(grads, self.t))
        self.history.append(
            {
                "init": float(not self.init_done),
                "miners": float(len(deltas)),
                "anchors": float(len(grads)),
                "grad_evals": evals,
                "table_age_mean": sum(ages) / len(ages) if ages else 0.0,
                "table_age_max": max(ages, default=0.0),
            }
        )
        if self.init_done:
            self.t += 1
        elif self.table:
            self.init_done = True

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def round_note(self) -> str:
        if not self.history:
            return ""
        h = self.history[-1]
        if h["init"]:
            return f"fedamd init pass: {int(h['anchors'])} table rows"
        roles = f"p {self.p:.3f}" if self.mode == "constant" and self.p is not None else f"period {self.period}"
        return (f"fedamd {roles}  anchors {int(h['anchors'])} miners {int(h['miners'])}  "
                f"table age {h['table_age_mean']:.1f} (max {int(h['table_age_max'])})")

    def extra_state(self) -> dict[str, Any]:
        return {
            "table": {a: v.clone() for a, v in self.table.items()},
            "computed_at": dict(self.computed_at),
            "t": self.t,
            "p": self.p,
            "init_done": self.init_done,
            "history": [dict(h) for h in self.history],
        }

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.table = {a: v.clone() for a, v in extra["table"].items()}
        self.computed_at = {a: int(t) for a, t in extra["computed_at"].items()}
        self.t, self.p, self.init_done = int(extra["t"]), extra["p"], bool(extra["init_done"])
        self.history = [dict(h) for h in extra.get("history", [])]
        self.x = robust.flatten(self.state, self.layout)
