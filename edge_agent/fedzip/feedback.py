"""Error feedback for FedZip: what sparsification and quantisation dropped is added back next round.

The paper has none (mass dropped by top-z is lost for good); this is an option. Per tensor,
    compensated = update + residual
    residual    = compensated - what was actually sent (the quantised tensor).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError


class ErrorFeedback:
    """Keeps what sparsification/quantisation dropped and adds it back next round (an option; the paper has none)."""

    def __init__(self) -> None:
        self.residual: dict[str, np.ndarray] = {}

    def compensate(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """tensors + residual (float32); a tensor with no residual yet is returned as a float32 copy."""
        out: dict[str, np.ndarray] = {}
        for name, x in tensors.items():
            x = np.asarray(x, dtype=np.float32)
            r = self.residual.get(name)
            if r is None:
                out[name] = x.copy()
            elif r.shape != x.shape:
                raise ConfigError(
                    f"error feedback: residual of {name!r} has shape {r.shape}, the update has {x.shape}; "
                    "call reset() when the model layout changes"
                )
            else:
                out[name] = x + r
        return out

    def update(self, compensated: Mapping[str, np.ndarray], sent_quantized: Mapping[str, np.ndarray]) -> None:
        """residual = compensated - sent, per tensor."""
        if set(compensated) != set(sent_quantized):
            raise ConfigError("error feedback: compensated and sent updates name different tensors")
        for name, c in compensated.items():
            c = np.asarray(c, dtype=np.float32)
            s = np.asarray(sent_quantized[name], dtype=np.float32)
            if c.shape != s.shape:
                raise ConfigError(f"error feedback: {name!r} was sent with shape {s.shape}, computed {c.shape}")
            self.residual[name] = c - s

    def reset(self) -> None:
        self.residual.clear()

    def norm(self) -> float:
        """L2 norm of the whole residual (for logging)."""
        return float(np.sqrt(sum(float(np.dot(r.ravel(), r.ravel())) for r in self.residual.values())))
