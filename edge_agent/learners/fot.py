"""FOT's edge learner (Federated Orthogonal Training, ICLR 2024): plain, unconstrained local SGD every
round (FedAvg's learner), and in the last round of each task a sketch of each protected layer's inputs.

Task config: as `sgd` (`lr`, `epochs`, `batch`, `weight_decay`, `seed`, `continual`), plus
`fot = {"sketch": bool, "layers": [[weight name, m], ...], "distribution": "uniform" | "gaussian"}`.
Task tensors: the global trainable tensors and, in a sketch round, `basis:<weight>` (d_l x k_l, the
coordinator's orthonormal basis U_l; absent while k_l = 0).

Result tensors: the delta local - global (same names) and, in a sketch round, for each protected layer
`sketch:<weight>` = R_hat @ G (d_l x m), with R (d_l x N) the layer's inputs on the task's local data under
the model after local training, read in eval mode (this MLP has no dropout or normalisation, so eval mode
is the plain forward pass), R_hat = R - U (U^T R) its residual against the basis, and G a fresh N x m
random matrix (Uniform[-1, 1], or Gaussian); `fot:rho` (one per protected layer): ||R_hat||_F / ||R||_F,
1 where there is no basis yet; `fot:n` = [N].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedfleet.edge_agent.learners.base import LearnResult, LocalData, Task, register
from fedfleet.edge_agent.learners.fedavg import SGDLearner

BASIS = "basis:"
SKETCH = "sketch:"
RHO = "fot:rho"
COUNT = "fot:n"


def layer_index(weight: str) -> int:
    """`fc{i}.weight` -> i."""
    if not (weight.startswith("fc") and weight.endswith(".weight") and weight[2:-7].isdigit()):
        raise ValueError(f"FOT protects weight matrices fc<i>.weight, got {weight!r}")
    return int(weight[2:-7])


def layer_inputs(params: dict[str, np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """The input (N, d_i) of every layer fc{i}: x for fc0, the post-ReLU outputs for the later layers."""
    n = sum(1 for k in params if k.endswith(".weight"))
    out = [x]
    h = x
    for i in range(n - 1):
        h = np.maximum(h @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"], 0.0)
        out.append(h)
    return out


def residual(r: np.ndarray, basis: np.ndarray | None) -> tuple[np.ndarray, float]:
    """(R - U U^T R, ||R_hat||_F / ||R||_F); rho = 1 without a basis (and 0 for an all-zero R)."""
    if basis is None or basis.shape[1] == 0:
        return r, 1.0
    r_hat = r - basis @ (basis.T @ r)
    norm = float(np.linalg.norm(r))
    return r_hat, float(np.linalg.norm(r_hat)) / norm if norm > 0 else 0.0


def random_matrix(rng: np.random.Generator, n: int, m: int, distribution: str) -> np.ndarray:
    if distribution == "gaussian":
        return rng.standard_normal((n, m))
    if distribution == "uniform":
        return rng.uniform(-1.0, 1.0, (n, m))
    raise ValueError(f"unknown sketch distribution {distribution!r}; use 'uniform' or 'gaussian'")


@register
class FOTLearner(SGDLearner):
    name = "fot"

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        weights = {k: v for k, v in task.tensors.items() if not k.startswith(BASIS)}
        result = super().learn(dataclasses.replace(task, tensors=weights), data, model)
        spec = task.config.get("fot") or {}
        if not spec.get("sketch"):
            return result
        local = {k: weights[k] + result.tensors[k] for k in weights}
        inputs = layer_inputs(local, model.features(data.x, cache_key="local").astype(np.float64))
        rng = np.random.default_rng([int(task.config.get("seed", 0)), task.round, 0xF07])  # fresh G per client
        tensors = dict(result.tensors)
        rhos = []
        for name, m in spec["layers"]:
            r = inputs[layer_index(name)].T  # d_l x N, one column per local sample
            basis = task.tensors.get(BASIS + name)
            r_hat, rho = residual(r, None if basis is None else basis.astype(np.float64))
            g = random_matrix(rng, r.shape[1], int(m), str(spec.get("distribution", "uniform")))
            tensors[SKETCH + name] = (r_hat @ g).astype(np.float32)
            rhos.append(rho)
        tensors[RHO] = np.asarray(rhos, np.float32)
        tensors[COUNT] = np.asarray([len(data)], np.float32)
        metrics = {**result.metrics, "rho_mean": float(np.mean(rhos))}
        return LearnResult(tensors, result.samples, metrics)

