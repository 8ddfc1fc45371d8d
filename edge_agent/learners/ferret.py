"""Ferret's edge learner: T first-order local steps, then the update projected onto shared random bases.

Round r on the agent:
1. **Sync.** Rebuild w_(r-1) in the agent's own replica, kept per run. The task says how (`config["sync"]`):
   `full` (the task carries the global tensors) or `history` from a base round b: the agent starts from its
   replica if it holds round b or later, or from the package's initial tensors when b = 0, and applies each
   missed round's applied coefficients `coef.<j>` (L x K floats) with `random_bases.apply_step`. The result
   must hash to the coordinator's `digest` of w_(r-1), bit for bit; otherwise `ReplicaError` (no upload,
   so the coordinator sends the full model next time).
2. **Local steps.** T = `local_steps` minibatch SGD steps (`lr`, `batch`, no momentum, no weight decay) on
   the trainable tensors (the head in transfer mode, the whole MLP in full mode), with
   `fedfleet.edge_agent.nn.mlp.loss_and_grad`.
3. **Project.** Delta_l = w_(r-1,l) - w_(r,l) (old - new) per block; K_l = max(floor(K ||Delta_l|| /
   max_j ||Delta_j||), 2); K_l seed indices drawn without replacement; gamma_(l,k) = <Delta_l, v_(l,k)> /
   (rho_l K_l) (the paper's unbiased scaling). Bases are uniform on [-a, a], a = 1/sqrt(d_l), from
   Generator(PCG64) (see `fedfleet.edge_agent.random_bases`), cached per (seed, block) within `basis_cache_mb`.
4. **Upload** `gamma.<l>` (length K, zero where not chosen) through the `ferret` codec, which sends only
   the (index, gamma) pairs.

Config: k (100), pool ("round"), pool_seed, local_steps (10), lr (0.1), batch (32), seed, basis_cache_mb (64),
sync. Metrics: loss, pairs (sum_l K_l), synced_rounds, cache_peak_mb.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent import random_bases
from fedfleet.edge_agent.errors import ConfigError, FedfleetError
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, register
from fedfleet.edge_agent.nn import mlp

KEEP_RUNS = 2  # replicas of this many runs are kept; older ones are dropped


class ReplicaError(FedfleetError):
    """The agent cannot rebuild the coordinator's weights from what it holds (missing or diverged replica)."""


@register
class FerretLearner(Learner):
    name = "ferret"

    def __init__(self) -> None:
        self.replicas: dict[str, tuple[int, dict[str, np.ndarray]]] = {}  # run -> (round of w, w)
        self.cache: random_bases.BasisCache | None = None

    def _cache(self, cfg: dict[str, Any]) -> random_bases.BasisCache:
        budget = int(float(cfg.get("basis_cache_mb", 64)) * (1 << 20))
        if self.cache is None or self.cache.budget != budget:
            self.cache = random_bases.BasisCache(budget)
        return self.cache

    def sync(self, task: Task, model: Any, pool: random_bases.Pool, cache: random_bases.BasisCache) -> tuple[
            dict[str, np.ndarray], int]:
        """w_(r-1) for this task's run, and how many rounds of coefficients were applied to reach it."""
        sync = task.config.get("sync") or {}
        kind, target = sync.get("kind"), task.round - 1
        layout = [(str(n), tuple(int(d) for d in s)) for n, s in sync.get("layout", [])]
        if not layout:
            raise ConfigError("ferret task has no sync.layout")
        applied = 0
        if kind == "full":
            w = {n: np.asarray(task.tensors[n], np.float32).copy() for n, _ in layout}
        elif kind == "history":
            base = int(sync.get("base", -1))
            held = self.replicas.get(task.run)
            if held is not None and base <= held[0] <= target:
                start, w = held
            elif base == 0:
                start, w = 0, {n: np.asarray(model.head_init[n], np.float32).copy() for n, _ in layout}
            else:
                have = "no replica" if held is None else f"a replica of round {held[0]}"
                raise ReplicaError(f"run {task.run}: the task builds on round {base}, this agent has {have}")
            blocks = random_bases.split_blocks(layout)
            for j in sorted(int(x) for x in sync.get("rounds", [])):
                if j > start:
                    w = random_bases.apply_step(w, blocks, pool, j, task.tensors[f"coef.{j}"], cache)
                    applied += 1
        else:
            raise ConfigError(f"ferret sync kind must be 'full' or 'history', got {kind!r}")
        got = random_bases.digest(w, layout)
        if got != sync.get("digest"):
            self.replicas.pop(task.run, None)
            raise ReplicaError(f"run {task.run}: rebuilt weights of round {target} hash to {got}, the coordinator's "
                               f"to {sync.get('digest')}")
        self.replicas[task.run] = (target, w)
        for old in list(self.replicas)[:-KEEP_RUNS]:
            del self.replicas[old]
        return w, applied

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        pool = random_bases.Pool.from_config(cfg)
        steps, lr, batch = int(cfg.get("local_steps", 10)), float(cfg.get("lr", 0.1)), int(cfg.get("batch", 32))
        if steps < 1 or batch < 1 or lr <= 0:
            raise ConfigError(f"ferret needs local_steps, batch >= 1 and lr > 0; got {steps}, {batch}, {lr}")
        cache = self._cache(cfg)
        w, applied = self.sync(task, model, pool, cache)
        layout = [(n, tuple(v.shape)) for n, v in w.items()]
        rng = np.random.default_rng([int(cfg.get("seed", 0)), task.round])
        feats = model.features(data.x, cache_key="local")
        local = {n: v.copy() for n, v in w.items()}
        order, pos, losses = rng.permutation(len(data)), 0, []
        for _ in range(steps):
            if pos + batch > len(order) and pos > 0:
                order, pos = rng.permutation(len(data)), 0
            idx = order[pos : pos + batch]
            pos += batch
            value, grads = mlp.loss_and_grad(local, feats[idx], data.y[idx])
            losses.append(value)
            for n in local:
                local[n] -= lr * grads[n]
        delta = {n: w[n] - local[n] for n in w}  # old - new: the server subtracts
        blocks = random_bases.split_blocks(layout)
        flats = [random_bases.flat_block(delta, b) for b in blocks]
        k_l = random_bases.block_sizes_k(np.array([np.linalg.norm(f) for f in flats]), pool.k)
        out: dict[str, np.ndarray] = {}
        for b, flat, kb in zip(blocks, flats, k_l):
            ks = np.sort(rng.choice(pool.k, size=int(kb), replace=False))
            gamma = np.zeros(pool.k, np.float32)
            gamma[ks] = random_bases.project(flat, pool, task.round, b, ks, cache)
            out[f"gamma.{b.index}"] = gamma
        metrics = {"loss": float(np.mean(losses)), "pairs": float(k_l.sum()), "synced_rounds": float(applied),
                   "cache_peak_mb": cache.peak / (1 << 20)}
        return LearnResult(out, len(data), metrics)
