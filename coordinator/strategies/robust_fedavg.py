"""FedAvg whose mean is replaced by a robust aggregator chosen by name (`fedfleet.coordinator.strategies._robust`).

A round: sample honest participants (uniform, or availability-aware when `availability` is given),
send them the global model x; each runs `local_steps` plain SGD steps on fresh minibatches (the one SGD
learner, `fedfleet.edge_agent.learners.fedavg`, FedAvg's) and uploads its update delta_i = theta_i - x. The
coordinator aggregates the updates with the named rule and sets x <- x + server_lr * agg(deltas, f).
Working on updates keeps centered clipping centred on the current model and the geometric median's start
sane.

Byzantine agents listed in the fleet config are tasked in phase 1 with the honest statistics from the
omniscient hook (which the config must enable); the line search attacks this very aggregator. Byzantine
agents upload models (attacks are in parameter space); their update is model - x. For the spec's label
flip the honest tasks also return their flipped-label gradient (`strategies._byzantine`).
A round whose results are too few for the rule keeps the model and records why in `last_error`.

Config: aggregator ("mean"), aggregator_kw, f, byzantine, omniscient, participants (None = all), lr,
local_steps (1), batch (16), weight_decay (0; real weight decay, the squared L2 penalty), server_lr (1),
seed, availability, attack_evals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedfleet.coordinator.strategies import _attacks as attacks
from fedfleet.coordinator.strategies import _robust as robust
from fedfleet.coordinator.strategies import _sampling as sampling
from fedfleet.coordinator.strategies._byzantine import attack_tasks, flip_layout, needs_flip_grad, split_flip
from fedfleet.coordinator.strategies._config import AT_LEAST_1, own
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


@dataclass(frozen=True)
class Config:
    """Robust FedAvg's [method] fields (the defaults are the strategy's; a job sends only the fields it sets)."""

    aggregator: str = own("mean")  # any rule of fedfleet.coordinator.strategies._robust
    aggregator_kw: dict[str, Any] = own(factory=dict)  # keywords of the rule
    f: int = own(0)  # Byzantine agents tolerated
    byzantine: dict[str, str] = own(factory=dict)  # {agent: attack} (the fleet config's)
    omniscient: bool = own(False)  # attacks may read the honest vectors
    participants: int | None = own(None)  # honest agents sampled per round (None: all)
    availability: dict[str, float] | None = own(None)  # {agent: score}: availability-aware sampling
    lr: float = own(0.1)  # local SGD learning rate
    local_steps: int = own(1)  # local SGD steps per round
    batch: int = own(16)  # local minibatch size
    beta: float = own(0.0, check=(lambda v: v == 0, "0 (local momentum is not supported; its learner is plain SGD)"))
    weight_decay: float = own(0.0)  # real weight decay, the squared L2 penalty
    server_lr: float = own(1.0)  # scale of the aggregated update
    attack_evals: int = own(16, check=AT_LEAST_1)  # loss evaluations of the attacks' line search


@register
class RobustFedAvg(Strategy):
    name = "robust_fedavg"
    Config = Config
    learner = "fedavg"

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        self.layout = layout_of(self.state)
        self.aggregator = robust.canonical(str(self.settings.aggregator))
        self.aggregator_kw = dict(self.settings.aggregator_kw)
        self.f = int(self.settings.f)
        self.omniscient = bool(self.settings.omniscient)
        self.byzantine = attacks.parse_byzantine(self.settings.byzantine, self.omniscient)
        self.participants = self.settings.participants
        self.lr = float(self.settings.lr)
        self.local_steps = int(self.settings.local_steps)
        self.batch = int(self.settings.batch)
        if float(self.settings.beta) != 0.0:
            raise ConfigError("robust_fedavg: beta (local momentum) is not supported; its learner is plain SGD")
        self.weight_decay = float(self.settings.weight_decay)
        self.server_lr = float(self.settings.server_lr)
        self.seed = int(config.get("seed", 0))
        self.availability = self.settings.availability
        self.attack_evals = int(self.settings.attack_evals)
        self.phases = 2 if self.byzantine else 1
        self.flip = needs_flip_grad(self.byzantine, self.omniscient)
        self.x = robust.flatten(self.state, self.layout)
        self._up: dict[str, torch.Tensor] = {}
        self._byz: dict[str, torch.Tensor] = {}
        self._flip: dict[str, torch.Tensor] = {}
        self.last_error = ""

    def robust_step(self, deltas: torch.Tensor) -> torch.Tensor:
        agg = robust.get(self.aggregator)
        kw = dict(self.aggregator_kw)
        if self.aggregator == "centered_clipping" and "center" not in kw:
            kw["center"] = torch.zeros(deltas.shape[1], dtype=deltas.dtype)
        return agg(deltas, self.f, **kw)

    def _task_config(self, agent: str) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "local_steps": self.local_steps,
            "batch": self.batch,
            "weight_decay": self.weight_decay,
            "seed": agent_seed(self.seed, agent),
        }

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        if phase == 0:
            self._up, self._byz, self._flip = {}, {}, {}
            honest = [a for a in agents if a not in self.byzantine]
            if self.participants is not None:
                rng = sampling.round_rng(self.seed, round, salt=11)
                k = int(self.participants)
                if self.availability is not None:
                    honest = sampling.availability_aware(honest, k, rng, availability=self.availability)
                else:
                    honest = sampling.uniform(honest, k, rng)
            model = to_wire(self.x, self.layout)
            cfg = {"learner": self.learner, **({"flip_grad": True} if self.flip else {})}
            expect = self.layout + (flip_layout(self.layout) if self.flip else [])
            return {a: TaskSpec(config={**self._task_config(a), **cfg}, tensors=model, expect=expect) for a in honest}
        byz = [a for a in agents if a in self.byzantine]
        if not byz or not self._up:
            return {}
        honest_models = torch.stack([self._up[a] + self.x for a in sorted(self._up)])

        def mix(stack: torch.Tensor) -> torch.Tensor:
            return self.x + self.robust_step(stack - self.x)

        plans: dict[str, attacks.AttackPlan] = {}
        shared: dict[str, attacks.AttackPlan] = {}
        for a in byz:
            kind = self.byzantine[a]
            if kind == "label_flip" and not self.omniscient:
                plans[a] = attacks.AttackPlan(kind, {"model": self.x.clone()})
                continue
            if kind not in shared:
                flips = [self._flip[h] for h in sorted(self._flip)] if kind == "label_flip" else []
                shared[kind] = attacks.plan(kind, honest_models, len(byz), mix, evals=self.attack_evals,
                                            flip_grad=torch.stack(flips).mean(dim=0) if flips else None, lr=self.lr)
            plans[a] = shared[kind]
        out = attack_tasks(plans, self.byzantine, self.layout, {})
        for a, spec in out.items():
            spec.config.update(self._task_config(a))
        return out

    def update_kind(self, phase: int) -> str:
        return "model"  # results are models; the robust rule averages (model - x)

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        for r in results:
            if phase == 0:  # honest agents upload their update
                self._up[r.agent] = robust.flatten(r.tensors, self.layout)
                flip = split_flip(r.tensors, self.layout)
                if flip is not None:
                    self._flip[r.agent] = flip
            else:  # Byzantine agents upload a model
                self._byz[r.agent] = robust.flatten(r.tensors, self.layout) - self.x
        if phase != self.phases - 1:
            return
        rows = [self._up[a] for a in sorted(self._up)] + [self._byz[a] for a in sorted(self._byz)]
        if not rows:
            self.last_error = "no results"
            return
        try:
            step = self.robust_step(torch.stack(rows))
        except robust.AggregationError as exc:
            self.last_error = str(exc)
            return
        self.last_error = ""
        self.x = self.x + self.server_lr * step
        self.state = robust.unflatten(self.x, self.layout)

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def extra_state(self) -> dict[str, Any]:
        return {"last_error": self.last_error}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.x = robust.flatten(self.state, self.layout)  # x is the flat view of the restored state
        self.last_error = str(extra.get("last_error", ""))
