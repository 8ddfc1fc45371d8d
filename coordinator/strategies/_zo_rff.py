"""The coordinator's view of FZooS's shared random Fourier features, as torch tensors.

The draws come from the edge's own numpy function (`fedfleet.edge_agent.zo.rff.draw`, Generator(PCG64(seed))) and
are converted with `torch.from_numpy`, so both sides hold bit-identical Ω and b. The round engine does not
need Ω (it only averages RFF weights); this is for diagnostics such as the global surrogate's gradient.
"""

from __future__ import annotations

import math

import torch

from fedfleet.edge_agent.zo.rff import draw


def rff_tensors(d: int, m: int, lengthscale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ω (d, M), b (M,)) as float64 torch tensors sharing memory with the numpy draws."""
    omega, b = draw(d, m, lengthscale, seed)
    return torch.from_numpy(omega), torch.from_numpy(b)


def surrogate_grad(x: torch.Tensor, nu: torch.Tensor, omega: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """∇(φ(x)ᵀν) = −√(2/M) Ω (ν ⊙ sin(Ωᵀx + b)) at one point x (d,)."""
    m = b.shape[0]
    return -math.sqrt(2.0 / m) * (omega @ (nu * torch.sin(x.double() @ omega + b)))
