"""Ferret's shared randomness: the block split, the random bases, projection onto them and reconstruction.

Both sides import this module (the coordinator may import `edge_agent`, never the reverse), so the agent
and the coordinator draw the very same bases and rebuild the very same weights.

- **Blocks.** The trainable tensors are walked in layout order; a new block starts whenever adding the next
  tensor would pass 0.9 x the median tensor size (`split_blocks`). For an MLP this puts almost every tensor
  in a block of its own: digits 64-32-10 gives [fc0.weight 2048], [fc0.bias 32], [fc1.weight 320],
  [fc1.bias 10]; mnist 784-128-10 gives blocks of 100,352, 128, 1,280 and 10. (The method notes' digits
  example, [W1] and [the rest = 362], does not follow from the rule as stated: the median tensor size is
  176, and 32 + 320 already passes 0.9 x 176. The rule is followed here.)
- **Bases.** Block l has a pool of K bases v_(l,0..K-1) in R^(d_l). Basis k of block l for pool tag t is
  drawn with `numpy.random.Generator(PCG64(SeedSequence([seed, t, l, k])))` as float32 entries i.i.d.
  **uniform on [-a, a)** with a = 1/sqrt(d_l) (the spec's exact, cheap substitute for the truncated normal),
  so E[v v^T] = rho_l I with rho_l = a^2 / 3 = 1 / (3 d_l). The tag t is the round for a pool drawn fresh
  every round, 0 for a pool fixed for the run (`Pool.tag`).
- **Projection (paper, unbiased).** gamma_(l,k) = <Delta_l, v_(l,k)> / (rho_l K_l), so that
  Delta~_l = sum_k gamma_(l,k) v_(l,k) has E[Delta~_l] = Delta_l over the draw of the bases.
- **Reconstruction** `apply_step`: w_l <- w_l - sum_k a_(l,k) v_(l,k) for the applied coefficients a (the
  coordinator's server learning rate and clip already folded in). It is a sequential float32
  multiply-add over k, with no BLAS reduction, so every platform gets the same bits; `digest` hashes
  weights so the agent can check that its replica equals the coordinator's.
- **Cache.** `BasisCache` keeps bases per (seed, tag, block, k) up to a byte budget; a new round's bases
  evict older rounds' (oldest first), and what still does not fit is regenerated whenever needed. Generation and projection go in chunks of `CHUNK` bases, so
  memory stays bounded when nothing is cached.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError

Layout = list[tuple[str, tuple[int, ...]]]
Tensors = dict[str, np.ndarray]
CHUNK = 16  # bases generated and multiplied at a time
MAX_K = 65535  # indices travel as 2-byte unsigned integers


@dataclass(frozen=True)
class Block:
    index: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    size: int

    @property
    def rho(self) -> float:
        """Variance of one basis entry: a^2 / 3 with a = 1/sqrt(d_l)."""
        return 1.0 / (3.0 * self.size)


@dataclass(frozen=True)
class Pool:
    """The shared seed pool: K bases per block, drawn from `seed`, fresh every round or fixed for the run."""

    seed: int
    k: int
    fresh: bool = True

    def tag(self, round: int) -> int:
        return int(round) if self.fresh else 0

    def to_config(self) -> dict[str, Any]:
        return {"pool_seed": self.seed, "k": self.k, "pool": "round" if self.fresh else "run"}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Pool:
        k, pool, seed = cfg.get("k", 100), cfg.get("pool", "round"), cfg.get("pool_seed", 0)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ConfigError(f"ferret field 'k' must be an integer in [1, {MAX_K}], got {k!r}")
        if pool not in ("round", "run"):
            raise ConfigError(f"ferret field 'pool' must be 'round' (fresh bases each round) or 'run', got {pool!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"ferret field 'pool_seed' must be an integer >= 0, got {seed!r}")
        return cls(int(seed), int(k), pool == "round")


def split_blocks(layout: Layout) -> list[Block]:
    """Blocks in layout order: a new block starts when adding the next tensor would pass 0.9 x median size."""
    if not layout:
        raise ConfigError("ferret needs at least one trainable tensor")
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in layout]
    limit = 0.9 * float(np.median(sizes))
    groups: list[list[int]] = []
    current = 0
    for i, n in enumerate(sizes):
        if groups and current + n <= limit:
            groups[-1].append(i)
            current += n
        else:
            groups.append([i])
            current = n
    return [Block(b, tuple(layout[i][0] for i in g), tuple(layout[i][1] for i in g), sum(sizes[i] for i in g))
            for b, g in enumerate(groups)]


def flat_block(tensors: Tensors, block: Block) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[n], np.float32).ravel() for n in block.names])


def unflat_block(vec: np.ndarray, block: Block) -> Tensors:
    out: Tensors = {}
    offset = 0
    for name, shape in zip(block.names, block.shapes):
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = vec[offset : offset + n].reshape(shape).astype(np.float32, copy=True)
        offset += n
    return out


def basis(pool: Pool, round: int, block: Block, k: int) -> np.ndarray:
    """Basis k of `block` for `round`: float32, i.i.d. uniform on [-a, a) with a = 1/sqrt(d_l)."""
    ss = np.random.SeedSequence([pool.seed, pool.tag(round), block.index, int(k)])
    u = np.random.Generator(np.random.PCG64(ss)).random(block.size, dtype=np.float32)
    a = np.float32(1.0 / np.sqrt(block.size))
    return (u * np.float32(2.0) - np.float32(1.0)) * a


class BasisCache:
    """Bases kept per (seed, tag, block, k) within `budget_bytes` (0: never cache); other rounds' bases are
    evicted first, and a basis that still does not fit is not kept (regenerated on each use)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        self.used = 0
        self.peak = 0
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()

    def __deepcopy__(self, memo: dict[int, object]) -> BasisCache:
        """A snapshot of the agent's state (fedfleet.edge_agent.run_state) carries no bases: they are regenerated."""
        return BasisCache(self.budget)

    def get(self, pool: Pool, round: int, block: Block, k: int) -> np.ndarray:
        key = (pool.seed, pool.tag(round), block.index, int(k))
        hit = self._store.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        v = basis(pool, round, block, k)
        if self.used + v.nbytes > self.budget:  # make room from other pools or rounds, oldest first
            for other in [x for x in self._store if x[:2] != key[:2]]:
                if self.used + v.nbytes <= self.budget:
                    break
                self.used -= self._store.pop(other).nbytes
        if self.used + v.nbytes <= self.budget:  # else: regenerate this one whenever it is needed
            self._store[key] = v
            self.used += v.nbytes
            self.peak = max(self.peak, self.used)
        return v

    def rows(self, pool: Pool, round: int, block: Block, ks: np.ndarray) -> np.ndarray:
        return np.stack([self.get(pool, round, block, int(k)) for k in ks])


def block_sizes_k(delta_norms: np.ndarray, k: int) -> np.ndarray:
    """K_l = max(floor(K * ||Delta_l|| / max_j ||Delta_j||), 2), at most K. All-zero updates give 2 each."""
    norms = np.asarray(delta_norms, np.float64)
    top = float(norms.max()) if norms.size else 0.0
    if not np.isfinite(top) or top <= 0.0:
        ratio = np.zeros_like(norms)
    else:
        ratio = np.where(np.isfinite(norms), norms / top, 0.0)
    return np.minimum(np.maximum(np.floor(k * ratio).astype(np.int64), 2), k)


def project(delta_l: np.ndarray, pool: Pool, round: int, block: Block, ks: np.ndarray,
            cache: BasisCache) -> np.ndarray:
    """gamma_(l,k) = <Delta_l, v_(l,k)> / (rho_l K_l) for the chosen indices `ks` (K_l = len(ks))."""
    ks = np.asarray(ks, np.int64)
    d = np.asarray(delta_l, np.float32)
    out = np.empty(len(ks), np.float64)
    for s in range(0, len(ks), CHUNK):
        out[s : s + CHUNK] = cache.rows(pool, round, block, ks[s : s + CHUNK]).astype(np.float64) @ d
    return out / (block.rho * max(len(ks), 1))


def reconstruct(coef_l: np.ndarray, pool: Pool, round: int, block: Block, cache: BasisCache) -> np.ndarray:
    """u_l = sum_k coef_(l,k) v_(l,k) in float32, k ascending over the nonzero coefficients, one multiply-add
    at a time (bit-identical on every platform)."""
    coef = np.asarray(coef_l, np.float32)
    u = np.zeros(block.size, np.float32)
    for k in np.flatnonzero(coef):
        u += coef[k] * cache.get(pool, round, block, int(k))
    return u


def apply_step(tensors: Tensors, blocks: list[Block], pool: Pool, round: int, applied: np.ndarray,
               cache: BasisCache) -> Tensors:
    """w_r = w_(r-1) - sum_(l,k) a_(l,k) v_(l,k) for the applied coefficients `applied` (L, K) of `round`."""
    applied = np.asarray(applied, np.float32)
    if applied.shape != (len(blocks), pool.k):
        raise ConfigError(f"ferret coefficients have shape {applied.shape}, expected {(len(blocks), pool.k)}")
    out = {n: np.asarray(t, np.float32).copy() for n, t in tensors.items()}
    for block in blocks:
        if not applied[block.index].any():
            continue
        w = flat_block(out, block) - reconstruct(applied[block.index], pool, round, block, cache)
        out.update(unflat_block(w, block))
    return out


def digest(tensors: Tensors, layout: Layout) -> str:
    """A short hash of the float32 bytes of `tensors` in layout order: equal digests mean equal weights."""
    h = hashlib.blake2b(digest_size=12)
    for name, _ in layout:
        h.update(np.ascontiguousarray(np.asarray(tensors[name], dtype="<f4")).tobytes())
    return h.hexdigest()
