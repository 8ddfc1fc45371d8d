"""GGEUR (geometry-guided embedding augmentation) on the coordinator: the one-shot statistics exchange,
then FedAvg of the head, broadcast to every agent every round.

The first round has four phases (later rounds only the last), each its own rows in the ledger:
0. `census`: every agent uploads its class counts n_{i,c} (C floats).
1. `stats`: for each class the guide clients are chosen: sorted by n_{i,c} descending and added until they
   hold `guide` (0.8) of the class's global count, or every holder when guide = "all" (always in the
   multi-domain variant). Each guide uploads n, mu and the packed upper triangle of Sigma (biased) for the
   classes it guides. The strategy checks every upload (`check`): a class outside [0, C) or not the one
   asked for, a negative n or one that differs from the census, or a covariance that is not positive
   semi-definite beyond round-off is refused with a `rejected:<reason>` row; wrong shapes and non-finite
   values are refused by the engine. The class's statistics are pooled exactly over the guides that passed
   (`fedfleet.edge_agent.class_stats.pool`), eigendecomposed with torch.linalg.eigh, negative eigenvalues clipped to
   0 and shrunk towards their mean (`shrinkage`, 0.1).
2. `geometry`: each agent gets (Xi, Lambda) for the classes it holds (every class with statistics in the
   multi-domain variant, plus the other domains' class prototypes) and the per-class target (`target`:
   "global" = the class's global count from the census, as the reference, or a number); it draws its
   synthetic embeddings once and reports how many.
3. `train`: FedAvg on the head over the originals plus the synthetic points: the global head goes to every
   agent every round (the reference scripts never send it back), the sample-weighted mean of the deltas
   is added. An agent that missed the geometry phase or lost its synthetic set (a restart) gets the
   geometry again with its next training task.

Against a liar with one device key (issue 28): a census whose total exceeds the samples the agent claims
(under its announcement at selection) is refused (`rejected:census_bound`); a census above the phase's weight
cap (the fleet's low median times the cap: label skew makes honest big agents) is scaled down to the cap, each
class it holds kept at 1 or more (`capped_census`), and its statistics are pooled with those capped counts, so
no agent becomes every class's guide or sets a class's target by a claim; each guide's
statistics are bounded when the stats phase closes (`screen`) against robust references over every upload of
the phase (the low median of the covariance traces over classes of two samples or more, since one sample's
covariance is 0, and of the mean norms, times `stats_bound`) and against
absolute bounds (`MAX_TRACE`, `MAX_MEAN`) that hold with one upload (`rejected:stats_bound`); the synthetic
counts an agent reports are capped at what its geometry lets it make (the class targets minus its census
counts), so the training weight is the capped sample count plus at most that.

If the census brings nothing back the exchange is retried the next round. Privacy: a class mean and
covariance say something about a device's data (its class balance, the spread of its embeddings, with few
samples close to the samples themselves); the exchange is opt-in by choosing this method.

Config: stats_bound (100), guide (0.8 | "all"), variant ("single" | "multi_domain"), shrinkage (0.1), target ("global" | int),
per_sample (12), local_pool (500), proto_pool (500) for the multi-domain variant, psd_tol (1e-6), and
FedAvg's lr (0.1), epochs (5), batch (16), weight_decay (0), server_lr (1.0), seed, uplink.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedfleet.coordinator.strategies._config import AT_LEAST_1, FRACTION, own, ranged
from fedfleet.coordinator.strategies._robust import low_median
from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    layout_of,
    orthonormal_columns,
    register,
    task_seed,
    to_numpy,
)
from fedfleet.edge_agent import class_stats
from fedfleet.edge_agent.errors import ConfigError, ProtocolError, Refusal

log = logging.getLogger("fedfleet.ggeur")

EXCHANGE = ("census", "stats", "geometry", "train")
MAX_TRACE = 1e8  # absolute bound on an uploaded class covariance's trace (embeddings are O(1..100) per entry)
MAX_MEAN = 1e5  # absolute bound on an uploaded class mean's L2 norm
VARIANTS = ("single", "multi_domain")


def _whole(values: np.ndarray) -> np.ndarray | None:
    out = np.rint(values)
    return out.astype(np.int64) if np.allclose(out, values, atol=1e-6) else None


def capped_census(counts: np.ndarray, weight: int) -> np.ndarray:
    """An agent's census under its capped weight: scaled down when its total exceeds `weight` (the update
    guard's cap), every class it holds kept at 1 or more, so a big honest agent (label skew) is counted, not
    refused, and one liar's census weighs at most the cap (plus one per class)."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total <= max(int(weight), 0) or total == 0:
        return counts
    scaled = np.floor(counts.astype(np.float64) * (float(weight) / total)).astype(np.int64)
    return np.where(counts > 0, np.maximum(scaled, 1), 0)



@dataclass(frozen=True)
class Config:
    """GGEUR's [method] fields (spec 4): the one-shot class-statistics exchange, then FedAvg of a linear head
    on the originals plus the synthetic embeddings; 5 local epochs as the spec's small-scale setup; lr and
    batch as fedavg's."""

    lr: float = 0.1  # local SGD learning rate
    epochs: int = 5  # local epochs per round
    batch: int = 16  # local minibatch size
    guide: float | Literal["all"] = ranged(0.8, check=(lambda v: 0 < v <= 1, "a fraction in (0, 1] or 'all'"))
    shrinkage: float = ranged(0.1, check=FRACTION)  # of the eigenvalues towards their mean
    target: int | Literal["global"] = ranged("global", check=(lambda v: v >= 1, "'global' or a positive integer"))
    variant: Literal["single", "multi_domain"] = own("single")
    per_sample: int = own(12, check=AT_LEAST_1)  # synthetic points per original
    local_pool: int = own(500, check=AT_LEAST_1)  # multi-domain variant
    proto_pool: int = own(500, check=AT_LEAST_1)  # multi-domain variant
    psd_tol: float = own(class_stats.PSD_TOL)  # round-off allowed below 0 in an uploaded covariance
    weight_decay: float = own(0.0)  # the learner's L2 weight decay
    server_lr: float = own(1.0)  # scale of the averaged delta
    stats_bound: float = own(100.0, check=(lambda v: v >= 1, "a number >= 1"))  # x the phase's low-median trace


@register
class GGEURStrategy(Strategy):
    name = "ggeur"
    Config = Config
    learner = "ggeur"
    linear_head = True

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        self.layout = layout_of(self.state)
        layers = sum(1 for k in self.state if k.endswith(".weight"))
        self.n_classes = int(self.state[f"fc{layers - 1}.bias"].shape[0])
        self.dim = int(self.state["fc0.weight"].shape[1])
        self.variant = str(self.settings.variant)
        if self.variant not in VARIANTS:
            raise ConfigError(f"ggeur: field 'variant' must be one of {VARIANTS}, got {self.variant!r}")
        guide = self.settings.guide
        if guide != "all" and (isinstance(guide, bool) or not isinstance(guide, (int, float)) or not 0 < guide <= 1):
            raise ConfigError(f"ggeur: field 'guide' must be a fraction in (0, 1] or 'all', got {guide!r}")
        self.guide = 1.0 if guide == "all" or self.variant == "multi_domain" else float(guide)
        self.shrinkage = float(self.settings.shrinkage)
        if not 0 <= self.shrinkage <= 1:
            raise ConfigError(f"ggeur: field 'shrinkage' must be in [0, 1], got {self.shrinkage}")
        self.target = self.settings.target
        if self.target != "global" and (isinstance(self.target, bool) or not isinstance(self.target, int)
                                        or self.target < 1):
            raise ConfigError(f"ggeur: field 'target' must be 'global' or a positive integer, got {self.target!r}")
        for key in ("per_sample", "local_pool", "proto_pool", "epochs", "batch"):
            v = config.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ggeur: field '{key}' must be a positive integer, got {v!r}")
        self.psd_tol = float(self.settings.psd_tol)
        self.seed = int(config.get("seed", 0))
        self.exchange_done = False
        self.counts: dict[str, np.ndarray] = {}  # census: agent -> n_{i,c}, capped by the agent's weight
        self.census: dict[str, np.ndarray] = {}  # the census as sent (the statistics' n must equal it)
        self.requests: dict[str, list[int]] = {}  # agent -> classes it guides
        self.parsed: dict[str, dict[int, tuple[float, np.ndarray, np.ndarray]]] = {}  # checked stats uploads
        self.geometry: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}  # class -> (Xi, Lambda, N)
        self.delivered: dict[str, int] = {}  # agent -> synthetic points it holds
        self.exchange_log: list[tuple[int, int, str]] = []  # (round, phase, stage) of the exchange phases
        self.note: dict[str, float] = {}
        self._stages: tuple[str, ...] = ("train",)
        self._attached: set[str] = set()  # agents whose training task carries the geometry this round

    # the first round runs the exchange, later rounds only train
    @property  # type: ignore[override]
    def phases(self) -> int:
        return 1 if self.exchange_done else len(EXCHANGE)

    def stage(self, phase: int) -> str:
        return self._stages[phase] if phase < len(self._stages) else "train"

    def update_kind(self, phase: int) -> str:
        """Only training uploads an update for the shared norm bound; the exchange's counts and statistics
        are not updates (their own checks are in `check`)."""
        return "delta" if self.stage(phase) == "train" else "none"

    # ------------------------------------------------------------------ tasks
    def _base(self, stage: str, round: int, phase: int, agent: str) -> dict[str, Any]:
        return {"stage": stage, "n_classes": self.n_classes, "variant": self.variant,
                "seed": task_seed(self.seed, round, phase, agent)}

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        if phase == 0:
            self._stages = ("train",) if self.exchange_done else EXCHANGE
        stage = self.stage(phase)
        if stage != "train":
            self.exchange_log.append((round, phase, stage))
        none = {"name": "none"}  # statistics travel losslessly
        if stage == "census":
            return {a: TaskSpec(self._base(stage, round, phase, a), {}, [("counts", (self.n_classes,))], none)
                    for a in agents}
        if stage == "stats":
            out = {}
            for a in agents:
                classes = self.requests.get(a)
                if not classes:
                    continue
                k, t = len(classes), class_stats.tri_size(self.dim)
                expect = [("classes", (k,)), ("n", (k,)), ("mean", (k, self.dim)), ("cov", (k, t))]
                out[a] = TaskSpec({**self._base(stage, round, phase, a), "classes": classes}, {}, expect, none)
            return out
        if stage == "geometry":
            out = {}
            for a in agents:
                tensors = self.geometry_for(a)
                if tensors:
                    out[a] = TaskSpec({**self._base(stage, round, phase, a), **self._augment_config()}, tensors,
                                      [("synthetic", (self.n_classes,))], none)
            return out
        head = to_numpy(self.state)
        cfg = {k: self.config[k] for k in ("lr", "epochs", "batch", "weight_decay") if k in self.config}
        uplink = dict(self.config.get("uplink", none))
        out = {}
        self._attached = set()
        for a in agents:
            tensors = dict(head)
            geometry = self.geometry_for(a) if a in self.counts and a not in self.delivered else {}
            if geometry:
                tensors.update(geometry)
                self._attached.add(a)
            out[a] = TaskSpec({**self._base(stage, round, phase, a), **cfg, **self._augment_config()}, tensors,
                              self.layout, uplink)
        return out

    def _augment_config(self) -> dict[str, Any]:
        return {k: self.config[k] for k in ("per_sample", "local_pool", "proto_pool") if k in self.config}

    def classes_for(self, agent: str) -> list[int]:
        if self.variant == "multi_domain":
            return sorted(self.geometry)
        counts = self.counts.get(agent)
        return [] if counts is None else [c for c in sorted(self.geometry) if counts[c] > 0]

    def geometry_for(self, agent: str) -> dict[str, np.ndarray]:
        """The `g.*` tensors for one agent ({} if it holds no class with statistics)."""
        classes = self.classes_for(agent)
        if not classes:
            return {}
        totals = self.global_counts()
        targets = [totals[c] if self.target == "global" else self.target for c in classes]
        out = {
            "g.classes": np.asarray(classes, np.float32),
            "g.xi": np.stack([self.geometry[c][0] for c in classes]).astype(np.float32),
            "g.lam": np.stack([self.geometry[c][1] for c in classes]).astype(np.float32),
            "g.target": np.asarray(targets, np.float32),
        }
        if self.variant == "multi_domain":
            rows = [(c, mu) for other, stats in sorted(self.parsed.items()) if other != agent
                    for c, (_, mu, _) in sorted(stats.items()) if c in classes]
            out["g.proto_classes"] = np.asarray([c for c, _ in rows], np.float32)
            out["g.protos"] = (np.stack([mu for _, mu in rows]) if rows else np.zeros((0, self.dim))).astype(np.float32)
        return out

    def global_counts(self) -> np.ndarray:
        return np.sum(list(self.counts.values()), axis=0) if self.counts else np.zeros(self.n_classes)

    # ------------------------------------------------------------------ checks on receipt
    def check(self, round: int, phase: int, result: ClientResult) -> None:
        stage = self.stage(phase)
        t = result.tensors
        if stage == "census":
            counts = t["counts"]
            if (counts < 0).any():
                raise ProtocolError("negative_n", f"census count {float(counts.min())} < 0")
            if _whole(counts) is None:
                raise ProtocolError("malformed", "census counts must be whole numbers")
            # an honest agent's census adds up to its samples: beyond what it claims (under what it announced) it
            # is a lie. Beyond the phase's weight cap it is not (label skew makes big agents); the census is then
            # capped in `aggregate`, not refused
            held = float(result.metrics.get("_samples_uncapped", result.samples))
            if float(counts.astype(np.float64).sum()) > held:
                raise ProtocolError("census_bound", f"census total {float(counts.astype(np.float64).sum()):.6g} "
                                                    f"exceeds the agent's samples {held:.6g}")
        elif stage == "stats":
            self.parsed[result.agent] = self._check_stats(result.agent, t)
        elif stage == "geometry":
            if (t["synthetic"] < 0).any() or _whole(t["synthetic"]) is None:
                raise ProtocolError("malformed", "synthetic counts must be whole numbers >= 0")

    def _check_stats(self, agent: str, t: dict[str, np.ndarray]) -> dict[int, tuple[float, np.ndarray, np.ndarray]]:
        classes = _whole(t["classes"])
        if classes is None or (classes < 0).any() or (classes >= self.n_classes).any():
            raise ProtocolError("unknown_class", f"classes {t['classes'].tolist()[:10]} are not labels in "
                                                 f"[0, {self.n_classes})")
        if classes.tolist() != self.requests.get(agent):
            raise ProtocolError("class_mismatch", f"sent classes {classes.tolist()}, asked for {self.requests.get(agent)}")
        n = t["n"]
        if (n < 0).any():
            raise ProtocolError("negative_n", f"n = {float(n.min())} < 0")
        census = self.census.get(agent, self.counts[agent])[classes]
        if _whole(n) is None or not np.array_equal(_whole(n), census.astype(np.int64)):
            raise ProtocolError("n_mismatch", f"n = {n.tolist()} differs from the census {census.tolist()}")
        out = {}
        for i, c in enumerate(classes.tolist()):
            try:
                cov = class_stats.check_covariance(class_stats.unpack_upper(t["cov"][i], self.dim), self.psd_tol)
            except class_stats.StatsError as exc:
                raise ProtocolError(exc.reason, f"class {c}: {exc.detail}") from None
            # pooled with the capped count: a big agent's statistics weigh what its capped census does
            out[c] = (float(self.counts[agent][c]), t["mean"][i].astype(np.float64), cov)
        return out

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        stage = self.stage(phase)
        if stage == "census":
            self.census = {r.agent: np.rint(r.tensors["counts"]).astype(np.int64) for r in results}
            self.counts = {r.agent: capped_census(self.census[r.agent], r.samples) for r in results}
            self.requests = {}
            for c in range(self.n_classes):
                for a in class_stats.guide_clients({a: n[c] for a, n in self.counts.items()}, self.guide):
                    self.requests.setdefault(a, []).append(c)
            self.parsed = {}
            self.note = {"census": float(len(results))}
        elif stage == "stats":
            self._pool({r.agent for r in results})
        elif stage == "geometry":
            for r in results:
                self.delivered[r.agent] = self._capped_synthetic(r.agent, r.tensors["synthetic"].sum())
            self.note["synthetic"] = float(sum(self.delivered.values()))
        else:
            self._fedavg(results)

    def expected_synthetic(self, agent: str) -> int:
        """The most synthetic points `agent`'s geometry lets it make: per class it holds, the target minus its
        census count (the multi-domain variant may drop originals: up to the target), from the coordinator's
        own (capped) census."""
        counts = self.counts.get(agent)
        if counts is None:
            return 0
        totals = self.global_counts()
        out = 0
        for c in self.classes_for(agent):
            target = int(totals[c]) if self.target == "global" else int(self.target)
            out += target if self.variant == "multi_domain" else max(0, target - int(counts[c]))
        return out

    def _capped_synthetic(self, agent: str, reported: Any) -> int:
        """An agent's reported synthetic count (its word) under what the coordinator knows it can hold."""
        value = float(reported)
        if not np.isfinite(value) or value <= 0:
            return 0
        return int(min(value, self.expected_synthetic(agent)))

    def screen(self, round: int, phase: int, results: list[ClientResult]) -> list[tuple[ClientResult, str, str]]:
        """The stats phase's bound over every guide's upload: each class's covariance trace and mean norm against
        `stats_bound` times the low median over all uploads of the phase, and against MAX_TRACE and MAX_MEAN."""
        if self.stage(phase) != "stats":
            return []
        traces = {r.agent: [float(np.trace(cov)) for _, (_, _, cov) in sorted(self.parsed.get(r.agent, {}).items())]
                  for r in results}
        means = {r.agent: [float(np.linalg.norm(mu)) for _, (_, mu, _) in sorted(self.parsed.get(r.agent, {}).items())]
                 for r in results}
        # the trace reference: classes of two samples or more (one sample's covariance is 0: under label skew
        # most uploaded classes can be single samples, and their zeros would set a bound no real class meets)
        raw = {r.agent: self.census.get(r.agent, self.counts.get(r.agent)) for r in results}
        all_t = [float(np.trace(cov)) for r in results for c, (_, _, cov) in self.parsed.get(r.agent, {}).items()
                 if raw[r.agent] is not None and raw[r.agent][c] >= 2]
        all_t = [t for t in all_t if np.isfinite(t)]
        all_m = [m for v in means.values() for m in v if np.isfinite(m)]
        k = float(self.settings.stats_bound)
        t_lim = min(MAX_TRACE, k * max(low_median(all_t), 1e-6)) if all_t else MAX_TRACE
        m_lim = min(MAX_MEAN, k * max(low_median(all_m), 1e-3)) if all_m else MAX_MEAN
        out = []
        for r in results:
            t, m = max(traces[r.agent], default=0.0), max(means[r.agent], default=0.0)
            if not (np.isfinite(t) and t <= t_lim):
                out.append((r, Refusal.STATS_BOUND, f"covariance trace {t:.4g} exceeds the bound {t_lim:.4g}"))
            elif not (np.isfinite(m) and m <= m_lim):
                out.append((r, Refusal.STATS_BOUND, f"class mean norm {m:.4g} exceeds the bound {m_lim:.4g}"))
        return out

    def _pool(self, agents: set[str]) -> None:
        self.parsed = {a: s for a, s in self.parsed.items() if a in agents}
        self.geometry = {}
        for c in range(self.n_classes):
            parts = [s[c] for _, s in sorted(self.parsed.items()) if c in s and s[c][0] > 0]
            if not parts:
                continue
            total, _, cov = class_stats.pool([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
            lam, xi = torch.linalg.eigh(torch.from_numpy(cov))
            lam_s = class_stats.shrink_spectrum(lam.numpy(), self.shrinkage)
            self.geometry[c] = (xi.numpy(), lam_s, total)
        self.exchange_done = bool(self.geometry)
        self.note.update(stats=float(len(self.parsed)), classes=float(len(self.geometry)))
        if not self.exchange_done:
            log.warning("ggeur: no class statistics arrived; the exchange runs again next round")

    def _fedavg(self, results: list[ClientResult]) -> None:
        for r in results:
            made = self._capped_synthetic(r.agent, r.metrics.get("synthetic", 0))
            if made > 0 or r.agent in self._attached:
                self.delivered[r.agent] = made
            elif self.delivered.get(r.agent, 0) > 0:
                del self.delivered[r.agent]  # it lost its synthetic set (a restart): the geometry goes again
        if not results:
            return
        # originals (the engine's capped count, coordinator-known) plus the synthetic points the agent holds
        weights = torch.tensor([float(r.samples + self.delivered.get(r.agent, 0)) for r in results])
        weights /= weights.sum()
        lr = float(self.settings.server_lr)
        for name in self.state:
            stack = torch.stack([torch.from_numpy(r.tensors[name]) for r in results])
            self.state[name] += lr * torch.tensordot(weights, stack, dims=1)

    def round_note(self) -> str:
        if not self.note:
            return ""
        n = self.note
        held = f"{int(sum(self.delivered.values()))} synthetic points on {sum(1 for v in self.delivered.values() if v)} agents"
        if self._stages == EXCHANGE:
            return (f"ggeur exchange: census {int(n.get('census', 0))}, statistics from {int(n.get('stats', 0))} "
                    f"guides, {int(n.get('classes', 0))} classes; {held}")
        return f"ggeur: {held}"

    def extra_state(self) -> dict[str, Any]:
        # tensors, not numpy arrays: checkpoints load with torch.load(weights_only=True)
        return {"counts": {a: torch.from_numpy(np.asarray(n).copy()) for a, n in self.counts.items()},
                "geometry": {c: (torch.from_numpy(np.asarray(xi).copy()), torch.from_numpy(np.asarray(lam).copy()),
                                 float(n)) for c, (xi, lam, n) in self.geometry.items()},
                "delivered": dict(self.delivered), "exchange_done": self.exchange_done}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore the census, the pooled geometry per class and what each agent holds, on resume. The geometry
        must be finite: per class an orthonormal (dim, dim) basis, dim non-negative eigenvalues and a count >= 1;
        the census per agent n_classes non-negative counts. An agent that lost its synthetic points with a
        restart says so in its next result and is sent the geometry again. Anything else is a ValueError."""
        counts, geometry, delivered = extra.get("counts"), extra.get("geometry"), extra.get("delivered")
        done = extra.get("exchange_done")
        if not (isinstance(counts, dict) and isinstance(geometry, dict) and isinstance(delivered, dict)
                and isinstance(done, bool)):
            raise ValueError("ggeur: the checkpoint's counts, geometry, delivered and exchange_done are malformed")

        def array(v: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
            a = np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v)
            if a.shape != shape or not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
                raise ValueError(f"ggeur: the checkpoint's {what} is not a finite array of shape {shape}")
            return a

        census = {}
        for a, n in counts.items():
            n = array(n, (self.n_classes,), f"census of {a!r}")
            if not isinstance(a, str) or (n < 0).any():
                raise ValueError("ggeur: the checkpoint's census holds a negative count or a non-text agent id")
            census[a] = n.astype(np.int64)
        pooled = {}
        for c, entry in geometry.items():
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.n_classes or not (
                    isinstance(entry, (tuple, list)) and len(entry) == 3):
                raise ValueError(f"ggeur: the checkpoint's geometry has an entry {c!r} that is not a class")
            xi = array(entry[0], (self.dim, self.dim), f"basis of class {c}").astype(np.float64)
            lam = array(entry[1], (self.dim,), f"spectrum of class {c}").astype(np.float64)
            total = entry[2]
            if (lam < 0).any() or isinstance(total, bool) or not isinstance(total, (int, float)) or not (
                    np.isfinite(total) and total >= 1):
                raise ValueError(f"ggeur: the checkpoint's spectrum or count of class {c} is out of range")
            if not orthonormal_columns(torch.from_numpy(xi)):
                raise ValueError(f"ggeur: the checkpoint's basis of class {c} is not orthonormal")
            pooled[c] = (xi, lam, float(total))
        if not all(isinstance(a, str) and isinstance(k, int) and not isinstance(k, bool) and k >= 0
                   for a, k in delivered.items()):
            raise ValueError("ggeur: the checkpoint's delivered counts are not non-negative integers per agent")
        if done != bool(pooled):
            raise ValueError("ggeur: the checkpoint's exchange_done does not match its geometry")
        self.counts, self.geometry, self.delivered, self.exchange_done = census, pooled, dict(delivered), done

