"""Ferret on the coordinator: aggregate the agents' coefficients per seed, step, broadcast coefficients.

- **Seed pool.** By default (`pool = "round"`) the pool is drawn **fresh every round**: round r's bases
  come from (pool_seed, r, block, k), shared by every agent of the round, so per-seed aggregation still
  holds and, over the run, updates are not confined to one K-dimensional subspace per block (the paper's
  unbiasedness argument assumes fresh bases). `pool = "run"` fixes the pool for the whole run, as the
  reference code does. Basis maths: `fedfleet.edge_agent.random_bases`.
- **Scaling and server lr.** Agents use the paper's unbiased gamma = <Delta, v> / (rho K_l), so E[Delta~] =
  Delta and eta_s = `server_lr` = 1 is the FedAvg-equivalent step (the code's d/K scaling needs
  eta_s ~ 3x larger for the same step; it is not used here).
- **Aggregate before reconstructing.** c_(l,k) = beta c_(l,k) + sum_i p_i gamma^(i)_(l,k) (p_i by samples, or
  equal with `weighting = "equal"`; beta = `momentum`, 0 by default and allowed only with a fixed pool:
  coefficients of different rounds' bases do not add), optionally each seed's u = c v rescaled to norm
  `clip` if longer (0 = off; the reference code uses 10), then w <- w - eta_s sum_(l,k) c_(l,k) v_(l,k): one
  pass over the K bases of each block, O(K d), whatever the number of agents. Delta is old - new, so
  the server subtracts.
- **Downlink (the paper's variant).** The applied coefficients a = eta_s clip(c) of each round (L x K floats)
  are kept in `history`. An agent gets w_(r-1) as coefficient history from the last round it is known to
  hold (its last accepted result, or round 0 = the package's initial tensors), or as the full model when
  that is smaller, when `catch_up = "full"`, or when its last task brought no valid result (its replica
  may be gone). The weights' digest rides along so the agent checks its replica bit for bit.
  The coordinator updates its own weights with the same numpy `apply_step` the agents run.

Config: k (100), pool ("round" | "run"), pool_seed (the job seed), server_lr (1.0), clip (0), momentum (0),
weighting ("samples" | "equal"), catch_up ("auto" | "full" | "history"), local_steps (10), lr (0.1), batch
(32), basis_cache_mb (agents' budget, 64), coordinator_cache_mb (256), seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedfleet.coordinator.strategies._config import NON_NEGATIVE, own
from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    layout_of,
    register,
    task_seed,
)
from fedfleet.edge_agent import random_bases
from fedfleet.edge_agent.errors import ConfigError

LEARNER_KEYS = ("local_steps", "lr", "batch", "basis_cache_mb")


def _number(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ConfigError(f"ferret field '{key}' must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Config:
    """Ferret's [method] fields: T = 10 local SGD steps, K = 100 bases per block drawn fresh each round, the
    paper's unbiased scaling with server lr 1; uploads (index, gamma) pairs with its own codec, downlink
    coefficients."""

    k: int = 100  # bases per block
    pool: Literal["round", "run"] = "round"  # fresh bases every round, or one pool for the run
    local_steps: int = 10  # T, local SGD steps
    lr: float = 0.1  # local learning rate
    batch: int = 32  # local minibatch size
    server_lr: float = 1.0  # eta_s
    pool_seed: int | None = own(None)  # seed of the bases (None: the job seed)
    clip: float = own(0.0, check=NON_NEGATIVE)  # norm each seed's step is clipped to (0: off)
    momentum: float = own(0.0, check=(lambda v: 0 <= v < 1, "a number in [0, 1)"))  # needs pool = "run"
    weighting: Literal["samples", "equal"] = own("samples")
    catch_up: Literal["auto", "full", "history"] = own("auto")
    basis_cache_mb: float = own(64, check=NON_NEGATIVE)  # the agents' basis cache budget
    coordinator_cache_mb: float = own(256, check=NON_NEGATIVE)


@register
class Ferret(Strategy):
    name = "ferret"
    Config = Config
    learner = "ferret"

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        cfg = {"k": 100, "pool": "round", "pool_seed": int(config.get("seed", 0)), **config}
        self.pool = random_bases.Pool.from_config(cfg)
        self.server_lr = _number(config, "server_lr", 1.0)
        self.clip = _number(config, "clip", 0.0)
        self.momentum = _number(config, "momentum", 0.0)
        for key in ("local_steps", "batch"):
            if key in config and (isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1):
                raise ConfigError(f"ferret field '{key}' must be an integer >= 1, got {config[key]!r}")
        for key in ("lr", "basis_cache_mb", "coordinator_cache_mb"):
            if key in config and _number(config, key, 0.0) < 0:
                raise ConfigError(f"ferret field '{key}' must be a number >= 0, got {config[key]!r}")
        self.weighting = str(self.settings.weighting)
        self.catch_up = str(self.settings.catch_up)
        if self.server_lr <= 0 or self.clip < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"ferret needs server_lr > 0, clip >= 0 and momentum in [0, 1); got {config}")
        if self.momentum and self.pool.fresh:
            raise ConfigError("ferret field 'momentum' needs pool = 'run': fresh bases each round do not add up")
        if self.weighting not in ("samples", "equal"):
            raise ConfigError(f"ferret field 'weighting' must be 'samples' or 'equal', got {self.weighting!r}")
        if self.catch_up not in ("auto", "full", "history"):
            raise ConfigError(f"ferret field 'catch_up' must be 'auto', 'full' or 'history', got {self.catch_up!r}")
        uplink = (config.get("uplink") or {"name": "ferret"}).get("name")
        if uplink not in ("none", "ferret"):
            raise ConfigError(f"ferret uploads (index, gamma) pairs with its own codec; [uplink] {uplink!r} does not apply")
        self.layout = layout_of(self.state)
        self.blocks = random_bases.split_blocks(self.layout)
        self.d = sum(b.size for b in self.blocks)
        self.w = {n: v.numpy().astype(np.float32).copy() for n, v in self.state.items()}
        self.w_digest = random_bases.digest(self.w, self.layout)
        self.cache = random_bases.BasisCache(int(_number(config, "coordinator_cache_mb", 256) * (1 << 20)))
        self.c = np.zeros((len(self.blocks), self.pool.k), np.float64)
        self.history: dict[int, np.ndarray] = {}  # round -> applied coefficients (L, K) float32
        self.synced: dict[str, int] = {}  # agent -> round of the weights it is known to hold
        self.tasked: set[str] = set()
        self.sync_log: list[tuple[int, str, str, int]] = []  # (round, agent, kind, coefficient rounds sent)
        self.notes: list[dict[str, float]] = []

    def _sync(self, round: int, agent: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        base = self.synced.get(agent, 0)
        rounds = [j for j in sorted(self.history) if base < j < round]
        history_bytes = 4 * len(rounds) * len(self.blocks) * self.pool.k
        full = self.catch_up == "full" or (self.catch_up == "auto" and history_bytes >= 4 * self.d)
        sync = {"layout": [[n, list(s)] for n, s in self.layout], "digest": self.w_digest}
        if full:
            self.sync_log.append((round, agent, "full", 0))
            return {**sync, "kind": "full"}, {n: v.copy() for n, v in self.w.items()}
        self.sync_log.append((round, agent, "history", len(rounds)))
        return ({**sync, "kind": "history", "base": base, "rounds": rounds},
                {f"coef.{j}": self.history[j] for j in rounds})

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        common = {k: self.config[k] for k in LEARNER_KEYS if k in self.config}
        common.update(self.pool.to_config())
        seed = int(self.config.get("seed", 0))
        expect = [(f"gamma.{b.index}", (self.pool.k,)) for b in self.blocks]
        self.tasked = set(agents)
        out = {}
        for a in agents:
            sync, tensors = self._sync(round, a)
            cfg = {**common, "seed": task_seed(seed, round, phase, a), "sync": sync}
            out[a] = TaskSpec(config=cfg, tensors=tensors, expect=expect, uplink_codec={"name": "ferret"})
        return out

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        answered = {r.agent for r in results}
        for a in self.tasked:  # an agent whose task brought nothing valid may have lost its replica
            if a in answered:
                self.synced[a] = round - 1
            else:
                self.synced.pop(a, None)
        self.tasked = set()
        if not results:
            self.notes.append({"agents": 0.0, "pairs": 0.0, "clipped": 0.0})
            return
        if self.weighting == "equal":
            p = np.full(len(results), 1.0 / len(results))
        else:
            p = np.array([float(r.samples) for r in results])
            p /= p.sum()
        gam = np.stack([np.stack([r.tensors[f"gamma.{b.index}"] for b in self.blocks]) for r in results])
        self.c = self.momentum * self.c + np.tensordot(p, gam.astype(np.float64), axes=1)  # per seed, O(N K L)
        applied = self.server_lr * self.c
        clipped = 0
        if self.clip > 0:  # each seed's u = c v rescaled to norm `clip` if longer
            for b in self.blocks:
                for k in np.flatnonzero(applied[b.index]):
                    norm = abs(self.c[b.index, k]) * float(np.linalg.norm(self.cache.get(self.pool, round, b, k)))
                    if norm > self.clip:
                        applied[b.index, k] *= self.clip / norm
                        clipped += 1
        coef = applied.astype(np.float32)
        self.w = random_bases.apply_step(self.w, self.blocks, self.pool, round, coef, self.cache)
        self.w_digest = random_bases.digest(self.w, self.layout)
        self.history[round] = coef
        self.state = {n: torch.from_numpy(v.copy()) for n, v in self.w.items()}
        pairs = float(np.mean([r.metrics.get("pairs", 0.0) for r in results]))
        self.notes.append({"agents": float(len(results)), "pairs": pairs, "clipped": float(clipped)})

    def round_note(self) -> str:
        if not self.notes:
            return ""
        n = self.notes[-1]
        full = sum(1 for r, _, kind, _ in self.sync_log if kind == "full" and r == max(self.history, default=0))
        return (f"ferret K {self.pool.k}  {int(n['agents'])} agents  {n['pairs']:.0f} pairs/agent"
                + (f"  {int(n['clipped'])} seeds clipped" if self.clip else "") + (f"  {full} full syncs" if full else ""))

    def extra_state(self) -> dict[str, Any]:
        # tensors, not numpy arrays: checkpoints load with torch.load(weights_only=True)
        return {"history": {j: torch.from_numpy(c.copy()) for j, c in self.history.items()},
                "synced": dict(self.synced), "c": torch.from_numpy(self.c.copy()), "digest": self.w_digest}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore the applied coefficients per round and the momentum buffer on resume, and rebuild the weights
        from the restored state, which must match the checkpoint's digest. Agents are not trusted to hold the
        replica the checkpoint says they held (they may have restarted too): every agent's first task after a
        resume is a full sync. Anything malformed is a ValueError (a one-line refusal to resume)."""
        history, c, digest = extra.get("history"), extra.get("c"), extra.get("digest")
        shape = (len(self.blocks), self.pool.k)

        def coefficients(a: Any) -> np.ndarray:
            a = np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a)
            if a.shape != shape or not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
                raise ValueError(f"ferret: the checkpoint's coefficients are not finite ({shape[0]}, {shape[1]}) arrays")
            return a

        if not isinstance(history, dict) or not all(isinstance(j, int) and not isinstance(j, bool) and j >= 1
                                                    for j in history):
            raise ValueError("ferret: the checkpoint's history is not a table of rounds")
        restored = {j: coefficients(v).astype(np.float32) for j, v in history.items()}
        momentum = coefficients(c).astype(np.float64)
        w = {n: v.numpy().astype(np.float32).copy() for n, v in self.state.items()}
        if digest != random_bases.digest(w, self.layout):
            raise ValueError("ferret: the checkpoint's weights do not match its digest")
        self.history, self.c, self.w, self.w_digest = restored, momentum, w, digest
        self.synced = {}  # full syncs first
