"""Pictures of generated moving-digit sequences: a PNG strip (one row per segment) and an animated GIF.

Frames are float in [-1, 1]; they are drawn as greyscale with 0 = background. Pillow only (already a
matplotlib dependency); `comparison_png` uses matplotlib for the benchmark's naive-vs-MTVG figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

SCALE = 4  # pixels per canvas pixel in the strip and GIF


def _u8(frames: np.ndarray) -> np.ndarray:
    return (np.clip((np.asarray(frames) + 1.0) / 2.0, 0.0, 1.0) * 255).round().astype(np.uint8)


def strip(seq: np.ndarray, gap: int = 1) -> np.ndarray:
    """uint8 image: segments (K, F, S, S) as K rows of F frames, a `gap`-pixel grey line between frames."""
    k, f, s, _ = seq.shape
    img = np.full((k * (s + gap) - gap, f * (s + gap) - gap), 96, np.uint8)
    for i in range(k):
        for j in range(f):
            img[i * (s + gap): i * (s + gap) + s, j * (s + gap): j * (s + gap) + s] = _u8(seq[i, j])
    return np.kron(img, np.ones((SCALE, SCALE), np.uint8))


def write_strip(path: str | Path, seq: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(strip(seq)).save(path)
    return Path(path)


def write_gif(path: str | Path, seq: np.ndarray, ms_per_frame: int = 120) -> Path:
    """All segments' frames one after the other, looping."""
    from PIL import Image

    frames = [Image.fromarray(np.kron(_u8(fr), np.ones((SCALE * 2, SCALE * 2), np.uint8)))
              for fr in seq.reshape(-1, *seq.shape[-2:])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return Path(path)


def comparison_png(path: str | Path, rows: Sequence[tuple[str, np.ndarray]]) -> Path:
    """One long row of frames per (title, sequence (K, F, S, S)), stacked, segment borders marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(14, 1.1 * len(rows) + 0.4), squeeze=False)
    for ax, (title, seq) in zip(axes[:, 0], rows):
        k, f, s, _ = seq.shape
        ax.imshow(strip(seq.reshape(1, k * f, s, s)), cmap="gray", vmin=0, vmax=255)
        for b in range(1, k):
            ax.axvline(b * f * (s + 1) * SCALE - SCALE / 2, color="red", lw=1.5)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
