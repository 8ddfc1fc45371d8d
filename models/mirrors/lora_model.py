"""The coordinator's view of a `lora` model package: the torch mirror of base plus adapters, and evaluation.

`LoraCoordinatorModel(blob)` loads the same package the agents load (`fedfleet.edge_agent.model.EdgeModel`, which
checks the base's digest) and mirrors `fedfleet.edge_agent.nn.lora.forward` in torch: per adapted layer
z = x W0ᵀ + b0 + s·((x Aᵀ)Bᵀ [+ x Mᵀ]), ReLU between layers, the trainable head last. The same interface as
`fedfleet.models.mirrors.head.CoordinatorModel` (initial_state, evaluate), so the job and the engine need not know
the mode.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.model import EdgeModel


class LoraMLP(nn.Module):
    """Frozen base (buffers) plus trainable A, B and head (parameters), named as the package layout."""

    def __init__(self, edge: EdgeModel) -> None:
        super().__init__()
        if edge.lora is None:
            raise ModelError("LoraMLP needs a package in mode 'lora'")
        self.spec = edge.lora
        self.base = {k: torch.from_numpy(v.copy()) for k, v in edge.lora.weights.items()}
        self.trainable = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(torch.from_numpy(v.copy()))
                                           for k, v in edge.head_init.items()})

    def forward(self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; `tensors` (layout names, plus optional `fc{i}.merged`) override the held parameters."""
        t = {k.replace("_", ".", 1): v for k, v in self.trainable.items()}
        t = {**t, **(tensors or {})}
        s, head = self.spec.scale, self.spec.head
        h = x
        for i in range(head + 1):
            if i == head:
                h = h @ t[f"fc{i}.weight"].T + t[f"fc{i}.bias"]
                break
            z = h @ self.base[f"fc{i}.weight"].T + self.base[f"fc{i}.bias"]
            if f"fc{i}.merged" in t:
                z = z + s * (h @ t[f"fc{i}.merged"].T)
            if i in self.spec.adapted:
                z = z + s * ((h @ t[f"fc{i}.lora_A"].T) @ t[f"fc{i}.lora_B"].T)
            h = torch.relu(z)
        return h


class LoraCoordinatorModel:
    def __init__(self, blob: bytes, *, runtime: str = "onnxruntime", threads: int = 1) -> None:
        self.edge = EdgeModel.from_bytes(blob, runtime=runtime, threads=threads)
        if self.edge.lora is None:
            raise ModelError(f"package mode is {self.edge.mode!r}; LoraCoordinatorModel needs mode 'lora'")
        self.digest = self.edge.digest
        self.manifest = self.edge.manifest
        self.head_sizes = self.edge.head_sizes
        self.head_layout = self.edge.head_layout
        self.module = LoraMLP(self.edge)

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors at round 0: A (random), B (zero), the head (the base's last layer)."""
        return {k: torch.from_numpy(v.copy()) for k, v in self.edge.head_init.items()}

    def _check(self, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
        want = dict(self.head_layout)
        missing = set(want) - set(tensors)
        if missing:
            raise ModelError(f"LoRA state lacks {sorted(missing)}; the package layout is {sorted(want)}")
        out: dict[str, torch.Tensor] = {}
        for name, value in tensors.items():
            t = torch.as_tensor(value, dtype=torch.float32)
            if name in want and tuple(t.shape) != want[name]:
                raise ModelError(f"LoRA tensor {name!r} has shape {tuple(t.shape)}, the layout says {want[name]}")
            out[name] = t
        return out

    @torch.no_grad()
    def logits(self, tensors: Mapping[str, torch.Tensor | np.ndarray], x: np.ndarray) -> torch.Tensor:
        feats = torch.from_numpy(self.edge.features(x))
        return self.module(feats, self._check(tensors))

    @torch.no_grad()
    def evaluate(self, tensors: Mapping[str, torch.Tensor | np.ndarray], x: np.ndarray, y: np.ndarray,
                 cache_key: str | None = "evaluate") -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of base + `tensors` on (x, y)."""
        if len(y) == 0:
            raise ModelError("cannot evaluate on an empty set; pass the held-out test split")
        logits = self.logits(tensors, x)
        target = torch.as_tensor(np.asarray(y), dtype=torch.long)
        loss = float(nn.functional.cross_entropy(logits, target))
        acc = int((logits.argmax(dim=1) == target).sum()) / len(target)
        return acc, loss
