"""The frozen backbone of the PLAID example: ROCKET-style random convolutional features (no training).

`make_backbone()` returns a torch module mapping current signatures (N, 1, 256) to 160 features: 80 random
1-D convolution kernels (length 9, 16 at each dilation 1, 2, 4, 8, 16, zero-mean weights and biases drawn
from a fixed seed with numpy's PCG64), each followed by ReLU and summarised by its maximum and its mean over
time (the mean of a ReLU is ROCKET's "proportion of positive values", smoothed). Its weights are random and
fixed, never trained, so no data, the fleet's or anyone's, went into them: the head that the fleet trains on
top of them is the only learnt part (after Dempster et al., "ROCKET", 2020).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SEED = 20200101
KERNEL = 9
PER_DILATION = 16
DILATIONS = (1, 2, 4, 8, 16)


class RandomConvFeatures(nn.Module):
    def __init__(self, seed: int = SEED) -> None:
        super().__init__()
        rng = np.random.Generator(np.random.PCG64(seed))
        self.convs = nn.ModuleList()
        for d in DILATIONS:
            conv = nn.Conv1d(1, PER_DILATION, KERNEL, dilation=d, padding=d * (KERNEL // 2))
            w = rng.normal(size=(PER_DILATION, 1, KERNEL))
            w -= w.mean(axis=2, keepdims=True)
            conv.weight.data = torch.from_numpy(w.astype(np.float32))
            conv.bias.data = torch.from_numpy(rng.uniform(-0.5, 0.5, PER_DILATION).astype(np.float32))
            conv.requires_grad_(False)
            self.convs.append(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for conv in self.convs:
            h = torch.relu(conv(x))
            feats += [h.amax(dim=2), h.mean(dim=2)]
        return torch.cat(feats, dim=1)


def make_backbone() -> nn.Module:
    return RandomConvFeatures().eval()
