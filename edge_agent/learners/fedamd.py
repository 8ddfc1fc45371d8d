"""FedAMD's edge side: anchors upload a large-batch gradient, miners run the variance-reduced recursion.

Anchor (config role = "anchor"): the gradient of the mean loss over a large batch B' (the whole local
set when large_batch = 0, else a seeded random subset of that size), accumulated over chunks of
`chunk` samples so the forward pass never holds the whole set at once. It does not train.

Miner (config role = "miner"): x0 = x_t, v0 = v_t (the bullseye sent as v.*). For k = 0..K-1:
if k >= 1, draw a small batch B_k and set v_k = v_{k-1} + grad(x_k; B_k) - grad(x_{k-1}; B_k), the SAME
batch at both points; then x_{k+1} = x_k - lr * v_k. The first step uses the bullseye alone. Batches
come from a fresh seeded shuffle of the local set every task (epoch-style, reshuffled when exhausted).
Upload delta = x_t - x_K (divided by K when `divided` is set).

Task config: role, lr, local_steps (K), batch, large_batch, chunk, seed, divided. Numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners._inputs import features, params_from, task_rng
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, Tensors, register
from fedfleet.edge_agent.nn import mlp

GradFn = Callable[[Tensors, np.ndarray], Tensors]


def chunked_gradient(params: Tensors, x: np.ndarray, y: np.ndarray, chunk: int) -> tuple[float, Tensors]:
    """Mean loss and gradient over (x, y), accumulated chunk by chunk (weights len(chunk) / N)."""
    n = len(y)
    if n == 0:
        raise ConfigError("fedamd anchor has no local samples; give it data or leave it out of the run")
    if chunk < 1:
        raise ConfigError(f"fedamd chunk must be >= 1, got {chunk}")
    total = {k: np.zeros(v.shape, np.float64) for k, v in params.items()}
    loss = 0.0
    for a in range(0, n, chunk):
        value, grads = mlp.loss_and_grad(params, x[a : a + chunk], y[a : a + chunk])
        w = min(chunk, n - a) / n
        loss += w * value
        for k in total:
            total[k] += w * grads[k]
    return loss, {k: v.astype(np.float32) for k, v in total.items()}


def shuffled_batches(rng: np.random.Generator, n: int, batch: int, count: int) -> list[np.ndarray]:
    """`count` batches of min(batch, n) indices from seeded shuffles of range(n), reshuffled when used up."""
    if n == 0:
        raise ConfigError("fedamd miner has no local samples; give it data or leave it out of the run")
    b = min(batch, n)
    out: list[np.ndarray] = []
    perm, pos = rng.permutation(n), 0
    while len(out) < count:
        if pos + b > n:
            perm, pos = rng.permutation(n), 0
        out.append(perm[pos : pos + b])
        pos += b
    return out


def miner_steps(
    x0: Tensors, v0: Tensors, grad: GradFn, batches: Sequence[np.ndarray], lr: float
) -> tuple[Tensors, list[Tensors]]:
    """Run K = len(batches) + 1 variance-reduced steps; return x_K and the trace [v_0, ..., v_{K-1}].

    `batches[k - 1]` is B_k, evaluated at both x_k and x_{k-1}.
    """
    x_prev = None
    x = {k: v.astype(np.float32, copy=True) for k, v in x0.items()}
    v = {k: val.astype(np.float32, copy=True) for k, val in v0.items()}
    trace = [{k: val.copy() for k, val in v.items()}]
    for step in range(len(batches) + 1):
        if step >= 1:
            assert x_prev is not None
            idx = batches[step - 1]
            g_now, g_prev = grad(x, idx), grad(x_prev, idx)
            v = {k: v[k] + g_now[k] - g_prev[k] for k in v}
            trace.append({k: val.copy() for k, val in v.items()})
        x_prev = x
        x = {k: x[k] - lr * v[k] for k in x}
    return x, trace


@register
class FedAMDLearner(Learner):
    name = "fedamd"

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        cfg = task.config
        role = cfg.get("role")
        x = features(model, data, "train")
        params = params_from(task)
        model_params = {k: v for k, v in params.items() if not k.startswith("v.")}
        if role == "anchor":
            n = len(data)
            large = int(cfg.get("large_batch", 0))
            if 0 < large < n:
                idx = np.sort(task_rng(task, salt=2).choice(n, size=large, replace=False))
                xs, ys = x[idx], data.y[idx]
            else:
                xs, ys = x, data.y
            loss, g = chunked_gradient(model_params, xs, ys, int(cfg.get("chunk", 256)))
            return LearnResult(g, len(ys), {"loss": loss, "grad_evals": float(len(ys)), "anchor": 1.0})
        if role != "miner":
            raise ConfigError(f"fedamd task role must be 'anchor' or 'miner', got {role!r}")
        steps = int(cfg.get("local_steps", 10))
        batch = int(cfg.get("batch", 64))
        lr = float(cfg["lr"])
        if steps < 1:
            raise ConfigError(f"fedamd local_steps must be >= 1, got {steps}")
        v0 = params_from(task, "v.")
        if set(v0) != set(model_params):
            raise ConfigError("fedamd miner task: the bullseye v.* does not match the model tensors")
        batches = shuffled_batches(task_rng(task, salt=3), len(data), batch, steps - 1)

        def grad(p: Tensors, idx: np.ndarray) -> Tensors:
            return mlp.loss_and_grad(p, x[idx], data.y[idx])[1]

        x_k, _ = miner_steps(model_params, v0, grad, batches, lr)
        scale = 1.0 / steps if cfg.get("divided") else 1.0
        delta = {k: ((model_params[k] - x_k[k]) * scale).astype(np.float32) for k in model_params}
        evals = float(2 * sum(len(b) for b in batches))
        return LearnResult(delta, len(data), {"grad_evals": evals, "anchor": 0.0})
