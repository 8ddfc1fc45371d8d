"""The torch mirror of the edge's conditional video denoiser (`fedfleet.edge_agent.nn.video_denoiser`).

`VideoDenoiser(hidden)` holds the same tensors under the same names (`emb.*`, `conv{i}.*`, `cemb{i}.weight`),
builds the same condition embedding, the same U-Net of circular 3x3 convolutions (`video_denoiser.plan`: 2x2
average pooling down, nearest upsampling up, skip concatenations, the embedding added per channel in every
block, residual blocks) and the same
x0-parametrisation (EDM's c_skip and c_out); `predict_x0` is the clean-clip estimate and `forward` the derived noise
prediction, both shaped like x_t. `layout_state()` keys are exactly the edge layout, so FedAvg state moves
between the two sides unchanged. Circular padding is written as slices and a concatenation, which the ONNX
exporter keeps as plain Slice/Concat nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfleet.edge_agent.nn import video_denoiser as vd


def alpha_bar(steps: int = vd.STEPS) -> torch.Tensor:
    return torch.from_numpy(vd.alpha_bar(steps))


def time_embedding(t: torch.Tensor, steps: int = vd.STEPS) -> torch.Tensor:
    half = vd.T_EMB // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    arg = (t.to(torch.float32).reshape(-1, 1) * (1000.0 / steps)) * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def circular_pad(x: torch.Tensor, d: int) -> torch.Tensor:
    """Pad the last two dimensions of (N, C, H, W) by d on each side, wrapping around."""
    x = torch.cat([x[:, :, -d:, :], x, x[:, :, :d, :]], dim=2)
    return torch.cat([x[:, :, :, -d:], x, x[:, :, :, :d]], dim=3)


class VideoDenoiser(nn.Module):
    """eps_theta(x_t, t, c): x_t (N, F, S, S) float32, t (N,) integer steps, cond (N,) ids digit * 4 + direction."""

    def __init__(self, hidden: tuple[int, ...] = vd.DEFAULT_HIDDEN, steps: int = vd.STEPS) -> None:
        super().__init__()
        self.hidden, self.steps = tuple(int(h) for h in hidden), steps
        self.plan = vd.plan(self.hidden)
        self.params = nn.ParameterDict()
        for name, shape in vd.layout(self.hidden):
            self.params[name.replace(".", "__")] = nn.Parameter(torch.zeros(shape))
        self.register_buffer("eye_digit", torch.eye(vd.CLASSES + 1, vd.CLASSES), persistent=False)  # NULL_DIGIT: 0s
        self.register_buffer("eye_direction", torch.eye(len(vd.DIRECTIONS)), persistent=False)
        self.register_buffer("alpha_bar", alpha_bar(steps).to(torch.float32), persistent=False)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor | np.ndarray], steps: int = vd.STEPS) -> VideoDenoiser:
        """A denoiser whose block widths are read off the `conv{i}.weight` shapes of `state`."""
        model = cls(vd.hidden_of(dict(state)), steps)
        model.load_layout(state)
        return model

    def p(self, name: str) -> torch.Tensor:
        return self.params[name.replace(".", "__")]

    def load_layout(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        want = dict(vd.layout(self.hidden))
        if set(state) != set(want):
            raise KeyError(f"denoiser tensors {sorted(state)} are not the layout {sorted(want)}")
        with torch.no_grad():
            for name in want:
                self.p(name).copy_(torch.as_tensor(np.asarray(state[name]), dtype=torch.float32))

    def layout_state(self) -> dict[str, torch.Tensor]:
        """The tensors under the edge layout's names."""
        return {name: self.p(name).detach().clone() for name, _ in vd.layout(self.hidden)}

    def residual(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond, t = cond.to(torch.long), t.to(torch.long)
        e_in = torch.cat([time_embedding(t, self.steps), self.eye_digit[cond // len(vd.DIRECTIONS)],
                          self.eye_direction[cond % len(vd.DIRECTIONS)]], dim=1)
        e = torch.relu(e_in @ self.p("emb.weight").T + self.p("emb.bias"))
        hs = {-1: x_t}
        for i, layer in enumerate(self.plan):
            parts = [hs[src] if op == "same" else F.avg_pool2d(hs[src], 2) if op == "pool"
                     else F.interpolate(hs[src], scale_factor=2.0, mode="nearest") for src, op in layer.sources]
            inp = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            pre = F.conv2d(circular_pad(inp, 1), self.p(f"conv{i}.weight"), self.p(f"conv{i}.bias"))
            if layer.out:
                return pre
            a = torch.relu(pre + (e @ self.p(f"cemb{i}.weight").T)[:, :, None, None])
            hs[i] = a + inp if layer.residual else a
        raise AssertionError("the plan ends with the output convolution")

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The clean-clip estimate x0_hat (the edge's `predict_x0`), shaped like x_t."""
        a = self.alpha_bar[t.to(torch.long)].reshape(-1, 1, 1, 1)
        skip = torch.sqrt(a) * vd.STD**2 / (a * vd.STD**2 + 1.0 - a)
        out = torch.sqrt(1.0 - a) * vd.STD / torch.sqrt(a * vd.STD**2 + 1.0 - a)
        return vd.MEAN + skip * (x_t - torch.sqrt(a) * vd.MEAN) + out * self.residual(x_t, t, cond)

    def c_out(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t.to(torch.long)].reshape(-1, 1, 1, 1)
        return torch.sqrt(1.0 - a) * vd.STD / torch.sqrt(a * vd.STD**2 + 1.0 - a)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The noise prediction eps_theta(x_t, t, c) = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)."""
        x0 = self.predict_x0(x_t, t, cond)
        a = self.alpha_bar[t.to(torch.long)].reshape(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - torch.sqrt(a) * x0) / torch.sqrt(1.0 - a)
