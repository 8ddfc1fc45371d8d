"""Moving digits: the synthetic clip dataset that fedfleet's toy video diffusion model learns.

An 8x8 sklearn digit moves across a 16x16 canvas for `FRAMES` (8) frames, wrapping around the edges (a torus,
so any start position can continue in any direction). Each clip has a digit class, a direction
(`fedfleet.edge_agent.nn.video_denoiser.DIRECTIONS`) and a speed in pixels per frame (1 or 2, not part of the condition).

Clips are float32 in [-1, 1] (background -1), shape (N, FRAMES, SIZE, SIZE). The label of a clip is its
condition id `digit * 4 + direction` (`fedfleet.edge_agent.nn.video_denoiser.condition_id`), so the usual partitioners
(Dirichlet skew over the label) and `LocalData(x, y)` carry clips unchanged.

Seeded: `clips(images, labels, rng)` draws one clip per (image, repeat) with its own direction, speed and
start; `moving_digits(seed)` builds the train and test clip sets from a stratified split of digits, so no
test image is ever seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfleet.edge_agent.nn.video_denoiser import DIRECTIONS, FRAMES, SIZE, condition_id
from fedfleet.models import data as datasets

SPEEDS = (1, 2)
STEPS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (row, col) per frame at speed 1


@dataclass
class ClipSet:
    x: np.ndarray  # float32 (N, FRAMES, SIZE, SIZE) in [-1, 1]
    y: np.ndarray  # int64 (N,) condition ids digit * 4 + direction
    speed: np.ndarray  # int64 (N,) pixels per frame
    start: np.ndarray  # int64 (N, 2) top-left (row, col) of the digit in frame 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def digit(self) -> np.ndarray:
        return self.y // len(DIRECTIONS)

    @property
    def direction(self) -> np.ndarray:
        return self.y % len(DIRECTIONS)


def render(image: np.ndarray, direction: int, speed: int, start: tuple[int, int], frames: int = FRAMES) -> np.ndarray:
    """One clip (frames, SIZE, SIZE) in [-1, 1]: `image` (8, 8) in [0, 1] placed at `start`, moving with wrap."""
    canvas = np.zeros((SIZE, SIZE), np.float32)
    canvas[: image.shape[0], : image.shape[1]] = image
    dr, dc = STEPS[DIRECTIONS[direction]]
    out = np.empty((frames, SIZE, SIZE), np.float32)
    for f in range(frames):
        out[f] = np.roll(canvas, (start[0] + dr * speed * f, start[1] + dc * speed * f), axis=(0, 1))
    return out * 2.0 - 1.0


def clips(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, repeats: int = 1,
          frames: int = FRAMES) -> ClipSet:
    """`repeats` clips per image (N, 8, 8) in [0, 1], each with a random direction, speed and start."""
    n = len(labels) * repeats
    idx = np.repeat(np.arange(len(labels)), repeats)
    direction = rng.integers(0, len(DIRECTIONS), n)
    speed = rng.choice(np.asarray(SPEEDS), n)
    start = rng.integers(0, SIZE, (n, 2))
    x = np.stack([render(images[i], int(d), int(s), (int(r), int(c)), frames)
                  for i, d, s, (r, c) in zip(idx, direction, speed, start, strict=True)])
    y = condition_id(np.asarray(labels)[idx], direction)
    return ClipSet(x, y.astype(np.int64), speed.astype(np.int64), start.astype(np.int64))


def moving_digits(seed: int = 0, repeats: int = 4, test_fraction: float = 0.2) -> tuple[ClipSet, ClipSet]:
    """(train, test) clip sets from a stratified split of sklearn's digits; `repeats` clips per image."""
    full = datasets.digits()
    train, test = datasets.split(full, test_fraction, seed=seed)
    rng = np.random.default_rng([seed, 0x5EED])
    images = lambda d: d.x.reshape(-1, 8, 8)  # noqa: E731
    return clips(images(train), train.y, rng, repeats), clips(images(test), test.y, rng, 1)
