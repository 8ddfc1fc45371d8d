"""GGEUR's edge side: class statistics of the frozen backbone's embeddings, geometry-guided augmentation,
then local SGD of the head on the originals plus the synthetic embeddings.

The task's `stage` says what to do:
- `census`: upload `counts` (C,), how many local samples each class has (the coordinator picks guides).
- `stats`: for the classes in config `classes`, upload `classes` (k,), `n` (k,), `mean` (k, d) and `cov`
  (k, d(d+1)/2), the packed upper triangle of the biased covariance (divided by n) of each class's
  embeddings (`fedfleet.edge_agent.class_stats`).
- `geometry`: the task carries, per class, the global eigenvectors `g.xi` (k, d, d) and eigenvalues `g.lam`
  (k, d) with `g.classes` (k,) and the per-class targets `g.target` (k,) (in the multi-domain variant also
  `g.proto_classes` (m,) and the other domains' prototypes `g.protos` (m, d)). The learner draws the
  synthetic embeddings once, keeps them for the training rounds, and uploads `synthetic` (C,), how many
  points it made per class. A training task may carry the same tensors (an agent that missed this stage).
- `train`: FedAvg's local SGD (`fedfleet.edge_agent.learners.fedavg.local_sgd`, softmax cross-entropy on the logits)
  from the broadcast head over the originals plus the synthetic points; uploads the head delta.

Single-domain generation (spec 4a.5), for each class c present locally with n_cur originals and target T:
need = T - n_cur; if n_cur >= need, one point around each of `need` distinct originals; otherwise s points
around every original (s = 5000 if n_cur < 10 else 500 when C <= 10; 500 / 50 when C > 10) and `need` of
them kept at random, drawn here as `need` distinct slots of the n_cur * s pool. Each point is
x' = x + Xi Lambda^(1/2) z. Classes absent locally stay absent (as in the reference).

Multi-domain generation (spec 4a, one client per domain), for each class with geometry: `per_sample` points
around every original of which `local_pool` are kept, plus `proto_pool` points around each other domain's
prototype; the originals are kept (subsampled to the target if there are more) and the set is filled up
to the target from the pool. No eigenvalue rescale. Numpy only.

Bounded whatever the task says (issue 28): the synthetic set never exceeds `MAX_SYNTHETIC_BYTES` (float32
points of the embedding's width); when the targets ask for more, every class's share is scaled down alike
(`budget`), so a lying census cannot make the geometry step exhaust memory or time. The candidate pool is
drawn as slots, never materialised.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent import class_stats
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, register
from fedfleet.edge_agent.learners.fedavg import local_sgd

GEOMETRY_PREFIX = "g."
MAX_SYNTHETIC_BYTES = 48 << 20  # the synthetic set's float32 bytes, at most (a Pi's service unit has 1 GB)


def budget(needs: dict[int, int], d: int) -> dict[int, int]:
    """`needs` (class -> points wanted, >= 0) scaled down alike to fit MAX_SYNTHETIC_BYTES of d-wide points."""
    cap = max(1, MAX_SYNTHETIC_BYTES // (4 * max(1, d)))
    total = sum(needs.values())
    if total <= cap:
        return dict(needs)
    return {c: int(n * (cap / total)) for c, n in needs.items()}


def draws_per_sample(n_cur: int, n_classes: int) -> int:
    """The reference's s: how many candidates around every original when they are fewer than needed."""
    if n_classes <= 10:
        return 5000 if n_cur < 10 else 500
    return 500 if n_cur < 10 else 50


def _slots(rng: np.random.Generator, n: int, s: int, need: int) -> np.ndarray:
    """Original index of `need` points kept at random from a pool of s draws around each of n originals."""
    pool = n * s
    return (rng.choice(pool, size=need, replace=need > pool) // s).astype(np.int64)


def single_domain(feats: np.ndarray, y: np.ndarray, geo: dict[int, tuple[np.ndarray, np.ndarray, int]],
                  n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    held = {c: int(np.count_nonzero(y == c)) for c in geo}
    needs = budget({c: max(0, int(t) - held[c]) if held[c] else 0 for c, (_, _, t) in geo.items()}, feats.shape[1])
    for c, (xi, lam, _) in sorted(geo.items()):
        xc = feats[y == c]
        n_cur = len(xc)
        need = needs[c]
        if n_cur == 0 or need <= 0:
            continue
        if n_cur >= need:
            base = xc[rng.choice(n_cur, size=need, replace=False)]
        else:
            base = xc[_slots(rng, n_cur, draws_per_sample(n_cur, n_classes), need)]
        xs.append(class_stats.perturb(base, xi, lam, rng))
        ys.append(np.full(need, c, np.int64))
    return _stack(xs, ys, feats.shape[1])


def multi_domain(feats: np.ndarray, y: np.ndarray, geo: dict[int, tuple[np.ndarray, np.ndarray, int]],
                 protos: dict[int, list[np.ndarray]], cfg: dict[str, Any],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(synthetic x, synthetic y, indices of the originals kept)."""
    per_sample, local_pool = int(cfg.get("per_sample", 12)), int(cfg.get("local_pool", 500))
    proto_pool = int(cfg.get("proto_pool", 500))
    keep = [np.flatnonzero(~np.isin(y, list(geo)))]  # classes without geometry: originals as they are
    xs, ys = [], []
    fills = budget({c: max(0, int(t)) for c, (_, _, t) in geo.items()}, feats.shape[1])
    n_protos = sum(len(v) for v in protos.values())
    proto_pool = min(proto_pool, max(1, MAX_SYNTHETIC_BYTES // (4 * max(1, feats.shape[1]) * max(1, n_protos))))
    for c, (xi, lam, _) in sorted(geo.items()):
        target = fills[c]
        idx = np.flatnonzero(y == c)
        if len(idx) >= target:  # more originals than the target: subsample them, nothing synthetic
            keep.append(np.sort(rng.choice(idx, size=int(target), replace=False)))
            continue
        keep.append(idx)
        pool = []
        if len(idx):
            n_local = min(local_pool, len(idx) * per_sample)
            pool.append(class_stats.perturb(feats[idx[_slots(rng, len(idx), per_sample, n_local)]], xi, lam, rng))
        for mu in protos.get(c, []):
            pool.append(class_stats.perturb(np.repeat(mu[None, :], proto_pool, axis=0), xi, lam, rng))
        if not pool:
            continue
        candidates = np.concatenate(pool)
        fill = min(int(target) - len(idx), len(candidates))
        xs.append(candidates[rng.choice(len(candidates), size=fill, replace=False)])
        ys.append(np.full(fill, c, np.int64))
    x_syn, y_syn = _stack(xs, ys, feats.shape[1])
    return x_syn, y_syn, np.sort(np.concatenate(keep))


def _stack(xs: list[np.ndarray], ys: list[np.ndarray], d: int) -> tuple[np.ndarray, np.ndarray]:
    if not xs:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def _int_array(values: np.ndarray, what: str) -> np.ndarray:
    out = np.rint(values).astype(np.int64)
    if not np.allclose(out, values):
        raise ConfigError(f"ggeur task: {what} must be whole numbers")
    return out


@register
class GGEURLearner(Learner):
    name = "ggeur"

    def __init__(self) -> None:
        self.synthetic: tuple[np.ndarray, np.ndarray] | None = None
        self.keep: np.ndarray | None = None  # originals trained on (None: all)

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        stage = cfg.get("stage")
        n_classes = int(cfg.get("n_classes", 0))
        rng = np.random.default_rng([int(cfg.get("seed", 0)), task.round, task.phase])
        if n_classes < 1:
            raise ConfigError("ggeur task: n_classes must be a positive integer")
        if len(data) and (data.y.min() < 0 or data.y.max() >= n_classes):
            raise ConfigError(f"ggeur: local labels must lie in [0, {n_classes}); got {data.y.min()}..{data.y.max()}")
        if stage == "census":
            counts = np.bincount(data.y, minlength=n_classes).astype(np.float32)
            return LearnResult({"counts": counts}, max(1, len(data)))
        feats = model.features(data.x, cache_key="local")
        if stage == "stats":
            classes = [int(c) for c in cfg.get("classes", [])]
            ns, means, covs = class_stats.class_stats(feats, data.y, classes)
            tri = class_stats.tri_size(feats.shape[1])
            packed = np.stack([class_stats.pack_upper(c) for c in covs]) if classes else np.zeros((0, tri))
            tensors = {"classes": np.asarray(classes, np.float32), "n": ns.astype(np.float32),
                       "mean": means.astype(np.float32), "cov": packed.astype(np.float32)}
            return LearnResult(tensors, max(1, int(ns.sum())))
        if stage == "geometry" or (stage == "train" and f"{GEOMETRY_PREFIX}classes" in task.tensors):
            made = self._augment(task, feats, data.y, n_classes, rng)
            if stage == "geometry":
                return LearnResult({"synthetic": made}, max(1, int(made.sum())), {"synthetic": float(made.sum())})
        if stage != "train":
            raise ConfigError(f"ggeur task stage must be census, stats, geometry or train, got {stage!r}")
        head = {k: v for k, v in task.tensors.items() if not k.startswith(GEOMETRY_PREFIX)}
        keep = np.arange(len(data)) if self.keep is None else self.keep
        x_train, y_train = feats[keep], data.y[keep]
        n_syn = 0
        if self.synthetic is not None and len(self.synthetic[1]):
            x_train = np.concatenate([x_train, self.synthetic[0]])
            y_train = np.concatenate([y_train, self.synthetic[1]])
            n_syn = len(self.synthetic[1])
        params, losses = local_sgd(head, x_train, y_train, cfg, rng)
        delta = {k: params[k] - head[k] for k in head}
        metrics = {"loss": float(np.mean(losses)) if losses else 0.0, "synthetic": float(n_syn)}
        return LearnResult(delta, max(1, len(y_train)), metrics)

    def _augment(self, task: Task, feats: np.ndarray, y: np.ndarray, n_classes: int,
                 rng: np.random.Generator) -> np.ndarray:
        """Draw and keep the synthetic embeddings; returns how many per class (C,)."""
        t = task.tensors
        p = GEOMETRY_PREFIX
        classes = _int_array(t[f"{p}classes"], "g.classes")
        targets = _int_array(t[f"{p}target"], "g.target")
        geo = {int(c): (t[f"{p}xi"][i], t[f"{p}lam"][i], int(targets[i])) for i, c in enumerate(classes)}
        if task.config.get("variant", "single") == "multi_domain":
            protos: dict[int, list[np.ndarray]] = {}
            for c, mu in zip(_int_array(t[f"{p}proto_classes"], "g.proto_classes"), t[f"{p}protos"]):
                protos.setdefault(int(c), []).append(mu)
            x_syn, y_syn, keep = multi_domain(feats, y, geo, protos, task.config, rng)
            self.keep = keep
        else:
            x_syn, y_syn = single_domain(feats, y, geo, n_classes, rng)
            self.keep = None
        self.synthetic = (x_syn, y_syn)
        return np.bincount(y_syn, minlength=n_classes).astype(np.float32)
