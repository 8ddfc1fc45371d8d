"""Build the moving-digits diffusion model package (mode "diffusion"): no backbone, the whole denoiser.

`build_diffusion_package(hidden, seed, init=None) -> bytes` writes one deterministic zip that
`fedfleet.edge_agent.model.EdgeModel.from_bytes` loads and checks (`fedfleet.edge_agent.nn.diffusion_spec`):
- `manifest.json`: mode "diffusion", objective "denoising", input_shape [8, 16, 16], feature_dim 2048,
  head_sizes = `video_denoiser.sizes(hidden)`, head_layout = `video_denoiser.layout(hidden)`, classes (the 40
  condition ids), and the `diffusion` table (block widths, frames, size, steps, schedule, pixel statistics);
- `head_init.npz`: `init` when given (for example the centre's pre-trained weights,
  `fedfleet.models.pretrain_video_denoiser`), else `video_denoiser.init(hidden, seed)` (zero output conv).
No head graphs: the zeroth-order methods do not train this model.
"""

from __future__ import annotations

import json

import numpy as np

from fedfleet.edge_agent.model import FORMAT, FORMAT_VERSION, HEAD_INIT, MANIFEST
from fedfleet.edge_agent.nn import diffusion_spec
from fedfleet.edge_agent.nn import video_denoiser as vd
from fedfleet.models._zip import npz as _npz
from fedfleet.models._zip import write_zip

TASK = "moving-digits-diffusion"


def manifest_for(hidden: tuple[int, ...], steps: int = vd.STEPS) -> dict:
    sizes = vd.sizes(tuple(hidden))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": TASK,
        "mode": diffusion_spec.MODE,
        "objective": diffusion_spec.OBJECTIVE,
        "dataset": "moving-digits",
        "input_shape": [vd.FRAMES, vd.SIZE, vd.SIZE],
        "feature_dim": vd.PIXELS,
        "head_sizes": sizes,
        "head_layout": [[name, list(shape)] for name, shape in vd.layout(tuple(hidden))],
        "classes": list(range(vd.CLASSES * len(vd.DIRECTIONS))),
        "diffusion": diffusion_spec.section(tuple(hidden), steps),
    }


def build_diffusion_package(hidden: tuple[int, ...] = vd.DEFAULT_HIDDEN, *, seed: int = 0,
                            steps: int = vd.STEPS, init: vd.Params | None = None) -> bytes:
    """One package blob for a denoiser of block widths `hidden`, starting from `init` (its widths must be
    `hidden`) or a fresh `video_denoiser.init`; deterministic for (hidden, seed, steps, init)."""
    manifest = manifest_for(tuple(hidden), steps)
    start = vd.init(tuple(hidden), seed) if init is None else {k: np.asarray(v, np.float32) for k, v in init.items()}
    return write_zip({MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode(),
                      HEAD_INIT: _npz(start)})
