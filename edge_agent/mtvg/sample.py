"""MTVG sampling on a device: the exported video denoiser through ONNX Runtime, guidance gradients in numpy.

MTVG (Oh et al., arXiv 2312.04086) chains clips from a frozen video diffusion model, one clip per prompt. Here
it runs on fedfleet's toy model (`fedfleet.edge_agent.nn.video_denoiser`): MTVG's procedure on a toy video model, not
text-to-video generation. Segment k of a sequence, with condition c_k, is sampled by DDIM (eta 0) as follows:

- **Last-Frame-Aware Inversion** (k >= 1): the previous segment's last frame, repeated over all FRAMES, is
  DDIM-inverted with c_k through the whole sampling schedule (t = 0 up to the first sampling step, as the
  paper inverts to the start of sampling) and becomes the segment's initial latent.
- **Dynamic Noise**: the inverted latent z_inv is blended with fresh noise per frame,
  z^f = sqrt(1 - l_f) z_inv^f + sqrt(l_f) eps^f with l_f = noise_max * f / (FRAMES - 1): the first frame keeps
  the inverted latent (continuity), later frames get more fresh noise (new motion instead of the previous one).
- **Structure-Guiding Sampling**: during the first `guide_fraction` of the sampling steps, `guide_iters` times
  per step, the latent takes a step on L = 1/2 sum_{f>=1} |x0_hat^f(z_t) - ref^f|^2, the references held
  fixed. By default (`guide_refs = "all"`, the later version of the paper, MEVG, ECCV'24) ref^f is the mean
  of the predictions of all preceding frames 0 .. f-1 of the clip (the gradient of
  1/2 sum_{j<f} |x0^f - x0^j|^2 / f with the x0^j held); `guide_refs = "previous"` is MTVG's first rule,
  ref^f = x0_hat^(f-1), the updates "across the preceding frame". Either keeps the appearance consistent
  within one clip. Continuity with the previous segment is the
  inversion's job; pulling frame 0's prediction at high noise towards the previous (sharp) last frame, which
  the first runs did, distorts the inverted latent (on the untrained denoiser it raised the boundary MSE from
  0.001 without guidance to about 0.33, 16 sequences).
  Each update moves z_t along d = g / rms(g) (g = dL/dz_t, held references) by a = min(guide_scale * a*,
  guide_max): a* = <r, J d> / |J d|^2 minimises the linearised loss 1/2 |r - a J d|^2 along d (r the masked
  residual, J d = dx0_hat/dz_t d by a finite difference: one more forward pass), and guide_max caps the RMS
  of each update, so the step neither overshoots where x0_hat depends strongly on z_t nor runs away where it
  hardly does (high noise). `guide_step = "normalised"` is the rule the first benchmark runs used,
  z_t -= 0.3 * rms(r) * g / rms(g): it runs away, because at high noise r hardly shrinks however far z_t moves
  (see docs/results).
- The first segment starts from fresh noise. Every technique can be switched off (`MTVGOptions`); with all
  three off (`MTVGOptions.naive()`) every segment is plain DDIM from its own fresh noise.

Classifier-free guidance on the digit (Ho and Salimans, 2022; part of the generator, not of MTVG, so naive
sampling uses it too): with `cfg_scale` w != 1 every network pass of sampling and structure guidance is
x0_w = x0(x_t, t, c without its digit) + w (x0(x_t, t, c) - x0(x_t, t, c without its digit)), both passes in
one batch (`video_denoiser.without_digit`: the digit's one-hot all zeros, the direction kept), and the guidance
gradient is the same combination of the two VJPs. Last-Frame-Aware Inversion uses the conditional pass alone
(w = 1): DDIM inversion under guidance drifts. It needs a denoiser trained with the digit dropped
(`video_denoiser.DIGIT_DROPOUT`); w = 1 is one plain pass.

Noise is drawn with numpy from the seed (`segment_noise`), so the coordinator's torch sampler
(`fedfleet.coordinator.mtvg.sample`) and this one give the same frames. The ONNX model must take `x_t` (N, F, S, S) float32,
`t` (N,) int64 and `cond` (N,) int64 and return the clean-clip estimate x0 (an output whose name contains
"x0"; an output named like "eps" is converted). The guidance gradient is `video_denoiser.vjp_input` on the
npz weights. A model file or weights whose shapes do not match are a `ModelError`. Never imports torch.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedfleet.edge_agent.errors import ConfigError, ModelError
from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.edge_agent.npz import read_npz

CLIP = (vd.FRAMES, vd.SIZE, vd.SIZE)
GUIDE_REFS = ("all", "previous")
DEFAULT_CFG_SCALE = 3.0  # chosen by the rule in docs/results (issue 25, classifier-free guidance)
MAX_CFG_SCALE = 20.0


@dataclass(frozen=True)
class MTVGOptions:
    """The sampler's settings. The defaults were set before any measurement (not tuned on the benchmark)."""

    steps: int = 50  # DDIM sampling steps (eta 0)
    inversion: bool = True  # Last-Frame-Aware Inversion
    dynamic_noise: bool = True
    structure_guidance: bool = True
    noise_max: float = 0.5  # Dynamic Noise's fresh-noise share l_f at the last frame
    guide_fraction: float = 0.2  # the early share of sampling steps with structure guidance
    guide_iters: int = 2  # latent updates per guided step
    guide_scale: float = 0.5  # share of the line-minimising step a* taken per update
    guide_max: float = 0.03  # cap on the RMS of one update of the latent (unit-variance noise at t = T)
    guide_step: str = "linesearch"  # or "normalised" (the first runs' rule, with guide_scale 0.3; it runs away)
    guide_refs: str = "all"  # each frame guided towards all preceding frames (MEVG), or "previous" (MTVG's first)
    cfg_scale: float = DEFAULT_CFG_SCALE  # classifier-free guidance weight on the digit; 1 = off (one pass)

    @classmethod
    def naive(cls, steps: int = 50, cfg_scale: float = DEFAULT_CFG_SCALE) -> MTVGOptions:
        return cls(steps=steps, inversion=False, dynamic_noise=False, structure_guidance=False, cfg_scale=cfg_scale)

    def without(self, technique: str) -> MTVGOptions:
        """The same options with one technique off: 'inversion', 'dynamic_noise' or 'structure_guidance'."""
        if technique not in ("inversion", "dynamic_noise", "structure_guidance"):
            raise ConfigError(f"unknown MTVG technique {technique!r}")
        return replace(self, **{technique: False})

    def check(self) -> MTVGOptions:
        if not 1 <= self.steps <= vd.STEPS:
            raise ConfigError(f"steps must be in 1..{vd.STEPS}, got {self.steps}")
        if not 0.0 <= self.noise_max <= 1.0:
            raise ConfigError(f"noise_max must be in [0, 1], got {self.noise_max}")
        if not 0.0 <= self.guide_fraction <= 1.0 or self.guide_iters < 0 or self.guide_scale < 0:
            raise ConfigError("guide_fraction must be in [0, 1], guide_iters and guide_scale >= 0")
        if self.guide_step not in ("linesearch", "normalised"):
            raise ConfigError(f"guide_step must be 'linesearch' or 'normalised', got {self.guide_step!r}")
        if self.guide_refs not in GUIDE_REFS:
            raise ConfigError(f"guide_refs must be one of {', '.join(GUIDE_REFS)}, got {self.guide_refs!r}")
        if not 0.0 <= self.cfg_scale <= MAX_CFG_SCALE:  # also refuses NaN
            raise ConfigError(f"cfg_scale must be in [0, {MAX_CFG_SCALE:g}], got {self.cfg_scale}")
        return self

    @property
    def guided_steps(self) -> int:
        return int(round(self.guide_fraction * self.steps)) if self.structure_guidance else 0


def timesteps(steps: int) -> np.ndarray:
    """The DDIM sampling steps, descending from STEPS - 1 to 0, int64 (steps,)."""
    return np.unique(np.linspace(0, vd.STEPS - 1, steps).round().astype(np.int64))[::-1].copy()


def segment_noise(seed: int, segment: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(initial noise, Dynamic Noise's fresh noise) for segment `segment` of sequences 0..n-1, float32 (n, F, S, S).

    Sequence i's noise comes from PCG64([seed, segment, i]) alone, so its frames do not depend on the batch."""
    init = np.empty((n, *CLIP), np.float32)
    fresh = np.empty((n, *CLIP), np.float32)
    for i in range(n):
        rng = np.random.Generator(np.random.PCG64([int(seed), int(segment), i]))
        init[i] = rng.standard_normal(CLIP, dtype=np.float32)
        fresh[i] = rng.standard_normal(CLIP, dtype=np.float32)
    return init, fresh


def dynamic_weights(noise_max: float, frames: int = vd.FRAMES) -> np.ndarray:
    """Dynamic Noise's fresh-noise share l_f per frame, float32 (frames,): 0 at the first frame, noise_max last."""
    return (noise_max * np.arange(frames, dtype=np.float32) / max(frames - 1, 1)).astype(np.float32)


def ddim_update(x, x0, a_t: float, a_next: float):  # noqa: ANN001, ANN201  (numpy arrays or torch tensors)
    """One deterministic DDIM move from step t (alpha_bar a_t) to a_next, given the clean estimate x0."""
    eps = (x - (a_t**0.5) * x0) / ((1.0 - a_t) ** 0.5)
    return (a_next**0.5) * x0 + ((1.0 - a_next) ** 0.5) * eps


def step_schedule(steps: int) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar of the next step) for sampling; the last step goes to alpha_bar 1 (x0)."""
    ab = vd.alpha_bar()
    ts = timesteps(steps)
    return [(int(t), float(ab[t]), float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]


def inversion_schedule(steps: int) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar of the next step up) for DDIM inversion from t = 0 to the first sampling step."""
    ab = vd.alpha_bar()
    ts = timesteps(steps)[::-1]
    return [(int(ts[i]), float(ab[ts[i]]), float(ab[ts[i + 1]])) for i in range(len(ts) - 1)]


def guidance_refs_np(x0: np.ndarray, refs: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """(references, mask) for the structure loss: per frame f >= 1 the mean of frames 0 .. f-1 ("all") or
    frame f-1 ("previous"); frame 0 has none."""
    if refs == "previous":
        ref = np.concatenate([x0[:, :1], x0[:, :-1]], axis=1)
    else:
        csum = np.cumsum(x0, axis=1, dtype=np.float64)
        counts = np.arange(1, x0.shape[1] + 1, dtype=np.float64).reshape(1, -1, 1, 1)
        mean_upto = (csum / counts).astype(np.float32)  # mean of frames 0..f
        ref = np.concatenate([x0[:, :1], mean_upto[:, :-1]], axis=1)
    mask = np.ones((1, vd.FRAMES, 1, 1), np.float32)
    mask[:, 0] = 0.0
    return ref, mask


def _rms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(a.reshape(a.shape[0], -1) ** 2, axis=1)).reshape(-1, 1, 1, 1)


def guidance_move(grad: np.ndarray, resid: np.ndarray, scale: float) -> np.ndarray:
    """The "normalised" rule's update -scale * rms(resid) * grad / rms(grad), per clip."""
    g = _rms(grad)
    return (-scale * _rms(resid) * grad / np.where(g > 0, g, 1.0)).astype(np.float32)


FD_STEP = 1e-2  # RMS of the finite-difference probe for J d


def linesearch_length(resid: np.ndarray, jd: np.ndarray, scale: float, cap: float) -> np.ndarray:
    """Per clip min(scale * <r, Jd> / |Jd|^2, cap), >= 0; shaped (N, 1, 1, 1)."""
    n = resid.shape[0]
    num = np.sum((resid * jd).reshape(n, -1), axis=1)
    den = np.sum((jd * jd).reshape(n, -1), axis=1)
    a = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(scale * a, 0.0, cap).astype(np.float32).reshape(-1, 1, 1, 1)


X0Fn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
VjpFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def guide_update(x0_fn: X0Fn, vjp_fn: VjpFn, x: np.ndarray, t: np.ndarray, cond: np.ndarray,
                 opts: MTVGOptions) -> np.ndarray:
    """One structure-guiding update of the latent x on 1/2 sum_f |x0_hat^f - ref^f|^2 (references held fixed),
    by `opts.guide_step`."""
    x0 = x0_fn(x, t, cond)
    ref, mask = guidance_refs_np(x0, opts.guide_refs)
    resid = (x0 - ref) * mask
    grad = vjp_fn(x, t, cond, resid)
    if opts.guide_step == "normalised":
        return x + guidance_move(grad, resid, opts.guide_scale)
    g = _rms(grad)
    d = (grad / np.where(g > 0, g, 1.0)).astype(np.float32)
    jd = (x0_fn((x + FD_STEP * d).astype(np.float32), t, cond) - x0) / FD_STEP * mask
    return (x - linesearch_length(resid, jd, opts.guide_scale, opts.guide_max) * d).astype(np.float32)


def digit_guided(x0_fn: X0Fn, vjp_fn: VjpFn, w: float) -> tuple[X0Fn, VjpFn]:
    """(x0_fn, vjp_fn) under classifier-free guidance on the digit with weight w: x0 without the digit plus w
    times (x0 with it minus x0 without it), the two passes batched; the VJP is the same combination."""
    if w == 1.0:
        return x0_fn, vjp_fn

    def both(c: np.ndarray) -> np.ndarray:
        return np.concatenate([c, vd.without_digit(c)])

    def x0_w(x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        out = x0_fn(np.concatenate([x, x]), np.concatenate([t, t]), both(c))
        cond, free = out[:len(x)], out[len(x):]
        return (free + w * (cond - free)).astype(np.float32)

    def vjp_w(x: np.ndarray, t: np.ndarray, c: np.ndarray, v: np.ndarray) -> np.ndarray:
        g = vjp_fn(np.concatenate([x, x]), np.concatenate([t, t]), both(c),
                   np.concatenate([w * v, (1.0 - w) * v]).astype(np.float32))
        return (g[:len(x)] + g[len(x):]).astype(np.float32)

    return x0_w, vjp_w


def sample_sequences(x0_fn: X0Fn, vjp_fn: VjpFn, conditions: np.ndarray, seed: int,
                     options: MTVGOptions | None = None) -> np.ndarray:
    """Frames (N, K, F, S, S) in [-1, 1] for N sequences of K conditions each (`conditions` (N, K) or (K,)).

    `x0_fn(x_t, t, cond)` is the clean-clip estimate; `vjp_fn(x_t, t, cond, v)` is v^T dx0_hat/dx_t."""
    opts = (options or MTVGOptions()).check()
    invert_fn = x0_fn  # inversion runs the conditional pass alone
    x0_fn, vjp_fn = digit_guided(x0_fn, vjp_fn, float(opts.cfg_scale))
    conds = np.atleast_2d(np.asarray(conditions, np.int64))
    n, k_max = conds.shape
    sched, inv_sched = step_schedule(opts.steps), inversion_schedule(opts.steps)
    lam = dynamic_weights(opts.noise_max).reshape(1, -1, 1, 1)
    out = np.empty((n, k_max, *CLIP), np.float32)
    prev_last: np.ndarray | None = None
    for k in range(k_max):
        c = conds[:, k]
        init, fresh = segment_noise(seed, k, n)
        x = init
        if prev_last is not None and opts.inversion:
            x = np.repeat(prev_last[:, None], vd.FRAMES, axis=1)
            for t, a_t, a_up in inv_sched:
                x = ddim_update(x, invert_fn(x, np.full(n, t, np.int64), c), a_t, a_up).astype(np.float32)
            if opts.dynamic_noise:
                x = (np.sqrt(1.0 - lam) * x + np.sqrt(lam) * fresh).astype(np.float32)
        for i, (t, a_t, a_next) in enumerate(sched):
            tt = np.full(n, t, np.int64)
            if i < opts.guided_steps:
                for _ in range(opts.guide_iters):
                    x = guide_update(x0_fn, vjp_fn, x, tt, c, opts)
            x = ddim_update(x, x0_fn(x, tt, c), a_t, a_next).astype(np.float32)
        out[:, k] = np.clip(x, -1.0, 1.0)
        prev_last = out[:, k, -1]
    return out


class OnnxDenoiser:
    """The exported denoiser in an ONNX Runtime session, and its npz weights for the guidance gradient."""

    def __init__(self, model_path: str | Path, weights_path: str | Path, *, threads: int = 1) -> None:
        import onnxruntime as ort

        self.params = load_weights(weights_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable files
            raise ModelError(f"{model_path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 3:
            raise ModelError(f"{model_path}: expected 3 inputs (x_t, t, cond), the model has {len(inputs)}")
        self.names = [i.name for i in inputs]
        shape = [d if isinstance(d, int) else None for d in inputs[0].shape]
        if len(shape) != 4 or shape[1:] != list(CLIP):
            raise ModelError(f"{model_path}: input {inputs[0].name!r} has shape {inputs[0].shape}; the video "
                             f"denoiser takes (N, {', '.join(map(str, CLIP))})")
        outputs = self.session.get_outputs()
        pick = [o for o in outputs if "x0" in o.name] or [o for o in outputs if "eps" in o.name] or outputs[:1]
        self.output = pick[0].name
        self.output_is_eps = "x0" not in self.output and "eps" in self.output
        probe = self._run(np.zeros((1, *CLIP), np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64))
        if probe.shape != (1, *CLIP):
            raise ModelError(f"{model_path}: output {self.output!r} has shape {probe.shape}, expected (1, "
                             f"{', '.join(map(str, CLIP))})")
        self.model_path = model_path
        try:  # classifier-free guidance passes conditions without their digit; older exports do not take them
            self._run(np.zeros((1, *CLIP), np.float32), np.zeros(1, np.int64), vd.without_digit(np.zeros(1, np.int64)))
            self.takes_no_digit = True
        except ModelError:
            self.takes_no_digit = False

    def _run(self, x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        feed = dict(zip(self.names, (np.ascontiguousarray(x, np.float32), t.astype(np.int64), cond.astype(np.int64))))
        try:
            return np.asarray(self.session.run([self.output], feed)[0], np.float32)
        except Exception as exc:  # a model whose inner shapes do not fit these inputs
            raise ModelError(f"the ONNX model cannot run on clips of shape {x.shape[1:]}: "
                             f"{str(exc).splitlines()[0][:200]}") from None

    def predict_x0(self, x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        out = self._run(x, t, cond)
        if self.output_is_eps:
            a = vd.alpha_bar()[t].astype(np.float32).reshape(-1, 1, 1, 1)
            out = (x - np.sqrt(1.0 - a) * out) / np.sqrt(a)
        return out

    def vjp(self, x: np.ndarray, t: np.ndarray, cond: np.ndarray, v: np.ndarray) -> np.ndarray:
        return vd.vjp_input(self.params, x, t, cond, v)[1]

    def sample(self, conditions: np.ndarray, seed: int, options: MTVGOptions | None = None) -> np.ndarray:
        if (options or MTVGOptions()).cfg_scale != 1.0 and not self.takes_no_digit:
            raise ModelError(f"{self.model_path}: this export does not take a condition without its digit, which "
                             "classifier-free guidance needs; re-export it with this fedfleet, or use --cfg-scale 1")
        return sample_sequences(self.predict_x0, self.vjp, conditions, seed, options)


MAX_WEIGHT_BYTES = 256 << 20  # the denoiser's weights, all tensors together


def load_weights(path: str | Path) -> vd.Params:
    """The denoiser's tensors from an npz, checked against the video denoiser's layout for the widths they imply."""
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not an .npz archive of denoiser weights")
    try:  # sizes checked before anything is allocated or inflated (fedfleet.edge_agent.npz)
        params = {k: np.asarray(v, np.float32) for k, v in read_npz(path, max_bytes=MAX_WEIGHT_BYTES).items()}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read denoiser weights ({exc})") from None
    try:
        hidden = vd.hidden_of(params)
    except (KeyError, ValueError):
        raise ModelError(f"{path}: expected the video denoiser's tensors (emb, conv0.., cemb0..), got "
                         f"{sorted(params)[:6]}") from None
    want = dict(vd.layout(hidden))
    if set(params) != set(want):
        raise ModelError(f"{path}: tensors {sorted(params)[:6]}... are not the denoiser layout {sorted(want)[:6]}...")
    for name, shape in want.items():
        if params[name].shape != shape:
            raise ModelError(f"{path}: {name} has shape {params[name].shape}, the video denoiser needs {shape}")
    if not all(np.all(np.isfinite(v)) for v in params.values()):
        raise ModelError(f"{path}: the weights hold non-finite values")
    return params
