"""Client sampling: who takes part in a round, and FedAMD's anchor/miner roles.

- `uniform`: k agents uniformly without replacement.
- `availability_aware`: only agents that are online, drawn with probability proportional to an
  availability score (e.g. the profile's duty cycle); all online agents if fewer than k.
- `assign_roles`: FedAMD roles for the sampled agents, in constant mode (each agent independently an
  anchor with probability p; p = 1.0 really means "always anchor", p = 0 "never") or periodic mode
  (every agent an anchor when round % period == 0, otherwise every agent a miner).
- `optimal_p`: the p* = sqrt(4 r^2 + 2 r) - 2 r heuristic, r = M / A.

All randomness comes from a numpy `Generator(PCG64(...))` the caller seeds (`round_rng`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from fedfleet.edge_agent.errors import ConfigError

ANCHOR = "anchor"
MINER = "miner"

__all__ = ["ANCHOR", "MINER", "assign_roles", "availability_aware", "optimal_p", "round_rng", "uniform"]


def round_rng(seed: int, round: int, salt: int = 0) -> np.random.Generator:
    """The Generator for one round's draws: PCG64 seeded by (seed, round, salt)."""
    return np.random.Generator(np.random.PCG64([int(seed), int(round), int(salt)]))


def uniform(agents: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """k distinct agents drawn uniformly (all of them, in their order, when k >= len(agents))."""
    if k <= 0:
        raise ConfigError(f"participants per round must be >= 1, got {k}")
    agents = list(agents)
    if k >= len(agents):
        return agents
    idx = rng.choice(len(agents), size=k, replace=False)
    return [agents[i] for i in sorted(idx.tolist())]


def availability_aware(
    agents: Sequence[str],
    k: int,
    rng: np.random.Generator,
    *,
    online: Iterable[str] | None = None,
    availability: dict[str, float] | None = None,
) -> list[str]:
    """Up to k online agents, drawn without replacement with probability proportional to availability.

    `online=None` treats every agent as online; a missing availability score counts as 1.0.
    """
    if k <= 0:
        raise ConfigError(f"participants per round must be >= 1, got {k}")
    up = set(online) if online is not None else None
    pool = [a for a in agents if up is None or a in up]
    if len(pool) <= k:
        return pool
    scores = np.array([float((availability or {}).get(a, 1.0)) for a in pool])
    if np.any(scores < 0) or not np.all(np.isfinite(scores)):
        raise ConfigError("availability scores must be finite and >= 0")
    if scores.sum() <= 0:
        scores = np.ones_like(scores)
    positive = int((scores > 0).sum())
    if positive < k:  # not enough agents with a positive score: take them all, fill uniformly
        first = [a for a, s in zip(pool, scores) if s > 0]
        rest = [a for a, s in zip(pool, scores) if s <= 0]
        extra = rng.choice(len(rest), size=k - positive, replace=False).tolist()
        chosen = set(first) | {rest[i] for i in extra}
        return [a for a in pool if a in chosen]
    idx = rng.choice(len(pool), size=k, replace=False, p=scores / scores.sum())
    return [pool[i] for i in sorted(idx.tolist())]


def assign_roles(
    selected: Sequence[str],
    round: int,
    rng: np.random.Generator,
    *,
    mode: str = "constant",
    p: float | None = None,
    period: int | None = None,
) -> dict[str, str]:
    """FedAMD roles {agent: 'anchor' | 'miner'} for the agents sampled this round."""
    if mode == "constant":
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"fedamd constant mode needs an anchor probability p in [0, 1], got {p!r}")
        draws = rng.random(len(selected))
        return {a: (ANCHOR if u < float(p) else MINER) for a, u in zip(selected, draws)}
    if mode == "periodic":
        if isinstance(period, bool) or not isinstance(period, (int, float)) or int(period) != period or period < 2:
            raise ConfigError(f"fedamd field 'period' must be an integer >= 2 in periodic mode (period 1 makes "
                              f"every round all anchors, so the model never moves), got {period!r}")
        role = ANCHOR if round % int(period) == 0 else MINER
        return dict.fromkeys(selected, role)
    raise ConfigError(f"fedamd sampling mode must be 'constant' or 'periodic', got {mode!r}")


def optimal_p(clients: int, per_round: int) -> float:
    """p* = sqrt(4 r^2 + 2 r) - 2 r with r = M / A (0.472 for M = 20, A = 10)."""
    if clients < 1 or per_round < 1:
        raise ConfigError("optimal_p needs clients >= 1 and per_round >= 1")
    r = clients / per_round
    return math.sqrt(4 * r * r + 2 * r) - 2 * r
