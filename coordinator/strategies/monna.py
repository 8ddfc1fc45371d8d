"""MoNNA on the coordinator: a trusted relay that mixes every honest agent's model with NNA.

There is no global model. Each agent has its OWN model copy here (separate storage from the start: the
reference code aliased them all to one tensor, which made the first step n_h times too large). A step:

- phase 0: every honest agent gets its own model theta_i, takes a momentum half step on the edge
  (`fedfleet.edge_agent.learners.monna`) and uploads theta_i+;
- phase 1 (only when the fleet config lists Byzantine agents): each Byzantine agent gets what its
  attack needs (`fedfleet.coordinator.strategies._attacks`, omniscient hook only when `omniscient = true`) and uploads its
  vector. For the spec's label flip (mu - gamma_t * mean_i of the honest flipped-label gradients) the
  honest phase-0 tasks also return their flipped-label gradient (`strategies._byzantine`);
- mixing: node i's set S_i = {theta_i+} + (n - 2f - 1) other honest vectors drawn uniformly (PCG64,
  seeded) + every Byzantine vector, so |S_i| = n - f; theta_i <- NNA_i(S_i) = mean of the |S_i| - f
  nearest. All NNA_i of a step come from one Gram-matrix product. With no Byzantine vectors the free
  slots go to more honest vectors. `mixing` may name any other rule from `fedfleet.coordinator.strategies._robust`
  (trimmed_mean, median, krum, geometric_median, centered_clipping, mean) for baselines.

Config: f, n (declared total, default honest + byzantine), byzantine {agent: attack}, omniscient,
beta (0.9; 0 gives plain NNA), lr, lr_decay (50), lr_reset, norm_penalty (lambda of the unsquared
|theta|_2 term, 1e-4; it is not weight decay, so it is not called that), batch (16), seed, mixing ("nna"),
mixing_kw, attack_evals (16).

Evaluation: `node_states()` gives every honest node's own model; the round engine scores each and records
the mean and the minimum (`global_state()`, honest node 0, is what the reference code scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedfleet.coordinator.strategies import _attacks as attacks
from fedfleet.coordinator.strategies import _robust as robust
from fedfleet.coordinator.strategies._byzantine import attack_tasks, flip_layout, needs_flip_grad, split_flip
from fedfleet.coordinator.strategies._config import AT_LEAST_1, own
from fedfleet.coordinator.strategies._sampling import round_rng
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
    """MoNNA's [method] fields (the defaults are the strategy's; a job sends only the fields it sets)."""

    f: int = own(0)  # Byzantine agents tolerated
    n: int | None = own(None, check=AT_LEAST_1)  # declared total (None: honest + byzantine)
    byzantine: dict[str, str] = own(factory=dict)  # {agent: attack} (the fleet config's)
    omniscient: bool = own(False)  # attacks may read the honest vectors
    beta: float = own(0.9)  # momentum of the local half step (0: plain NNA)
    lr: float = own(0.5)  # step size
    lr_decay: float = own(50.0)  # lr / (1 + t / lr_decay)
    lr_reset: int | None = own(None, check=AT_LEAST_1)  # restart the decay every lr_reset rounds
    norm_penalty: float = own(1e-4, check=(lambda v: v >= 0, "a number >= 0"))  # lambda of the unsquared |theta|_2
    batch: int = own(16)  # local minibatch size
    mixing: str = own("nna")  # any rule of fedfleet.coordinator.strategies._robust
    mixing_kw: dict[str, Any] = own(factory=dict)  # keywords of the mixing rule
    attack_evals: int = own(16, check=AT_LEAST_1)  # loss evaluations of the attacks' line search


@register
class MonnaStrategy(Strategy):
    name = "monna"
    Config = Config
    learner = "monna"

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        self.layout = layout_of(self.state)
        self.f = int(self.settings.f)
        self.omniscient = bool(self.settings.omniscient)
        self.byzantine = attacks.parse_byzantine(self.settings.byzantine, self.omniscient)
        self.beta = float(self.settings.beta)
        self.lr = float(self.settings.lr)
        self.lr_decay = float(self.settings.lr_decay)
        self.lr_reset = self.settings.lr_reset
        if "weight_decay" in config:
            raise ConfigError("monna: 'weight_decay' is now 'norm_penalty' (lambda of the unsquared |theta|_2 term)")
        self.norm_penalty = float(self.settings.norm_penalty)
        self.batch = int(self.settings.batch)
        self.seed = int(config.get("seed", 0))
        self.mixing = robust.canonical(str(self.settings.mixing))
        self.mixing_kw = dict(self.settings.mixing_kw)
        self.attack_evals = int(self.settings.attack_evals)
        self.n_declared = self.settings.n
        self.phases = 2 if self.byzantine else 1
        self.flip = needs_flip_grad(self.byzantine, self.omniscient)
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"monna: beta must be in [0, 1), got {self.beta}")
        if self.n_declared is not None and int(self.n_declared) - self.f < 2 * self.f + 1:
            raise ConfigError(
                f"monna: n={self.n_declared}, f={self.f} leaves |S_i| = n - f < 2f + 1; "
                "NNA cannot tolerate that many Byzantine agents: lower f or add agents"
            )
        self._init = robust.flatten(self.state, self.layout)
        self.models: dict[str, torch.Tensor] = {}  # one separate flat copy per agent
        self._honest_up: dict[str, torch.Tensor] = {}
        self._byz_up: dict[str, torch.Tensor] = {}
        self._flip_up: dict[str, torch.Tensor] = {}
        self.last_attack: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ helpers
    def step_size(self, round: int) -> float:
        t = round % int(self.lr_reset) if self.lr_reset else round
        return self.lr / (1.0 + t / self.lr_decay)

    def model_of(self, agent: str) -> torch.Tensor:
        if agent not in self.models:
            self.models[agent] = self._init.clone()
        return self.models[agent]

    def _n(self) -> int:
        return int(self.n_declared) if self.n_declared is not None else len(self._honest_up) + len(self.byzantine)

    def _mix_one(self, stack: torch.Tensor, sub: list[int]) -> torch.Tensor:
        agg = robust.get(self.mixing)
        if robust.pivoted(self.mixing):
            return agg(stack[sub], self.f, own=0, **self.mixing_kw)
        return agg(stack[sub], self.f, **self.mixing_kw)

    def mix(self, stack: torch.Tensor, subsets: list[list[int]]) -> torch.Tensor:
        """Row r: node r's mixed model over stack[subsets[r]] (pivot first)."""
        if self.mixing == "nna":
            return robust.nna_subsets(stack, self.f, subsets)
        return torch.stack([self._mix_one(stack, sub) for sub in subsets])

    def _objective(self, n_honest: int) -> attacks.MixFn:
        """What the line search maximises against: the mean over honest pivots of their mixed models when
        all n vectors arrive (the reference's assumption)."""

        def mix_all(stack: torch.Tensor) -> torch.Tensor:
            n = int(stack.shape[0])
            if not robust.pivoted(self.mixing):
                return self._mix_one(stack, list(range(n)))
            subs = [[i, *[j for j in range(n) if j != i]] for i in range(n_honest)]
            return self.mix(stack, subs).mean(dim=0)

        return mix_all

    def _base_config(self, round: int, agent: str) -> dict[str, Any]:
        return {
            "lr": self.step_size(round),
            "beta": self.beta,
            "norm_penalty": self.norm_penalty,
            "batch": self.batch,
            "seed": agent_seed(self.seed, agent),
        }

    # ------------------------------------------------------------------ engine interface
    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        if phase == 0:
            self._honest_up, self._byz_up, self._flip_up = {}, {}, {}
            extra = {"flip_grad": True} if self.flip else {}
            expect = self.layout + (flip_layout(self.layout) if self.flip else [])
            return {
                a: TaskSpec(
                    config={**self._base_config(round, a), "learner": "monna", **extra},
                    tensors=to_wire(self.model_of(a), self.layout),
                    expect=expect,
                )
                for a in agents
                if a not in self.byzantine
            }
        byz = [a for a in agents if a in self.byzantine]
        if not byz or not self._honest_up:
            return {}
        honest = torch.stack([self._honest_up[a] for a in sorted(self._honest_up)])
        f_real = len(byz)
        plans: dict[str, attacks.AttackPlan] = {}
        shared: dict[str, attacks.AttackPlan] = {}
        for a in byz:
            kind = self.byzantine[a]
            if kind == "label_flip" and not self.omniscient:
                plans[a] = attacks.AttackPlan(kind, {"model": self.model_of(a)})
                continue
            if kind not in shared:
                flips = [self._flip_up[h] for h in sorted(self._flip_up)] if kind == "label_flip" else []
                shared[kind] = attacks.plan(
                    kind, honest, f_real, self._objective(honest.shape[0]), evals=self.attack_evals,
                    flip_grad=torch.stack(flips).mean(dim=0) if flips else None, lr=self.step_size(round),
                )
            plans[a] = shared[kind]
        self.last_attack = {k: dict(p.scalars) for k, p in shared.items()}
        base = {a: self._base_config(round, a) for a in byz}
        out = {}
        for a, spec in attack_tasks(plans, self.byzantine, self.layout, {}).items():
            spec.config.update(base[a])
            out[a] = spec
        return out

    def update_kind(self, phase: int) -> str:
        return "model"  # results are each node's model after its local steps

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        target = self._honest_up if phase == 0 else self._byz_up
        for r in results:
            target[r.agent] = robust.flatten(r.tensors, self.layout)
            flip = split_flip(r.tensors, self.layout) if phase == 0 else None
            if flip is not None:
                self._flip_up[r.agent] = flip
        if phase == self.phases - 1:
            self._mix_round(round)

    def _mix_round(self, round: int) -> None:
        honest = sorted(self._honest_up)
        byz = sorted(self._byz_up)
        if not honest:
            return
        stack = torch.stack([self._honest_up[a] for a in honest] + [self._byz_up[a] for a in byz])
        n_h = len(honest)
        q = self._n() - self.f  # |S_i|
        rng = round_rng(self.seed, round, salt=7)
        pivots = list(range(n_h))
        if not self.omniscient:  # non-omniscient label flippers keep (and get) their own mixed model
            pivots += [n_h + j for j, a in enumerate(byz) if self.byzantine[a] == "label_flip"]
        subsets = []
        for p in pivots:
            byz_rows = [n_h + j for j in range(len(byz)) if n_h + j != p]
            k = max(0, min(q - 1 - len(byz_rows), n_h - (1 if p < n_h else 0)))
            others = [i for i in range(n_h) if i != p]
            pick = sorted(rng.choice(len(others), size=k, replace=False).tolist()) if k else []
            subsets.append([p, *[others[i] for i in pick], *byz_rows])
        mixed = self.mix(stack, subsets)
        names = honest + byz
        for row, p in enumerate(pivots):
            self.models[names[p]] = mixed[row].clone()

    # ------------------------------------------------------------------ state
    def node_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every honest agent's own model (the thing to evaluate: min and mean over nodes)."""
        return {a: robust.unflatten(v, self.layout) for a, v in sorted(self.models.items()) if a not in self.byzantine}

    def global_state(self) -> dict[str, torch.Tensor]:
        """There is no global model; this is the first honest node's model (what the reference scores)."""
        nodes = self.node_states()
        return next(iter(nodes.values())) if nodes else self.state

    def extra_state(self) -> dict[str, Any]:
        return {"models": {a: v.clone() for a, v in self.models.items()},
                "last_attack": {k: dict(v) for k, v in self.last_attack.items()}}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.models = {a: v.clone() for a, v in extra["models"].items()}
        self.last_attack = {k: dict(v) for k, v in extra.get("last_attack", {}).items()}
        self._init = robust.flatten(self.state, self.layout)
