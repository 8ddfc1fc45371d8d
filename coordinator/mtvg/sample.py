"""MTVG sampling on the coordinator: the global video denoiser in torch, structure guidance by autograd.

The procedure is the edge's one loop (`fedfleet.edge_agent.mtvg.sample.sample_sequences`, whose docstring states the method):
DDIM (eta 0), Last-Frame-Aware Inversion, Dynamic Noise and Structure-Guiding Sampling, each switchable by
`MTVGOptions`. Only the network passes and the guidance gradient differ: here they are the torch
`VideoDenoiser` and `torch.autograd.grad` (`denoiser_fns`); on a device they are ONNX Runtime and
`video_denoiser.vjp_input`.
Both draw their noise with numpy from the seed, so for the same seed they give the same frames.
It is MTVG's procedure on a toy video model, not text-to-video generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedfleet.edge_agent.mtvg import sample as edge_mtvg
from fedfleet.edge_agent.mtvg.sample import MTVGOptions, VjpFn, X0Fn, load_weights
from fedfleet.models.mirrors.video_denoiser import VideoDenoiser

__all__ = ["MTVGOptions", "load_denoiser", "sample_sequences"]


def load_denoiser(path: str | Path) -> VideoDenoiser:
    """A `VideoDenoiser` from a `denoiser.npz` (checked like the agent checks it: a `ModelError` if wrong)."""
    return from_state(load_weights(path))


def from_state(state: Mapping[str, np.ndarray | torch.Tensor]) -> VideoDenoiser:
    model = VideoDenoiser.from_state(state)
    model.eval()
    return model


def denoiser_fns(model: VideoDenoiser) -> tuple[X0Fn, VjpFn]:
    """(x0_fn, vjp_fn) of a torch denoiser on numpy arrays: the clean-clip estimate, and v^T dx0_hat/dx_t by
    autograd, for `fedfleet.edge_agent.mtvg.sample.sample_sequences`."""

    @torch.no_grad()
    def x0_fn(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        return model.predict_x0(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond)).numpy()

    def vjp_fn(x: np.ndarray, t: np.ndarray, cond: np.ndarray, v: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
        with torch.enable_grad():
            x0 = model.predict_x0(xt, torch.from_numpy(t), torch.from_numpy(cond))
            (grad,) = torch.autograd.grad(x0, xt, grad_outputs=torch.from_numpy(np.ascontiguousarray(v)))
        return grad.numpy()

    return x0_fn, vjp_fn


def sample_sequences(model: VideoDenoiser, conditions: np.ndarray, seed: int,
                     options: MTVGOptions | None = None) -> np.ndarray:
    """Frames (N, K, F, S, S) in [-1, 1] for N sequences of K condition ids each (`conditions` (N, K) or (K,))."""
    return edge_mtvg.sample_sequences(*denoiser_fns(model), conditions, seed, options)
