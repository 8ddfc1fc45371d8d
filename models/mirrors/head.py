"""The coordinator's view of a model package: the torch mirror of the head and held-out evaluation.

`CoordinatorModel(blob)` loads the same package the agents load. Features come from
`fedfleet.edge_agent.model.EdgeModel` (the same int8 backbone through the same runtime), so the coordinator scores
exactly what the edge runs; only the head runs in torch, with the `fc{i}` names and ReLU placement of
`fedfleet.edge_agent.nn.mlp`, so state dicts move between the two sides unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.model import EdgeModel


class MLPHead(nn.Module):
    """fc0 .. fc{L-1} with ReLU between layers; raw logits out. Mirrors `fedfleet.edge_agent.nn.mlp.forward`."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.n_layers = len(sizes) - 1
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            self.add_module(f"fc{i}", nn.Linear(fan_in, fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_layers):
            x = getattr(self, f"fc{i}")(x)
            if i < self.n_layers - 1:
                x = torch.relu(x)
        return x


class CoordinatorModel:
    def __init__(self, blob: bytes, *, runtime: str = "onnxruntime", threads: int = 1) -> None:
        self.edge = EdgeModel.from_bytes(blob, runtime=runtime, threads=threads)
        self.digest = self.edge.digest
        self.manifest = self.edge.manifest
        self.head_sizes = self.edge.head_sizes
        self.head_layout = self.edge.head_layout
        self._head = MLPHead(self.head_sizes)
        self.load_head(self.initial_state())

    def head_module(self) -> MLPHead:
        """The torch head (fc{i} names as in the package layout)."""
        return self._head

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v.copy()) for k, v in self.edge.head_init.items()}

    def _check(self, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
        want = dict(self.head_layout)
        if set(tensors) != set(want):
            raise ModelError(f"head tensors {sorted(tensors)} differ from the package layout {sorted(want)}")
        out: dict[str, torch.Tensor] = {}
        for name, shape in want.items():
            t = torch.as_tensor(tensors[name], dtype=torch.float32)
            if tuple(t.shape) != shape:
                raise ModelError(f"head tensor {name!r} has shape {tuple(t.shape)}, the layout says {shape}")
            out[name] = t
        return out

    def load_head(self, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> MLPHead:
        """Copy `tensors` (layout names) into the held head module and return it."""
        self._head.load_state_dict(self._check(tensors))
        return self._head

    @torch.no_grad()
    def evaluate(
        self,
        head_tensors: Mapping[str, torch.Tensor | np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        cache_key: str | None = "evaluate",
    ) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of `head_tensors` on (x, y), features from the edge backbone."""
        if len(y) == 0:
            raise ModelError("cannot evaluate on an empty set; pass the held-out test split")
        feats = torch.from_numpy(self.edge.features(x, cache_key))
        head = MLPHead(self.head_sizes)
        head.load_state_dict(self._check(head_tensors))
        logits = head(feats)
        target = torch.as_tensor(np.asarray(y), dtype=torch.long)
        loss = float(nn.functional.cross_entropy(logits, target))
        acc = int((logits.argmax(dim=1) == target).sum()) / len(target)
        return acc, loss
