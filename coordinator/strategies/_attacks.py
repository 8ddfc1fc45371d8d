"""The omniscient-attacker hook: what a coordinator hands Byzantine agents so they can attack.

Attacks run in parameter space (mixing is on models, not gradients), so every attack is a model vector.
The Byzantine *agents* produce the vectors (`fedfleet.edge_agent.learners.byzantine`); this module only computes
the honest statistics those agents need, and only when the experiment config explicitly sets
`omniscient = true`:

- ALIE ("a little is enough"): mu + a * sigma, sigma the unbiased per-coordinate std of the honest vectors.
- FOE ("fall of empires"): (1 - a) * mu.
  For both, a >= 0 maximises |mixed(H + f x {byz}) - mu|^2 with a 16-evaluation 1-D search
  (`line_maximize`: start at 0 with step 1, double while improving, then contract by 0.8).
- sign flip: -mu.
- mimic: a copy of one honest vector (honest node 0 by default).
- label flip (the spec's): mu - gamma_t * mean_i grad NLL(theta_i; labels y -> C - 1 - y), the mean over
  the honest nodes of their flipped-label gradients (the honest agents compute them on their own batches,
  the strategy averages them and passes `flip_grad`). Without the hook a label flipper pushes its own
  model with its own local flipped-label gradient (the agent computes it; not the spec's attack).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedfleet.edge_agent.errors import ConfigError

ATTACKS = ("alie", "foe", "sign_flip", "label_flip", "mimic")
NEEDS_HONEST = frozenset({"alie", "foe", "sign_flip", "mimic"})
_ALIASES = {
    "little": "alie",
    "empire": "foe",
    "sf": "sign_flip",
    "signflip": "sign_flip",
    "signflipping": "sign_flip",
    "lf": "label_flip",
    "labelflip": "label_flip",
    "labelflipping": "label_flip",
}

# objective input: the full stack (honest rows first, then f Byzantine rows); output: the mixed vector
# (for decentralised mixing, the mean over honest pivots of their mixed models)
MixFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["ATTACKS", "NEEDS_HONEST", "AttackPlan", "canonical", "line_maximize", "parse_byzantine", "plan"]


def canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key.replace("_", ""), _ALIASES.get(key, key))
    if key not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r} in the byzantine config; choose one of {', '.join(ATTACKS)}")
    return key


def parse_byzantine(byzantine: dict[str, str] | None, omniscient: bool) -> dict[str, str]:
    """Validate the fleet config's `byzantine = {agent: attack}` table against the omniscient switch."""
    out = {agent: canonical(kind) for agent, kind in (byzantine or {}).items()}
    needy = sorted(a for a, k in out.items() if k in NEEDS_HONEST)
    if needy and not omniscient:
        raise ConfigError(
            f"agents {', '.join(needy)} use attacks that need the honest vectors "
            f"({', '.join(sorted({out[a] for a in needy}))}); set omniscient = true in the experiment "
            f"config to enable the omniscient-attacker hook, or use label_flip"
        )
    return out


def line_maximize(
    fn: Callable[[float], float], evals: int = 16, start: float = 0.0, delta: float = 1.0, ratio: float = 0.8
) -> float:
    """Best-effort argmax of fn over x >= 0 with exactly `evals` evaluations (fewer never)."""
    if evals < 1 or delta <= 0 or not 0.5 < ratio < 1.0 or start < 0:
        raise ValueError("line_maximize needs evals >= 1, delta > 0, 0.5 < ratio < 1, start >= 0")
    best_x, best_y = start, fn(start)
    left = evals - 1
    probe = best_x
    while left > 0:  # expansion: double the step while it keeps improving
        probe = best_x + delta
        y = fn(probe)
        left -= 1
        if y > best_y:
            best_x, best_y = probe, y
            delta *= 2.0
        else:
            delta *= ratio
            break
    while left > 0:  # contraction: probe around the best point with a shrinking step
        if probe < best_x:
            probe = probe + delta
        else:
            x = probe - delta
            while x < 0:
                x = (x + probe) / 2.0
            probe = x
        y = fn(probe)
        left -= 1
        if y > best_y:
            best_x, best_y = probe, y
        delta *= ratio
    return best_x


@dataclass
class AttackPlan:
    """What the coordinator sends one Byzantine agent: flat tensors by role ("mu", "sigma", "target",
    "model") and scalars (the chosen `a`)."""

    attack: str
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)

    def vector(self) -> torch.Tensor | None:
        """The Byzantine vector this plan yields (what a faithful agent computes), if fully determined."""
        if self.attack == "alie":
            return self.vectors["mu"] + self.scalars["a"] * self.vectors["sigma"]
        if self.attack == "foe":
            return (1.0 - self.scalars["a"]) * self.vectors["mu"]
        if self.attack == "sign_flip":
            return -self.vectors["mu"]
        if self.attack == "mimic":
            return self.vectors["target"].clone()
        if self.attack == "label_flip" and "grad" in self.vectors:
            return self.vectors["mu"] - self.scalars["lr"] * self.vectors["grad"]
        return None  # the non-omniscient label flip depends on the agent's local data


def plan(
    attack: str,
    honest: torch.Tensor,
    f: int,
    mix: MixFn | None = None,
    *,
    evals: int = 16,
    mimic_target: int = 0,
    flip_grad: torch.Tensor | None = None,
    lr: float | None = None,
) -> AttackPlan:
    """Compute the honest statistics one attack needs. `honest` is (n_h, d); `mix` maps the full stack
    (honest rows then f Byzantine rows) to the mixed vector the defence would output; it is required
    for ALIE and FOE, whose strength `a` is found by `line_maximize`. Label flip needs `flip_grad`, the
    mean over the honest nodes of their flipped-label gradients (d,), and the step size `lr`."""
    attack = canonical(attack)
    if honest.dim() != 2 or honest.shape[0] < 1:
        raise ValueError(f"plan needs a (n_h, d) stack of honest vectors, got shape {tuple(honest.shape)}")
    mu = honest.mean(dim=0)
    if attack == "sign_flip":
        return AttackPlan(attack, {"mu": mu})
    if attack == "label_flip":
        if flip_grad is None or lr is None or tuple(flip_grad.shape) != tuple(mu.shape):
            raise ValueError("label_flip needs the honest nodes' mean flipped-label gradient (d,) and lr")
        return AttackPlan(attack, {"mu": mu, "grad": flip_grad}, {"lr": float(lr)})
    if attack == "mimic":
        if not 0 <= mimic_target < honest.shape[0]:
            raise ValueError(f"mimic target {mimic_target} outside {honest.shape[0]} honest vectors")
        return AttackPlan(attack, {"target": honest[mimic_target].clone()})
    if mix is None:
        raise ValueError(f"{attack} needs the defence's mixing function to run its line search")
    sigma = honest.std(dim=0, unbiased=True) if honest.shape[0] > 1 else torch.zeros_like(mu)

    def byz(a: float) -> torch.Tensor:
        return mu + a * sigma if attack == "alie" else (1.0 - a) * mu

    def objective(a: float) -> float:
        stack = torch.cat([honest, byz(a).expand(f, -1)], dim=0) if f > 0 else honest
        gap = mix(stack) - mu
        return float(gap.double().dot(gap.double()))

    a = line_maximize(objective, evals=evals)
    vectors = {"mu": mu, "sigma": sigma} if attack == "alie" else {"mu": mu}
    return AttackPlan(attack, vectors, {"a": float(a)})
