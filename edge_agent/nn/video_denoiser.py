"""The conditional video denoiser eps_theta(x_t, t, c) over whole moving-digit clips, in numpy.

The edge trains it (forward and backward here) and can sample with it; the coordinator mirrors it in torch
(`fedfleet.models.mirrors.video_denoiser.VideoDenoiser`) with the same tensor names, so state dicts move unchanged.

- A clip is (FRAMES, SIZE, SIZE) = (8, 16, 16) float32 in [-1, 1].
- The condition c is (digit class, motion direction), carried as one id `digit * 4 + direction`.
- The noise schedule is DDPM's linear beta from 1e-4 to 0.02 over `STEPS` (1000) steps; `alpha_bar[t]` is
  the product of (1 - beta) up to and including step t; x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.
- The network is a small U-Net on the clip seen as a 16x16 image with the 8 frames as channels (`plan(hidden)`:
  one level per width in `hidden`, 16x16, 8x8, 4x4, ...). Every convolution is 3x3 with circular padding (the
  moving digits wrap around a torus). Layers, for `hidden` = (C_0, ..., C_{L-1}):
  - the condition embedding e = relu(emb.weight [time embedding (T_EMB sin/cos of t), one-hot digit,
    one-hot direction] + emb.bias), EMB wide;
  - every block i: pre_i = conv_i(input_i) + conv{i}.bias + cemb{i}.weight e (the embedding added per channel,
    in every block), h_i = relu(pre_i), plus input_i in a residual block;
  - the encoder: per level l a block from the level above (x_t at l = 0, else its 2x2 average pool) to C_l
    channels, then a residual block; at the bottom one more residual block; the decoder: per level from the
    second lowest up, a block on the concatenation [the level below upsampled 2x (nearest), the encoder's
    output at this level] and a residual block; last the output conv{4L-1} (no embedding, no ReLU,
    zero-initialised) to FRAMES channels: the x0 residual.
  The coarse levels see the whole clip at once (a 3x3 convolution at 4x4 covers the canvas), which the flat
  stacks of 16x16 convolutions this replaced did not: they never learnt to draw the digit they were asked for
  (docs/results, issue 25).
- It is x0-parametrised with the preconditioning of Karras et al. (EDM), in VP form: the clean clip estimate is
  x0_hat = MEAN + c_skip(t) (x_t - sqrt(ab_t) MEAN) + c_out(t) net(...),  where
  c_skip(t) = sqrt(ab_t) STD^2 / (ab_t STD^2 + 1 - ab_t) is the best linear estimate for data of mean MEAN and
  standard deviation STD (the pixel statistics of the clips) and c_out(t) = sqrt(1 - ab_t) STD /
  sqrt(ab_t STD^2 + 1 - ab_t) the standard deviation of what the linear estimate leaves, so the network's
  target has unit scale at every step (without c_out a low-noise step needs outputs of size 0.01; with it,
  the shipped centre denoiser still leaves speckles of noise at low t: docs/results, issue 25).
- The noise prediction is derived: eps_theta = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t).
- Training loss (EDM's weighting): the mean over batch and pixels of ((x0_hat(x_t, t, c) - x0) / c_out(t))^2,
  i.e. the network's error on its unit-scale target, t uniform in [0, STEPS), eps ~ N(0, I); a share
  `DIGIT_DROPOUT` of the clips is trained with its digit dropped (`NULL_DIGIT`, the direction kept), so the
  same network also predicts without the digit, which classifier-free guidance needs
  (`fedfleet.edge_agent.mtvg.sample`).

Convolutions are im2col (a strided window view of the circularly padded channels-last activations) and one
matmul; the backward pass is the transposed matmul and nine slice-adds folded back around the torus; pooling
and upsampling are reshapes, and their adjoints the same reshapes the other way.
`vjp_input` gives v^T d x0_hat / d x_t, which structure-guided sampling needs on a device without autograd.
Numpy only; never imports torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

FRAMES = 8
SIZE = 16
CLASSES = 10
DIRECTIONS = ("right", "left", "down", "up")
T_EMB = 32
EMB_IN = T_EMB + CLASSES + len(DIRECTIONS)  # the embedding MLP's input: time features, one-hot digit and direction
EMB = 64  # width of the condition embedding added in every block
STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
PIXELS = FRAMES * SIZE * SIZE
DEFAULT_HIDDEN = (32, 64, 64)
MAX_LEVELS = 4  # 16x16 down to 2x2
MEAN, STD = -0.85, 0.46  # pixel mean and standard deviation of moving-digit clips (background -1)
NULL_DIGIT = CLASSES  # the digit of a condition whose digit is dropped: its one-hot is all zeros
DIGIT_DROPOUT = 0.2  # share of training clips whose digit is dropped (classifier-free guidance's training)

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class Layer:
    """One convolution conv{i} of the U-Net: its input is the channel concatenation of `sources`, each a
    (layer index, or -1 for x_t; "same", "pool" (2x2 average) or "up" (2x nearest)); `size` is its output's side."""

    sources: tuple[tuple[int, str], ...]
    c_in: int
    c_out: int
    size: int
    residual: bool  # h = relu(pre) + input
    out: bool  # the output convolution: no embedding, no ReLU


def condition_id(digit: np.ndarray | int, direction: np.ndarray | int) -> np.ndarray:
    return np.asarray(digit, np.int64) * len(DIRECTIONS) + np.asarray(direction, np.int64)


def without_digit(cond: np.ndarray) -> np.ndarray:
    """The same conditions with the digit dropped (`NULL_DIGIT`, an all-zero one-hot) and the direction kept."""
    return condition_id(NULL_DIGIT, np.asarray(cond, np.int64) % len(DIRECTIONS))


def plan(hidden: tuple[int, ...] = DEFAULT_HIDDEN) -> tuple[Layer, ...]:
    """The U-Net's convolutions in order, for level widths `hidden` (one level per width, 16x16 first).

    Per level l: a convolution from the level above (x_t at l = 0, else its 2x2 average pool) to hidden[l],
    then a residual one; at the bottom one more residual convolution; then per level from the second lowest
    up, a convolution of [the level below upsampled 2x, the encoder's output at this level] to hidden[l] and a
    residual one; last, the output convolution to FRAMES channels. 4 * len(hidden) convolutions. Built once per
    widths (every forward pass asks for it)."""
    return _plan(tuple(int(h) for h in hidden))


@functools.lru_cache(maxsize=16)
def _plan(hidden: tuple[int, ...]) -> tuple[Layer, ...]:
    if not 1 <= len(hidden) <= MAX_LEVELS or min(hidden) < 1:
        raise ValueError(f"a denoiser has 1 to {MAX_LEVELS} levels of positive widths, got {list(hidden)}")
    layers: list[Layer] = []
    width, size = {-1: FRAMES}, {-1: SIZE}

    def add(sources: tuple[tuple[int, str], ...], c_out: int, residual: bool = False, out: bool = False) -> int:
        scale = {"same": 1.0, "pool": 0.5, "up": 2.0}
        sides = {int(size[s] * scale[op]) for s, op in sources}
        assert len(sides) == 1, sources
        layers.append(Layer(sources, sum(width[s] for s, _ in sources), c_out, sides.pop(), residual, out))
        i = len(layers) - 1
        width[i], size[i] = c_out, layers[i].size
        return i

    prev, enc = -1, []
    for level, c in enumerate(hidden):
        first = add(((prev, "pool" if level else "same"),), c)
        prev = add(((first, "same"),), c, residual=True)
        enc.append(prev)
    prev = add(((prev, "same"),), hidden[-1], residual=True)
    for level in range(len(hidden) - 2, -1, -1):
        merged = add(((prev, "up"), (enc[level], "same")), hidden[level])
        prev = add(((merged, "same"),), hidden[level], residual=True)
    add(((prev, "same"),), FRAMES, out=True)
    return tuple(layers)


def sizes(hidden: tuple[int, ...] = DEFAULT_HIDDEN) -> list[int]:
    """Channel widths: the input frames, each convolution's output channels (the last is the frames)."""
    return [FRAMES, *[layer.c_out for layer in plan(hidden)]]


def layout(hidden: tuple[int, ...] = DEFAULT_HIDDEN) -> list[tuple[str, tuple[int, ...]]]:
    """The named tensors of the denoiser with level widths `hidden`, in a fixed order."""
    out: list[tuple[str, tuple[int, ...]]] = [("emb.weight", (EMB, EMB_IN)), ("emb.bias", (EMB,))]
    for i, layer in enumerate(plan(hidden)):
        out += [(f"conv{i}.weight", (layer.c_out, layer.c_in, 3, 3)), (f"conv{i}.bias", (layer.c_out,))]
        if not layer.out:
            out.append((f"cemb{i}.weight", (layer.c_out, EMB)))
    return out


def hidden_of(params: dict) -> tuple[int, ...]:
    """The level widths a set of tensors implies (by `conv{2 l}.weight` shapes); KeyError/ValueError if none."""
    n = sum(1 for k in params if k.startswith("conv") and k.endswith(".weight"))
    if n < 4 or n % 4:
        raise ValueError(f"a denoiser has 4 convolutions per level, got {n} in {sorted(params)[:8]}")
    return tuple(int(np.shape(params[f"conv{2 * level}.weight"])[0]) for level in range(n // 4))


def init(hidden: tuple[int, ...] = DEFAULT_HIDDEN, seed: int = 0) -> Params:
    """He-normal convolutions (residual branches scaled by 1/sqrt(residual blocks)), a zero output conv, so an
    untrained denoiser is the linear estimate."""
    rng = np.random.default_rng(seed)
    layers = plan(hidden)
    n_res = sum(layer.residual for layer in layers)
    params: Params = {}
    for name, shape in layout(hidden):
        if name.endswith(".bias"):
            params[name] = np.zeros(shape, np.float32)
        elif name == "emb.weight":
            params[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / EMB_IN)).astype(np.float32)
        elif name.startswith("cemb"):
            params[name] = (rng.standard_normal(shape) * np.sqrt(1.0 / EMB)).astype(np.float32)
        else:
            scale = np.sqrt(2.0 / (shape[1] * 9))
            if layers[int(name[4:].split(".")[0])].residual:
                scale /= np.sqrt(n_res)
            params[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    params[f"conv{len(layers) - 1}.weight"][:] = 0.0
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


def embedding_input(t: np.ndarray, cond: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """The embedding MLP's input (N, EMB_IN): time features, one-hot digit (all zeros for `NULL_DIGIT`),
    one-hot direction."""
    cond = np.asarray(cond, np.int64).reshape(-1)
    eye_d = np.eye(CLASSES + 1, CLASSES, dtype=np.float32)[cond // len(DIRECTIONS)]
    eye_m = np.eye(len(DIRECTIONS), dtype=np.float32)[cond % len(DIRECTIONS)]
    return np.concatenate([time_embedding(t, steps), eye_d, eye_m], axis=1)


def c_skip(t: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """(N, 1, 1, 1) float32: the fixed skip weight of x_t in x0_hat at steps t."""
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, 1, 1, 1)
    return (np.sqrt(a) * STD**2 / (a * STD**2 + 1.0 - a)).astype(np.float32)


def c_out(t: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """(N, 1, 1, 1) float32: the scale of the network's output in x0_hat at steps t."""
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, 1, 1, 1)
    return (np.sqrt(1.0 - a) * STD / np.sqrt(a * STD**2 + 1.0 - a)).astype(np.float32)


# --- circular 3x3 convolution, channels last -------------------------------------------------------------------

def _pad(h: np.ndarray, d: int) -> np.ndarray:
    """Circular padding of (N, H, W, C) by d on both sides of H and W."""
    return np.pad(h, ((0, 0), (d, d), (d, d), (0, 0)), mode="wrap")


def _im2col(h: np.ndarray, d: int) -> np.ndarray:
    """(N, H, W, C) -> (N, H, W, C * 9): cols[..., c 9 + ky 3 + kx] = h[n, (y + (ky-1) d) % H, (x + (kx-1) d) % W, c]
    (a strided window view of the circularly padded activations, then one copy)."""
    n, hh, ww, c = h.shape
    win = np.lib.stride_tricks.sliding_window_view(_pad(h, d), (2 * d + 1, 2 * d + 1), axis=(1, 2))[..., ::d, ::d]
    return np.ascontiguousarray(win).reshape(n, hh, ww, c * 9)


def _col2im(g: np.ndarray, d: int, c: int) -> np.ndarray:
    """The adjoint of `_im2col`: (N, H, W, C * 9) -> (N, H, W, C)."""
    n, hh, ww, _ = g.shape
    g = g.reshape(n, hh, ww, c, 3, 3)
    gp = np.zeros((n, hh + 2 * d, ww + 2 * d, c), np.float32)
    for ky in range(3):
        for kx in range(3):
            gp[:, ky * d:ky * d + hh, kx * d:kx * d + ww] += g[..., ky, kx]
    out = gp[:, d:d + hh, d:d + ww].copy()  # fold the padding back onto the rows and columns it wraps
    out[:, :, :d] += gp[:, d:d + hh, ww + d:]
    out[:, :, ww - d:] += gp[:, d:d + hh, :d]
    out[:, :d] += gp[:, hh + d:, d:d + ww]
    out[:, hh - d:] += gp[:, :d, d:d + ww]
    out[:, :d, :d] += gp[:, hh + d:, ww + d:]
    out[:, :d, ww - d:] += gp[:, hh + d:, :d]
    out[:, hh - d:, :d] += gp[:, :d, ww + d:]
    out[:, hh - d:, ww - d:] += gp[:, :d, :d]
    return out


def _wmat(w: np.ndarray) -> np.ndarray:
    """(O, C, 3, 3) torch-layout weights -> (C * 9, O), rows ordered (c, ky, kx) as `_im2col`'s columns."""
    return w.reshape(w.shape[0], -1).T


def _resample(h: np.ndarray, op: str) -> np.ndarray:
    """A source as a layer reads it, channels last: unchanged, 2x2 average-pooled, or 2x nearest-upsampled."""
    if op == "same":
        return h
    n, hh, ww, c = h.shape
    if op == "pool":
        return h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
    return np.repeat(np.repeat(h, 2, axis=1), 2, axis=2)


def _resample_back(g: np.ndarray, op: str) -> np.ndarray:
    """The adjoint of `_resample`."""
    if op == "same":
        return g
    n, hh, ww, c = g.shape
    if op == "pool":
        return np.repeat(np.repeat(g * 0.25, 2, axis=1), 2, axis=2)
    return g.reshape(n, hh // 2, 2, ww // 2, 2, c).sum(axis=(2, 4))


def _forward(params: Params, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, steps: int) -> tuple[np.ndarray, dict]:
    """The network's x0 residual (N, F, S, S) and what the backward pass needs."""
    layers = plan(hidden_of(params))
    e_in = embedding_input(t, cond, steps)
    e = np.maximum(e_in @ params["emb.weight"].T + params["emb.bias"], 0.0)
    hs = {-1: np.ascontiguousarray(np.asarray(x_t, np.float32).reshape(-1, FRAMES, SIZE, SIZE).transpose(0, 2, 3, 1))}
    cache: dict = {"e_in": e_in, "e": e, "cols": [], "masks": [], "layers": layers}
    for i, layer in enumerate(layers):
        parts = [_resample(hs[src], op) for src, op in layer.sources]
        inp = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        cols = _im2col(inp, 1)
        out = cols @ _wmat(params[f"conv{i}.weight"]) + params[f"conv{i}.bias"]
        cache["cols"].append(cols)
        if layer.out:
            return out.transpose(0, 3, 1, 2), cache
        out += (e @ params[f"cemb{i}.weight"].T)[:, None, None, :]
        mask = out > 0
        cache["masks"].append(mask)
        hs[i] = out * mask + inp if layer.residual else out * mask
    raise AssertionError("the plan ends with the output convolution")


def _backward(params: Params, cache: dict, g_out: np.ndarray, need_params: bool = True) -> tuple[Params, np.ndarray]:
    """(gradients of every tensor, gradient of the input x_t (N, F, S, S)) for d loss / d residual = g_out."""
    layers = cache["layers"]
    grads: Params = {}
    g_e = np.zeros_like(cache["e"])
    g_h: dict[int, np.ndarray] = {}  # d loss / d (output of layer i), accumulated over the layers that read it
    for i in range(len(layers) - 1, -1, -1):
        layer, w, cols = layers[i], params[f"conv{i}.weight"], cache["cols"][i]
        if layer.out:
            g = np.ascontiguousarray(np.asarray(g_out, np.float32).transpose(0, 2, 3, 1))
            g_skip = None
        else:
            g_skip = g_h.pop(i)
            g = g_skip * cache["masks"][i]
            g_sum = g.sum(axis=(1, 2))  # (N, O)
            g_e += g_sum @ params[f"cemb{i}.weight"]
            if need_params:
                grads[f"cemb{i}.weight"] = (g_sum.T @ cache["e"]).astype(np.float32)
        if need_params:
            flat_g = g.reshape(-1, g.shape[-1])
            grads[f"conv{i}.weight"] = (cols.reshape(-1, cols.shape[-1]).T @ flat_g).T.reshape(w.shape).astype(np.float32)
            grads[f"conv{i}.bias"] = flat_g.sum(axis=0).astype(np.float32)
        g_in = _col2im(g @ _wmat(w).T, 1, layer.c_in)
        if layer.residual:
            g_in = g_in + g_skip
        at = 0
        for src, op in layer.sources:
            width = FRAMES if src < 0 else layers[src].c_out
            part = _resample_back(g_in[..., at:at + width], op)
            at += width
            g_h[src] = part if src not in g_h else g_h[src] + part
    if need_params:
        g_e_pre = g_e * (cache["e"] > 0)
        grads["emb.weight"] = (g_e_pre.T @ cache["e_in"]).astype(np.float32)
        grads["emb.bias"] = g_e_pre.sum(axis=0).astype(np.float32)
    return grads, g_h[-1].transpose(0, 3, 1, 2)


def residual(params: Params, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """The network's output alone (N, F, S, S): the x0 residual."""
    return _forward(params, x_t, t, cond, steps)[0]


def _x0_from(out: np.ndarray, x_t: np.ndarray, t: np.ndarray, ab: np.ndarray) -> np.ndarray:
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, 1, 1, 1)
    return (MEAN + c_skip(t, ab) * (x_t - np.sqrt(a) * MEAN) + c_out(t, ab) * out).astype(np.float32)


def predict_x0(params: Params, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """The clean-clip estimate x0_hat, shaped like x_t (N, F, S, S)."""
    x_t = np.asarray(x_t, np.float32)
    return _x0_from(residual(params, x_t, t, cond, steps), x_t, t, alpha_bar(steps))


def eps_from_x0(x_t: np.ndarray, x0: np.ndarray, t: np.ndarray, ab: np.ndarray) -> np.ndarray:
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, *([1] * (np.ndim(x_t) - 1)))
    return ((x_t - np.sqrt(a) * x0) / np.sqrt(1.0 - a)).astype(np.float32)


def predict(params: Params, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, steps: int = STEPS) -> np.ndarray:
    """The noise prediction eps_theta(x_t, t, c), shaped like x_t."""
    return eps_from_x0(np.asarray(x_t, np.float32), predict_x0(params, x_t, t, cond, steps), t, alpha_bar(steps))


def noised(x0: np.ndarray, t: np.ndarray, eps: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps."""
    a = ab[np.asarray(t)].astype(np.float32).reshape(-1, *([1] * (x0.ndim - 1)))
    return (np.sqrt(a) * x0 + np.sqrt(1.0 - a) * eps).astype(np.float32)


def loss_at(params: Params, x0: np.ndarray, cond: np.ndarray, t: np.ndarray, eps: np.ndarray,
            ab: np.ndarray) -> tuple[float, Params]:
    """The denoising loss and its gradient for given steps t and noise eps."""
    x0 = np.asarray(x0, np.float32).reshape(-1, FRAMES, SIZE, SIZE)  # the learner passes flattened clips
    x_t = noised(x0, t, np.asarray(eps, np.float32).reshape(x0.shape), ab)
    out, cache = _forward(params, x_t, t, cond, len(ab))
    scale = c_out(t, ab)
    diff = (_x0_from(out, x_t, t, ab) - x0) / scale  # the network's error on its unit-scale target
    value = float(np.mean(diff * diff))
    grads, _ = _backward(params, cache, (2.0 / diff.size) * diff)  # d x0_hat / d out = c_out cancels 1 / c_out
    return value, grads


def loss_and_grad(params: Params, x0: np.ndarray, cond: np.ndarray, rng: np.random.Generator,
                  ab: np.ndarray | None = None, digit_dropout: float = DIGIT_DROPOUT) -> tuple[float, Params]:
    """The denoising loss on one batch of clean clips x0 (N, F, S, S) and its gradient for every tensor.

    Draws t uniform in [0, steps) and eps ~ N(0, I) from `rng`, in that order, then (if `digit_dropout` > 0)
    which clips lose their digit (`without_digit`), each with probability `digit_dropout`."""
    ab = alpha_bar() if ab is None else ab
    t = rng.integers(0, len(ab), len(cond))
    eps = rng.standard_normal(np.shape(x0)).astype(np.float32)
    if digit_dropout > 0:
        cond = np.where(rng.random(len(cond)) < digit_dropout, without_digit(cond), np.asarray(cond, np.int64))
    return loss_at(params, x0, cond, t, eps, ab)


def vjp_input(params: Params, x_t: np.ndarray, t: np.ndarray, cond: np.ndarray, v: np.ndarray,
              steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """(x0_hat(x_t), v^T d x0_hat / d x_t): the clean-clip estimate and its vector-Jacobian product for x_t."""
    x_t = np.asarray(x_t, np.float32)
    ab = alpha_bar(steps)
    out, cache = _forward(params, x_t, t, cond, steps)
    v = np.asarray(v, np.float32).reshape(x_t.shape)
    _, d_in = _backward(params, cache, v * c_out(t, ab), need_params=False)
    return _x0_from(out, x_t, t, ab), (d_in + c_skip(t, ab) * v).astype(np.float32)
