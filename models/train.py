"""Central training of a torch classifier: seeded minibatch Adam on cross-entropy (the zoo's models and the
transfer backbone's pre-training share it)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int,
        weight_decay: float = 0.0) -> nn.Module:
    """Train `model` in place (batches shuffled with numpy PCG64(seed)) and return it in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.Generator(np.random.PCG64(seed))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(yt)))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()
