"""A minimal ONNX export of the video denoiser for the MTVG tests and benchmark.

Stand-in only: the project's exporter is `models.export_video_denoiser.export_onnx(state, path)` (built on
its own branch); once it is merged, callers of `export_onnx` here switch to it and this file goes. The graph
takes `x_t` (N, F, S, S) float32, `t` (N,) int64 and `cond` (N,) int64 and returns `x0`, the clean-clip estimate
(`VideoDenoiser.predict_x0`), which is what `edge_agent.mtvg.OnnxDenoiser` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from coordinator.video_denoiser import VideoDenoiser
from edge_agent import video_denoiser as vd


class _X0(torch.nn.Module):
    def __init__(self, model: VideoDenoiser) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.predict_x0(x_t, t, cond)


def export_onnx(state: Mapping[str, np.ndarray | torch.Tensor], path: str | Path) -> Path:
    model = VideoDenoiser.from_state(state).eval()
    x = torch.zeros(2, vd.FRAMES, vd.SIZE, vd.SIZE)
    t = torch.zeros(2, dtype=torch.long)
    axes = {"x_t": {0: "n"}, "t": {0: "n"}, "cond": {0: "n"}, "x0": {0: "n"}}
    torch.onnx.export(_X0(model), (x, t, t), str(path), input_names=["x_t", "t", "cond"], output_names=["x0"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    return Path(path)
