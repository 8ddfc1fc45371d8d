"""What a "diffusion" model package says about its denoiser, and the check of it on load.

Mode "diffusion" has no backbone: the trainable layout is the whole conditional video denoiser
(`fedfleet.edge_agent.nn.video_denoiser`), a small U-Net (`emb.*`, `conv{i}.*`, `cemb{i}.weight`) from
the noisy clip, its step and its condition to the clip's x0 residual. The manifest carries, besides the usual fields:
- `objective`: "denoising" (the learner's loss, `fedfleet.edge_agent.nn.losses`);
- `input_shape` [frames, size, size] and `feature_dim` frames * size * size (the raw clip, flattened);
- `head_sizes` = `video_denoiser.sizes(hidden)` (channel widths), `head_layout` = `video_denoiser.layout(hidden)`;
  `classes` = the condition ids 0 .. 39 (digit * 4 + direction);
- `diffusion`: {"hidden", "frames", "size", "steps", "t_emb", "emb", "digits", "directions",
  "beta_start", "beta_end", "mean", "std", "parametrisation", "architecture", "digit_dropout"}, which must match the
  constants this code computes with.

`section(hidden, steps)` writes that table; `check(manifest, head_sizes, input_shape, feature_dim, head_layout)` raises
ModelError naming the field that disagrees. Numpy only.
"""

from __future__ import annotations

from typing import Any

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.nn import video_denoiser as vd

MODE = "diffusion"
OBJECTIVE = "denoising"
PARAMETRISATION = "x0-edm"
ARCHITECTURE = "circular-unet"


def section(hidden: tuple[int, ...], steps: int = vd.STEPS) -> dict[str, Any]:
    return {"hidden": [int(h) for h in hidden], "frames": vd.FRAMES, "size": vd.SIZE, "steps": int(steps),
            "t_emb": vd.T_EMB, "emb": vd.EMB, "architecture": ARCHITECTURE,
            "digits": vd.CLASSES, "directions": list(vd.DIRECTIONS),
            "beta_start": vd.BETA_START, "beta_end": vd.BETA_END, "mean": vd.MEAN, "std": vd.STD,
            "parametrisation": PARAMETRISATION, "digit_dropout": vd.DIGIT_DROPOUT}


def check(manifest: dict[str, Any], head_sizes: list[int], input_shape: tuple[int, ...], feature_dim: int,
          head_layout: list[tuple[str, tuple[int, ...]]] | None = None) -> None:
    """ModelError unless the manifest describes a denoiser this code can run."""
    spec = manifest.get("diffusion")
    if not isinstance(spec, dict):
        raise ModelError("a diffusion package needs a 'diffusion' table in its manifest; rebuild the package")
    if manifest.get("objective") != OBJECTIVE:
        raise ModelError(f"a diffusion package's objective must be {OBJECTIVE!r}, got {manifest.get('objective')!r}")
    hidden = spec.get("hidden")
    if (not isinstance(hidden, list) or not 1 <= len(hidden) <= vd.MAX_LEVELS
            or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)):
        raise ModelError(f"manifest diffusion.hidden must be a list of 1 to {vd.MAX_LEVELS} positive level widths, "
                         f"got {hidden!r}")
    steps = spec.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 2 <= steps <= 100_000:
        raise ModelError(f"manifest diffusion.steps must be an integer in [2, 100000], got {steps!r}")
    want = section(tuple(hidden), steps)
    for key, value in want.items():
        if spec.get(key) != value:
            raise ModelError(f"manifest diffusion.{key} is {spec.get(key)!r}, this fedfleet's denoiser has {value!r}; "
                             "rebuild the package or upgrade fedfleet")
    if tuple(input_shape) != (vd.FRAMES, vd.SIZE, vd.SIZE) or feature_dim != vd.PIXELS:
        raise ModelError(f"a diffusion package's input_shape must be {[vd.FRAMES, vd.SIZE, vd.SIZE]} and feature_dim "
                         f"{vd.PIXELS}, got {list(input_shape)} and {feature_dim}")
    if head_sizes != vd.sizes(tuple(hidden)):
        raise ModelError(f"head_sizes {head_sizes} are not the denoiser's {vd.sizes(tuple(hidden))} for hidden {hidden}")
    if head_layout is not None and list(head_layout) != vd.layout(tuple(hidden)):
        raise ModelError(f"head_layout is not the denoiser's layout for hidden {hidden}; rebuild the package")
    classes = manifest.get("classes")
    if classes != list(range(vd.CLASSES * len(vd.DIRECTIONS))):
        raise ModelError(f"a diffusion package's classes must be the condition ids 0..{vd.CLASSES * len(vd.DIRECTIONS) - 1}")
