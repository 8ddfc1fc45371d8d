"""A small numpy MLP: the trainable part (head or whole model) that runs forward and backward on the edge.

Parameters are a dict of named tensors `fc{i}.weight` (out, in) and `fc{i}.bias` (out,), ReLU between
layers and softmax cross-entropy on top. The coordinator mirrors this exactly in torch
(`fedfleet.models.mirrors.head.MLPHead`).
"""

from __future__ import annotations

import numpy as np

Params = dict[str, np.ndarray]


def layout(sizes: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    """Named tensor layout for an MLP with layer widths `sizes` (input first, classes last)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        out.append((f"fc{i}.weight", (fan_out, fan_in)))
        out.append((f"fc{i}.bias", (fan_out,)))
    return out


def init(sizes: list[int], seed: int) -> Params:
    """He-uniform initialisation, seeded."""
    rng = np.random.default_rng(seed)
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = np.sqrt(6.0 / fan_in) if i < len(sizes) - 2 else np.sqrt(1.0 / fan_in)
        params[f"fc{i}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        params[f"fc{i}.bias"] = np.zeros(fan_out, np.float32)
    return params


def n_layers(params: Params) -> int:
    return sum(1 for k in params if k.endswith(".weight"))


def forward(params: Params, x: np.ndarray) -> np.ndarray:
    """Logits for a batch `x` (N, in)."""
    h = x
    n = n_layers(params)
    for i in range(n):
        h = h @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
    return h


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    p = softmax(forward(params, x))
    return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())


def loss_and_grad(params: Params, x: np.ndarray, y: np.ndarray,
                  classes: np.ndarray | list[int] | None = None) -> tuple[float, Params]:
    """Mean softmax cross-entropy over the batch and its gradient with respect to every tensor.

    `classes` (optional): the softmax runs over these outputs only (a per-task head inside a wider output
    layer); the other outputs get no gradient."""
    n = n_layers(params)
    acts = [x]
    h = x
    for i in range(n):
        h = h @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
        acts.append(h)
    if classes is not None:
        masked = np.full_like(acts[-1], -np.inf)
        cols = np.asarray(classes, dtype=np.int64)
        masked[:, cols] = acts[-1][:, cols]
        p = softmax(masked)
    else:
        p = softmax(acts[-1])
    m = len(y)
    value = float(-np.log(p[np.arange(m), y] + 1e-12).mean())
    delta = p
    delta[np.arange(m), y] -= 1.0
    delta /= m
    grads: Params = {}
    for i in range(n - 1, -1, -1):
        grads[f"fc{i}.weight"] = (delta.T @ acts[i]).astype(np.float32)
        grads[f"fc{i}.bias"] = delta.sum(axis=0).astype(np.float32)
        if i > 0:
            delta = (delta @ params[f"fc{i}.weight"]) * (acts[i] > 0)
    return value, grads


def activations(params: Params, x: np.ndarray) -> list[np.ndarray]:
    """[x, h_1, ..., output]: every layer's output on a batch (ReLU applied between layers, not on the last)."""
    n = n_layers(params)
    acts = [np.asarray(x, np.float32)]
    h = acts[0]
    for i in range(n):
        h = h @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
        acts.append(h)
    return acts


def backward(params: Params, acts: list[np.ndarray], delta: np.ndarray,
             need_params: bool = True) -> tuple[Params, np.ndarray]:
    """Backpropagate `delta` (d loss / d output, (N, out)) through the MLP whose `activations` are `acts`.

    Returns (the gradient of every tensor, empty when `need_params` is False; d loss / d input (N, in))."""
    n = n_layers(params)
    grads: Params = {}
    for i in range(n - 1, -1, -1):
        if need_params:
            grads[f"fc{i}.weight"] = (delta.T @ acts[i]).astype(np.float32)
            grads[f"fc{i}.bias"] = delta.sum(axis=0).astype(np.float32)
        delta = delta @ params[f"fc{i}.weight"]
        if i > 0:
            delta = delta * (acts[i] > 0)
    return grads, delta.astype(np.float32)


def accuracy(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(params, x).argmax(axis=1) == y).mean()) if len(y) else 0.0
