"""Objectives for zeroth-order learners, each behind a query counter.

Owns:
- `Counted`: wraps any f(x) -> float and counts every call (the count goes to the ledger);
- the FZooS quadratic (`quadratic_coeffs`, `Quadratic`, `quadratic_optimum`) with its closed-form F*;
- `macro_f1` and `MacroF1Objective`: 1 − macro-F1 of a head on an agent's shard, for any
  logits function (numpy head over cached features, or the int8 runtime with the head as graph inputs);
- `VectorView`: the flat parameter vector x of a ZO method <-> a dict of named tensors.

A true gradient, where an objective has one, is a diagnostic only (cosine logging) and is never a query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedfleet.edge_agent.errors import ConfigError

Tensors = dict[str, np.ndarray]


class Counted:
    """f(x) -> float that counts its calls in `queries`."""

    def __init__(self, fn: Callable[[np.ndarray], float], grad: Callable[[np.ndarray], np.ndarray] | None = None):
        self._fn = fn
        self._grad = grad
        self.queries = 0

    def __call__(self, x: np.ndarray) -> float:
        self.queries += 1
        value = float(self._fn(np.asarray(x, np.float64)))
        if not np.isfinite(value):
            raise ValueError(f"objective returned {value} at query {self.queries}; check the model and data")
        return value

    @property
    def has_grad(self) -> bool:
        return self._grad is not None

    def true_grad(self, x: np.ndarray) -> np.ndarray:
        """The analytic gradient (diagnostics only, not counted). Raises if the objective has none."""
        if self._grad is None:
            raise ConfigError("this objective has no analytic gradient; it is a black box")
        return self._grad(np.asarray(x, np.float64))


# ---- the FZooS quadratic -------------------------------------------------------------------------


def quadratic_coeffs(d: int, agents: int, div: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """c1, c2 of shape (agents, d): 1 + div·(Dirichlet(1/N, ..., 1/N) − 1/N), one Dirichlet per coordinate."""
    if d < 1 or agents < 1:
        raise ConfigError(f"quadratic needs d >= 1 and agents >= 1, got d={d}, agents={agents}")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    alpha = np.full(agents, 1.0 / agents)
    c1 = 1.0 + div * (rng.dirichlet(alpha, size=d) - 1.0 / agents)
    c2 = 1.0 + div * (rng.dirichlet(alpha, size=d) - 1.0 / agents)
    return c1.T.copy(), c2.T.copy()


@dataclass
class Quadratic:
    """f(x) = (0.1/d)(c1·p² + c2·p + 1) with p = 20·clip(x, 0, 1) − 10; flat outside the unit box."""

    c1: np.ndarray
    c2: np.ndarray

    def __post_init__(self) -> None:
        self.c1 = np.asarray(self.c1, np.float64)
        self.c2 = np.asarray(self.c2, np.float64)
        if self.c1.shape != self.c2.shape or self.c1.ndim != 1:
            raise ConfigError(f"quadratic c1 and c2 must be equal-length vectors, got {self.c1.shape}, {self.c2.shape}")

    @property
    def d(self) -> int:
        return int(self.c1.shape[0])

    def __call__(self, x: np.ndarray) -> float:
        p = 20.0 * np.clip(x, 0.0, 1.0) - 10.0
        return float(0.1 / self.d * (self.c1 @ (p * p) + self.c2 @ p + 1.0))

    def grad(self, x: np.ndarray) -> np.ndarray:
        p = 20.0 * np.clip(x, 0.0, 1.0) - 10.0
        inside = (x > 0.0) & (x < 1.0)
        return 0.1 / self.d * 20.0 * (2.0 * self.c1 * p + self.c2) * inside


def global_quadratic(c1: np.ndarray, c2: np.ndarray, weights: np.ndarray) -> Quadratic:
    """F = Σ w_i f_i is again a quadratic, with the weighted coefficients (the +1 terms sum to 1)."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    return Quadratic(w @ c1, w @ c2)


def quadratic_optimum(q: Quadratic) -> tuple[np.ndarray, float]:
    """Closed-form minimiser and minimum: p* = clip(−c2/(2c1), −10, 10) per coordinate (c1 > 0)."""
    if np.any(q.c1 <= 0):
        raise ConfigError("closed-form optimum needs every c1 > 0; lower div below 1")
    p = np.clip(-q.c2 / (2.0 * q.c1), -10.0, 10.0)
    x = (p + 10.0) / 20.0
    return x, q(x)


# ---- macro-F1 ------------------------------------------------------------------------------------


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged F1 over the labels present in y_true or y_pred (scikit-learn's convention)."""
    y_true = np.asarray(y_true).astype(np.int64)
    y_pred = np.asarray(y_pred).astype(np.int64)
    if y_true.size == 0:
        return 0.0
    k = int(max(y_true.max(), y_pred.max())) + 1
    conf = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp = np.diag(conf).astype(np.float64)
    support = conf.sum(1)
    predicted = conf.sum(0)
    present = (support + predicted) > 0
    f1 = 2.0 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean())


class MacroF1Objective:
    """1 − macro-F1 of the labels argmax(logits_fn(tensors)) against y, for a flat parameter vector."""

    def __init__(self, logits_fn: Callable[[Tensors], np.ndarray], y: np.ndarray, view: VectorView):
        self.logits_fn = logits_fn
        self.y = np.asarray(y)
        self.view = view

    def __call__(self, x: np.ndarray) -> float:
        logits = self.logits_fn(self.view.unpack(x))
        return 1.0 - macro_f1(self.y, np.asarray(logits).argmax(axis=1))


# ---- flat vector <-> named tensors ---------------------------------------------------------------


class VectorView:
    """The ZO parameter vector is the concatenation of `names` (in order) from a template of tensors.

    `unpack` returns a full dict (the template's other tensors unchanged) with float32 values.
    """

    def __init__(self, template: Tensors, names: list[str]):
        missing = [n for n in names if n not in template]
        if missing:
            raise ConfigError(f"ZO tensors {missing} are not in the model's tensors {sorted(template)}")
        if not names:
            raise ConfigError("ZO needs at least one tensor to tune; set config['zo_tensors']")
        self.template = {k: np.asarray(v, np.float32) for k, v in template.items()}
        self.names = list(names)
        self.shapes = [self.template[n].shape for n in names]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.d = int(sum(self.sizes))

    def pack(self, tensors: Tensors) -> np.ndarray:
        return np.concatenate([np.asarray(tensors[n], np.float64).ravel() for n in self.names])

    def split(self, x: np.ndarray) -> Tensors:
        """Only the tuned tensors, float32."""
        out: Tensors = {}
        off = 0
        for n, shape, size in zip(self.names, self.shapes, self.sizes):
            out[n] = np.asarray(x[off : off + size], np.float32).reshape(shape)
            off += size
        return out

    def unpack(self, x: np.ndarray) -> Tensors:
        if x.shape != (self.d,):
            raise ConfigError(f"ZO vector has shape {x.shape}, expected ({self.d},)")
        full = dict(self.template)
        full.update(self.split(x))
        return full


def quadratic_configs(d: int, agents: int, div: float, seed: int) -> list[dict[str, object]]:
    """Per-agent task-config overlays {"objective": "quadratic", "c1", "c2"} for the FZooS quadratic."""
    c1, c2 = quadratic_coeffs(d, agents, div, seed)
    return [{"objective": "quadratic", "c1": c1[i].tolist(), "c2": c2[i].tolist()} for i in range(agents)]
