"""The condition classifier that scores generated moving-digit clips: digit class and motion direction.

Trained centrally on real clips (`fedfleet.models.moving_digits`), in torch: a small MLP with one hidden layer
and two heads, 10 digit logits and 4 direction logits, on two feature blocks:
- the clip's mean frame after each frame is rolled so that its circular centre of mass sits at the canvas
  centre (the canvas is a torus, so this undoes the digit's position: a flat MLP cannot learn digits at
  random wrapped positions, which we measured at chance level);
- the frame differences x[f+1] - x[f], which carry the motion.
It is trained with the sum of both cross-entropies by Adam. `train(seed)` returns the
classifier and its held-out accuracy (digit AND direction right) on the test clips, whose images are never
seen in training. Seeded (numpy batches, `torch.manual_seed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.models import moving_digits as md


def centred(frames: np.ndarray) -> np.ndarray:
    """Frames (..., S, S) each rolled so that its circular centre of mass (weights x + 1) is at (S/2, S/2)."""
    flat = np.asarray(frames, np.float32).reshape(-1, vd.SIZE, vd.SIZE)
    w = flat + 1.0
    phase = np.exp(2j * np.pi * np.arange(vd.SIZE) / vd.SIZE)
    r = np.angle(w.sum(2) @ phase) * vd.SIZE / (2 * np.pi)
    c = np.angle(w.sum(1) @ phase) * vd.SIZE / (2 * np.pi)
    sr = np.round(vd.SIZE / 2 - r).astype(np.int64)
    sc = np.round(vd.SIZE / 2 - c).astype(np.int64)
    idx = np.arange(vd.SIZE)
    rows = (idx[None, :] - sr[:, None]) % vd.SIZE  # np.roll by sr: out[i] = img[(i - sr) % S]
    cols = (idx[None, :] - sc[:, None]) % vd.SIZE
    out = flat[np.arange(len(flat))[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.reshape(np.shape(frames))


def features(x: np.ndarray) -> torch.Tensor:
    """(N, S*S + (F-1)*S*S): the mean centred frame and the frame differences."""
    x = np.asarray(x, np.float32).reshape(-1, vd.FRAMES, vd.SIZE, vd.SIZE)
    mean_frame = centred(x).mean(axis=1).reshape(len(x), -1)
    diffs = (x[:, 1:] - x[:, :-1]).reshape(len(x), -1)
    return torch.from_numpy(np.concatenate([mean_frame, diffs], axis=1))


class ClipClassifier(nn.Module):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        dim = vd.FRAMES * vd.SIZE * vd.SIZE
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.digit = nn.Linear(hidden, vd.CLASSES)
        self.direction = nn.Linear(hidden, len(vd.DIRECTIONS))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(feats)
        return self.digit(h), self.direction(h)

    @torch.no_grad()
    def predict(self, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(digit, direction) int64 arrays for clips (N, F, S, S)."""
        self.eval()
        d, m = self(features(clips))
        return d.argmax(1).numpy(), m.argmax(1).numpy()


@dataclass
class Trained:
    model: ClipClassifier
    test_accuracy: float  # digit AND direction both right, on held-out real clips
    test_digit_accuracy: float
    test_direction_accuracy: float


def accuracy(model: ClipClassifier, clips: np.ndarray, conds: np.ndarray) -> tuple[float, float, float]:
    d, m = model.predict(clips)
    dt, mt = np.asarray(conds) // len(vd.DIRECTIONS), np.asarray(conds) % len(vd.DIRECTIONS)
    return float(np.mean((d == dt) & (m == mt))), float(np.mean(d == dt)), float(np.mean(m == mt))


def train(seed: int = 0, epochs: int = 12, repeats: int = 4, hidden: int = 256, batch: int = 128,
          lr: float = 1e-3) -> Trained:
    train_set, test_set = md.moving_digits(seed=seed, repeats=repeats)
    torch.manual_seed(seed)
    model = ClipClassifier(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    feats = features(train_set.x)
    digit = torch.from_numpy(train_set.digit)
    direction = torch.from_numpy(train_set.direction)
    rng = np.random.default_rng([seed, 0xC1A5])
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(train_set)), max(1, len(train_set) // batch)):
            i = torch.from_numpy(idx)
            d, m = model(feats[i])
            loss = loss_fn(d, digit[i]) + loss_fn(m, direction[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    both, dig, mot = accuracy(model, test_set.x, test_set.y)
    return Trained(model, both, dig, mot)
