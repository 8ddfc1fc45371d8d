"""MTVG sampling on the coordinator: the global video denoiser in torch, structure guidance by autograd.

The procedure, its defaults and the noise are exactly the edge's (`edge_agent.mtvg`, whose docstring states
the method): DDIM (eta 0), Last-Frame-Aware Inversion, Dynamic Noise and Structure-Guiding Sampling, each
switchable by `MTVGOptions`. Only the network passes and the guidance gradient differ: here they are the torch
`VideoDenoiser` and `torch.autograd.grad`; on a device they are ONNX Runtime and `video_denoiser.vjp_input`.
Both draw their noise with numpy from the seed, so for the same seed they give the same frames.
It is MTVG's procedure on a toy video model, not text-to-video generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from coordinator.video_denoiser import VideoDenoiser
from edge_agent import video_denoiser as vd
from edge_agent.mtvg import (
    CLIP,
    FD_STEP,
    MTVGOptions,
    ddim_update,
    dynamic_weights,
    inversion_schedule,
    linesearch_length,
    load_weights,
    segment_noise,
    step_schedule,
)

__all__ = ["MTVGOptions", "load_denoiser", "sample_sequences"]


def load_denoiser(path: str | Path) -> VideoDenoiser:
    """A `VideoDenoiser` from a `denoiser.npz` (checked like the agent checks it: a `ModelError` if wrong)."""
    return from_state(load_weights(path))


def from_state(state: Mapping[str, np.ndarray | torch.Tensor]) -> VideoDenoiser:
    model = VideoDenoiser.from_state(state)
    model.eval()
    return model


def _rms(a: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.mean(a.reshape(a.shape[0], -1) ** 2, dim=1)).reshape(-1, 1, 1, 1)


def _guide(model: VideoDenoiser, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
           opts: MTVGOptions) -> torch.Tensor:
    """One structure-guiding update on 1/2 sum_f |x0_hat^f - ref^f|^2 (references held), by `opts.guide_step`."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        x0 = model.predict_x0(x, t, c)
        held = x0.detach()
        ref = torch.cat([held[:, :1], held[:, :-1]], dim=1)
        mask = torch.ones((1, vd.FRAMES, 1, 1))
        mask[:, 0] = 0.0  # frame 0 has no preceding frame in the clip
        resid = (x0 - ref) * mask
        loss = 0.5 * torch.sum(resid**2)
        (grad,) = torch.autograd.grad(loss, x)
    x, resid = x.detach(), resid.detach()
    g = _rms(grad)
    d = grad / torch.where(g > 0, g, torch.ones_like(g))
    if opts.guide_step == "normalised":
        return x - opts.guide_scale * _rms(resid) * d
    with torch.no_grad():
        jd = (model.predict_x0(x + FD_STEP * d, t, c) - held) / FD_STEP * mask
    step = linesearch_length(resid.numpy(), jd.numpy(), opts.guide_scale, opts.guide_max)
    return x - torch.from_numpy(step) * d


@torch.no_grad()
def sample_sequences(model: VideoDenoiser, conditions: np.ndarray, seed: int,
                     options: MTVGOptions | None = None) -> np.ndarray:
    """Frames (N, K, F, S, S) in [-1, 1] for N sequences of K condition ids each (`conditions` (N, K) or (K,))."""
    opts = (options or MTVGOptions()).check()
    conds = np.atleast_2d(np.asarray(conditions, np.int64))
    n, k_max = conds.shape
    sched, inv_sched = step_schedule(opts.steps), inversion_schedule(opts.steps)
    lam = torch.from_numpy(dynamic_weights(opts.noise_max)).reshape(1, -1, 1, 1)
    out = np.empty((n, k_max, *CLIP), np.float32)
    prev_last: torch.Tensor | None = None
    for k in range(k_max):
        c = torch.from_numpy(conds[:, k])
        init, fresh = (torch.from_numpy(a) for a in segment_noise(seed, k, n))
        x = init
        if prev_last is not None and opts.inversion:
            x = prev_last[:, None].repeat(1, vd.FRAMES, 1, 1)
            for t, a_t, a_up in inv_sched:
                x = ddim_update(x, model.predict_x0(x, torch.full((n,), t), c), a_t, a_up)
            if opts.dynamic_noise:
                x = torch.sqrt(1.0 - lam) * x + torch.sqrt(lam) * fresh
        for i, (t, a_t, a_next) in enumerate(sched):
            tt = torch.full((n,), t)
            if i < opts.guided_steps:
                for _ in range(opts.guide_iters):
                    x = _guide(model, x, tt, c, opts)
            x = ddim_update(x, model.predict_x0(x, tt, c), a_t, a_next)
        segment = torch.clamp(x, -1.0, 1.0)
        out[:, k] = segment.numpy()
        prev_last = segment[:, -1]
    return out
