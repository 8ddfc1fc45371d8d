"""The conditional video denoiser eps_theta(x_t, t, c) over whole moving-digit clips, in numpy.

The edge trains it (forward and backward here) and can sample with it; the coordinator mirrors it in torch
(`fedfleet.models.mirrors.video_denoiser.VideoDenoiser`) with the same tensor names, so state dicts move unchanged.

- A clip is (FRAMES, SIZE, SIZE) = (8, 16, 16) float32 in [-1, 1].
- The condition c is (digit class, motion direction), carried as one id `digit * 4 + direction`.
- The noise schedule is DDPM's linear beta from 1e-4 to 0.02 over `STEPS` (1000) steps; `alpha_bar[t]` is
  the product of (1 - beta) up to and including step t; x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.
- The network is an `fedfleet.edge_agent.nn.mlp` MLP (`fc{i}.weight/bias`, ReLU between layers) on the concatenation
  [x_t flattened, time embedding (T_EMB sin/cos features of t / steps), one-hot digit, one-hot direction].
  It is x0-parametrised with a fixed skip (the preconditioning of Karras et al., EDM, in VP form): the clean
  clip estimate is  x0_hat = MEAN + c_skip(t) (x_t - sqrt(ab_t) MEAN) + mlp(...),  where
  c_skip(t) = sqrt(ab_t) STD^2 / (ab_t STD^2 + 1 - ab_t) is the best linear estimate for data of mean MEAN and
  standard deviation STD (the pixel statistics of the clips), so the MLP learns only the residual. A plain
  eps-predicting MLP has to carry the 2,048-pixel input through its narrow hidden layers and barely learns.
- The noise prediction is derived: eps_theta = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t).
- Training loss: the mean over batch and pixels of (x0_hat(x_t, t, c) - x0)^2, t uniform in [0, STEPS),
  eps ~ N(0, I).

`vjp_input` gives v^T d x0_hat / d x_t, which structure-guided sampling needs on a device without autograd.
Numpy only; never imports torch.
"""

from __future__ import annotations

import numpy as np

from fedfleet.edge_agent.nn import mlp

FRAMES = 8
SIZE = 16
CLASSES = 10
DIRECTIONS = ("right", "left", "down", "up")
T_EMB = 32
STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
PIXELS = FRAMES * SIZE * SIZE
INPUT_DIM = PIXELS + T_EMB + CLASSES + len(DIRECTIONS)
DEFAULT_HIDDEN = (512, 512)
MEAN, STD = -0.85, 0.46  # pixel mean and standard deviation of moving-digit clips (background -1)

Params = dict[str, np.ndarray]


def condition_id(digit: np.ndarray | int, direction: np.ndarray | int) -> np.ndarray:
    return np.asarray(digit, np.int64) * len(DIRECTIONS) + np.asarray(direction, np.int64)


def sizes(hidden: tuple[int, ...] = DEFAULT_HIDDEN) -> list[int]:
    """MLP widths: the network input, the hidden layers, the flattened clip."""
    return [INPUT_DIM, *hidden, PIXELS]


def init(hidden: tuple[int, ...] = DEFAULT_HIDDEN, seed: int = 0) -> Params:
    """He-uniform hidden layers and a zero output layer, so an untrained denoiser is the linear estimate."""
    params = mlp.init(sizes(hidden), seed)
    last = len(hidden)
    params[f"fc{last}.weight"][:] = 0.0
    return params


def alpha_bar(steps: int = STEPS) -> np.ndarray:
    """Cumulative products of (1 - beta_t) for DDPM's linear schedule, float64 (steps,)."""
    betas = np.linspace(BETA_START, BETA_END, steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def time_embedding(t: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """(N, T_EMB) float32: sin and cos of (t / steps) * 1000 * 10000^(-k / (T_EMB/2)), as in DDPM."""
    half = T_EMB // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float32) / half)
    arg = (np.asarray(t, np.float32).reshape(-1, 1) * (1000.0 / steps)) * freqs[None, :]
    return np.concatenate([np.sin(arg), np.cos(arg)], axis=1).astype(np.float32)


def network_input(x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """The MLP's input (N, INPUT_DIM) for clips x_t (N, FRAMES, SIZE, SIZE), steps t (N,), condition ids (N,)."""
    cond = np.asarray(cond, np.int64)
    n = len(cond)
    eye_d = np.eye(CLASSES, dtype=np.float32)[cond // len(DIRECTIONS)]
    eye_m = np.eye(len(DIRECTIONS), dtype=np.float32)[cond % len(DIRECTIONS)]
    return np.concatenate([np.asarray(x_t, np.float32).reshape(n, -1), time_embedding(t, steps), eye_d, eye_m],
                          axis=1)


def c_skip(t: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """(N, 1) float32: the fixed skip weight of x_t in x0_hat at steps t."""
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, 1)
    return (np.sqrt(a) * STD**2 / (a * STD**2 + 1.0 - a)).astype(np.float32)


def _x0_from(out: np.ndarray, x_flat: np.ndarray, t: np.ndarray, ab: np.ndarray) -> np.ndarray:
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, 1)
    return MEAN + c_skip(t, ab) * (x_flat - np.sqrt(a) * MEAN) + out


def predict_x0(params: Params, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """The clean-clip estimate x0_hat, shaped like x_t."""
    x_t = np.asarray(x_t, np.float32)
    flat = x_t.reshape(x_t.shape[0], -1)
    out = mlp.forward(params, network_input(x_t, t, cond, steps))
    return _x0_from(out, flat, t, alpha_bar(steps)).reshape(x_t.shape)


def eps_from_x0(x_t: np.ndarray, x0: np.ndarray, t: np.ndarray, ab: np.ndarray) -> np.ndarray:
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, *([1] * (np.ndim(x_t) - 1)))
    return ((x_t - np.sqrt(a) * x0) / np.sqrt(1.0 - a)).astype(np.float32)


def predict(params: Params, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """The noise prediction eps_theta(x_t, t, c), shaped like x_t."""
    return eps_from_x0(np.asarray(x_t, np.float32), predict_x0(params, x_t, t, cond, steps), t, alpha_bar(steps))


def noised(x0: np.ndarray, t: np.ndarray, eps: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps."""
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, *([1] * (x0.ndim - 1)))
    return np.sqrt(a) * x0 + np.sqrt(1.0 - a) * eps


def loss_and_grad(params: Params, x0: np.ndarray, cond: np.ndarray, rng: np.random.Generator,
                  ab: np.ndarray | None = None) -> tuple[float, Params]:
    """The denoising loss on one batch of clean clips x0 (N, F, S, S) and its gradient for every tensor.

    Draws t uniform in [0, steps) and eps ~ N(0, I) from `rng`, in that order."""
    ab = alpha_bar() if ab is None else ab
    n = len(cond)
    t = rng.integers(0, len(ab), n)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    x0 = np.asarray(x0, np.float32)
    x_t = noised(x0, t, eps, ab)
    acts = mlp.activations(params, network_input(x_t, t, cond, len(ab)))
    diff = _x0_from(acts[-1], x_t.reshape(n, -1), t, ab) - x0.reshape(n, -1)
    value = float(np.mean(diff * diff))
    grads, _ = mlp.backward(params, acts, (2.0 / diff.size) * diff)
    return value, grads


def vjp_input(params: Params, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, v: np.ndarray,
              steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """(x0_hat(x_t), v^T d x0_hat / d x_t): the clean-clip estimate and its vector-Jacobian product for x_t."""
    x_t = np.asarray(x_t, np.float32)
    n = x_t.shape[0]
    ab = alpha_bar(steps)
    flat = x_t.reshape(n, -1)
    acts = mlp.activations(params, network_input(x_t, t, cond, steps))
    v = np.asarray(v, np.float32).reshape(n, -1)
    _, d_in = mlp.backward(params, acts, v, need_params=False)
    vjp = d_in[:, :PIXELS] + c_skip(t, ab) * v
    return _x0_from(acts[-1], flat, t, ab).reshape(x_t.shape), vjp.reshape(x_t.shape)
