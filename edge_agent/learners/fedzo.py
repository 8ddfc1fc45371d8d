"""FedZO's edge learner (Fang et al. 2022): H local steps of plain SGD on a two-point random-direction
gradient estimate, uploading the delta x_H − x_0.

g = (1/b2) Σ_j (d/μ) [f(x + μ v_j) − f(x)] v_j with v_j uniform on the unit sphere (normalised Gaussians
from Generator(PCG64(config["seed"]))). Each step costs 1 + b2 queries; all are counted in
metrics["queries"].

Config: objective fields (see `fedfleet.edge_agent.zo.problem`), local_steps (H, 10), lr (0.05), mu (0.005),
directions (b2, 20), seed. Three options give the FZooS reference code's FedZO baseline (the defaults are the
spec's FedZO): optimizer ("sgd" | "adam", a fresh Adam each round, as FZooS's learner), basis ("sphere" |
"orthonormal": b2 <= d orthonormal directions, the QR of a Gaussian matrix) and scale ("d": the d/μ factor
above | "one": 1/μ, the reference's (1/q) Σ [f(x + μ u_j) − f(x)]/μ u_j).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, register
from fedfleet.edge_agent.zo import optim, problem


def sphere(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n directions uniform on the unit sphere in R^d."""
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def orthonormal(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n <= d orthonormal directions in R^d (rows): the Q of a Gaussian d x n matrix."""
    q, _ = np.linalg.qr(rng.standard_normal((d, n)))
    return q.T


@register
class FedZOLearner(Learner):
    name = "fedzo"

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        steps, b2 = int(cfg.get("local_steps", 10)), int(cfg.get("directions", 20))
        lr, mu = float(cfg.get("lr", 0.05)), float(cfg.get("mu", 0.005))
        basis, scale = str(cfg.get("basis", "sphere")), str(cfg.get("scale", "d"))
        if steps < 1 or b2 < 1 or mu <= 0 or lr <= 0:
            raise ConfigError(f"fedzo needs local_steps, directions >= 1 and lr, mu > 0; got {cfg}")
        if basis not in ("sphere", "orthonormal") or scale not in ("d", "one"):
            raise ConfigError(f"fedzo's basis is 'sphere' or 'orthonormal' and its scale 'd' or 'one'; got {cfg}")
        prob = problem.build(cfg, task.tensors, data, model)
        f, x0 = prob.objective, prob.x0
        rng = np.random.Generator(np.random.PCG64(int(cfg.get("seed", 0))))
        d = x0.shape[0]
        if basis == "orthonormal" and b2 > d:
            raise ConfigError(f"fedzo: {b2} orthonormal directions do not fit in {d} dimensions")
        draw = orthonormal if basis == "orthonormal" else sphere
        opt = optim.make(str(cfg.get("optimizer", "sgd")), lr)
        x = x0.copy()
        first = last = float("nan")
        for t in range(steps):
            fx = f(x)
            if t == 0:
                first = fx
            last = fx
            v = draw(rng, b2, d)
            diffs = np.array([f(x + mu * vj) - fx for vj in v])
            g = ((d if scale == "d" else 1.0) / mu) * (diffs @ v) / b2
            x = opt.step(x, g)
        delta = prob.tensors(x - x0)
        metrics = {"queries": int(f.queries), "objective_first": first, "objective_last": last}
        return LearnResult(delta, len(data) if len(data) else 1, metrics)
