"""What an MTVG generation writes: frames, a PNG strip, an animated GIF and per-segment metrics.

Shared by `fedfleet generate` (coordinator, torch) and `fedfleet-agent generate` (device, ONNX Runtime), so
both write the same files into the output directory:
- `frames.npy`: float32 (K, F, S, S) in [-1, 1], one clip per segment;
- `strip.png`: one row per segment, frames left to right (Pillow; skipped with a note when it is absent);
- `sequence.gif`: every frame in order, looping (Pillow);
- `segments.json`: the prompt, the seed, the options and per segment its condition, the boundary MSE to the
  previous segment (its first frame against the previous last frame) and the estimated motion (the wrapped
  1- or 2-pixel shift per frame that best maps each frame to the next) with whether it matches the condition.
Numpy only (Pillow optional); never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.edge_agent.mtvg.prompts import describe
from fedfleet.edge_agent.nn.video_denoiser import DIRECTIONS

MOTION = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (row, col) per frame at speed 1
SPEEDS = (1, 2)
SCALE = 4  # output pixels per canvas pixel


def boundary_mse(seqs: np.ndarray) -> np.ndarray:
    """(N, K-1) pixel MSE between each segment's last frame and the next one's first; seqs (N, K, F, S, S)."""
    return np.mean((seqs[:, 1:, 0] - seqs[:, :-1, -1]) ** 2, axis=(-2, -1))


def estimate_motion(clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(direction, speed) int64 (N,) per clip (N, F, S, S): the wrapped shift that best maps frame f to f + 1."""
    clips = np.asarray(clips, np.float32)
    err = np.empty((len(clips), len(DIRECTIONS), len(SPEEDS)))
    for d, name in enumerate(DIRECTIONS):
        dr, dc = MOTION[name]
        for j, s in enumerate(SPEEDS):
            shifted = np.roll(clips[:, :-1], (dr * s, dc * s), axis=(-2, -1))
            err[:, d, j] = np.mean((shifted - clips[:, 1:]) ** 2, axis=(1, 2, 3))
    best = err.reshape(len(clips), -1).argmin(1)
    return best // len(SPEEDS), np.asarray(SPEEDS)[best % len(SPEEDS)]


def segment_metrics(seq: np.ndarray, conds: np.ndarray) -> list[dict[str, Any]]:
    """Per segment of one sequence (K, F, S, S) with condition ids (K,)."""
    direction, speed = estimate_motion(seq)
    bmse = boundary_mse(seq[None])[0]
    out = []
    for k, c in enumerate(np.asarray(conds, np.int64)):
        out.append({"segment": k, "condition": describe(int(c)), "condition_id": int(c),
                    "boundary_mse_to_previous": None if k == 0 else float(bmse[k - 1]),
                    "estimated_direction": DIRECTIONS[int(direction[k])], "estimated_speed": int(speed[k]),
                    "motion_matches_condition": bool(direction[k] == c % len(DIRECTIONS))})
    return out


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


def write_outputs(out_dir: str | Path, seq: np.ndarray, conds: np.ndarray, meta: dict[str, Any],
                  extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the files above; `extra` adds keys to each segment's metrics. Returns the JSON written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "frames.npy", seq.astype(np.float32))
    segments = segment_metrics(seq, conds)
    for s, more in zip(segments, extra or []):
        s.update(more)
    files = ["frames.npy", "segments.json"]
    try:
        from PIL import Image
    except ImportError:  # the edge extra does not need Pillow; the frames are still written
        meta = {**meta, "images": "not written: Pillow is not installed"}
    else:
        Image.fromarray(strip(seq)).save(out / "strip.png")
        frames = [Image.fromarray(np.kron(_u8(fr), np.ones((SCALE * 2, SCALE * 2), np.uint8)))
                  for fr in seq.reshape(-1, *seq.shape[-2:])]
        frames[0].save(out / "sequence.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)
        files += ["strip.png", "sequence.gif"]
    bm = [s["boundary_mse_to_previous"] for s in segments[1:]]
    doc = {**meta, "files": files, "segments": segments,
           "mean_boundary_mse": float(np.mean(bm)) if bm else None}
    (out / "segments.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc
