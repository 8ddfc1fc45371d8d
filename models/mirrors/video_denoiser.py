"""The torch mirror of the edge's conditional video denoiser (`fedfleet.edge_agent.nn.video_denoiser`).

`VideoDenoiser(hidden)` holds `fedfleet.models.mirrors.head.MLPHead` layers under the same `fc{i}` names, builds the
same network input (flattened x_t, the DDPM time embedding, one-hot digit and direction) and the same
x0-parametrisation with a fixed skip; `predict_x0` is the clean-clip estimate and `forward` the derived noise
prediction, both shaped like x_t. `state_dict()` keys are exactly the edge layout, so FedAvg state moves
between the two sides unchanged. `alpha_bar()` is the edge's schedule as a float64 tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.models.mirrors.head import MLPHead


def alpha_bar(steps: int = vd.STEPS) -> torch.Tensor:
    return torch.from_numpy(vd.alpha_bar(steps))


def time_embedding(t: torch.Tensor, steps: int = vd.STEPS) -> torch.Tensor:
    half = vd.T_EMB // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    arg = (t.to(torch.float32).reshape(-1, 1) * (1000.0 / steps)) * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class VideoDenoiser(nn.Module):
    """eps_theta(x_t, t, c): x_t (N, F, S, S) float32, t (N,) integer steps, cond (N,) ids digit * 4 + direction."""

    def __init__(self, hidden: tuple[int, ...] = vd.DEFAULT_HIDDEN, steps: int = vd.STEPS) -> None:
        super().__init__()
        self.hidden, self.steps = tuple(hidden), steps
        self.net = MLPHead(vd.sizes(self.hidden))
        self.register_buffer("eye_digit", torch.eye(vd.CLASSES), persistent=False)
        self.register_buffer("eye_direction", torch.eye(len(vd.DIRECTIONS)), persistent=False)
        self.register_buffer("alpha_bar", alpha_bar(steps).to(torch.float32), persistent=False)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor | np.ndarray], steps: int = vd.STEPS) -> VideoDenoiser:
        """A denoiser whose hidden widths are read off the `fc{i}.weight` shapes of `state`."""
        n = sum(1 for k in state if k.endswith(".weight"))
        hidden = tuple(int(np.shape(state[f"fc{i}.weight"])[0]) for i in range(n - 1))
        model = cls(hidden, steps)
        model.load_layout(state)
        return model

    def load_layout(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        self.net.load_state_dict({k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in state.items()})

    def layout_state(self) -> dict[str, torch.Tensor]:
        """The tensors under the edge layout's names (`fc{i}.weight`, `fc{i}.bias`)."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The clean-clip estimate x0_hat (the edge's `predict_x0`), shaped like x_t."""
        n = x_t.shape[0]
        cond, t = cond.to(torch.long), t.to(torch.long)
        flat = x_t.reshape(n, -1)
        feats = torch.cat([flat, time_embedding(t, self.steps),
                           self.eye_digit[cond // len(vd.DIRECTIONS)], self.eye_direction[cond % len(vd.DIRECTIONS)]],
                          dim=1)
        a = self.alpha_bar[t].reshape(-1, 1)
        skip = torch.sqrt(a) * vd.STD**2 / (a * vd.STD**2 + 1.0 - a)
        return (vd.MEAN + skip * (flat - torch.sqrt(a) * vd.MEAN) + self.net(feats)).reshape(x_t.shape)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The noise prediction eps_theta(x_t, t, c) = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)."""
        x0 = self.predict_x0(x_t, t, cond)
        a = self.alpha_bar[t.to(torch.long)].reshape(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - torch.sqrt(a) * x0) / torch.sqrt(1.0 - a)
