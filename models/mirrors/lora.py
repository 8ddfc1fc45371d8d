"""LoRA maths the federated LoRA strategies share (FedIT, FLoRA, LoRA-FAIR), in torch.

Naming: an adapted layer `fc{i}` has factors `fc{i}.lora_A` (r, d_in) and `fc{i}.lora_B` (d_out, r); every
other trainable tensor (the head) is averaged plainly. With client weights p_k = n_k / Σ n_j:
- `weighted_mean`: Σ p_k X_k per tensor (FedIT averages A and B separately this way);
- `product_mean`: the target ΔW = Σ p_k B_k A_k (d_out, d_in), accumulated client by client;
- `refine_delta_b`: LoRA-FAIR's server step, ΔB* = argmin [1 − cos(ΔW, (B̄ + ΔB)Ā)] + λ‖ΔB‖_F² by plain SGD
  (lr 0.01, 1000 iterations), ΔB starting from zero, fp32, an epsilon in the cosine, autograd for the
  gradient; the optional early stop ends after 5 iterations in a row with |Δloss| < 1e-6. It returns ΔB and
  the diagnostics the spec asks to log: ‖ΔB‖/‖B̄‖, cos(ΔW, B̄′Ā), cos(ΔW, B̄Ā) (FedIT's), ‖P‖/‖T‖.
  The cosine's gradient scales as 1/‖B̄‖, so a fixed lr is not scale-free: with B entries of order 1 the
  1000 steps do not converge, with entries of order 0.01 ΔB outgrows B̄ (docs/results, federated LoRA).
- `closed_form_delta_b`: the L2 (not cosine) cross-check ΔB = (TĀᵀ − B̄ĀĀᵀ)(ĀĀᵀ + λI)⁻¹.
- `synthetic_factors`: the spec's synthetic check (6 factor pairs, r = 4, d = 32), see its docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-12


def adapted_layers(names: Sequence[str]) -> list[str]:
    """The layer prefixes (`fc0`, ...) that carry a LoRA pair among tensor `names`."""
    return [n[: -len(".lora_A")] for n in names if n.endswith(".lora_A") and f"{n[:-len('.lora_A')]}.lora_B" in names]


def client_weights(samples: Sequence[int]) -> torch.Tensor:
    w = torch.tensor([float(n) for n in samples], dtype=torch.float32)
    return w / w.sum()


def weighted_mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return torch.tensordot(weights, torch.stack([t.float() for t in tensors]), dims=1)


def product_mean(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """ΔW = Σ p_k B_k A_k, one client at a time (never the N stacked d_out×d_in products)."""
    total = torch.zeros(b[0].shape[0], a[0].shape[1], dtype=torch.float32)
    for w, ak, bk in zip(weights, a, b, strict=True):
        total += w * (bk.float() @ ak.float())
    return total


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine of the flattened matrices (not a column-wise mean)."""
    return float((x * y).sum() / (x.norm() * y.norm() + EPS))


@dataclass
class Refinement:
    delta_b: torch.Tensor
    cos_fair: float  # cos(ΔW, (B̄ + ΔB)Ā)
    cos_fedit: float  # cos(ΔW, B̄Ā)
    delta_b_rel_norm: float  # ‖ΔB‖ / ‖B̄‖
    p_over_t: float  # ‖(B̄ + ΔB)Ā‖ / ‖ΔW‖
    iterations: int

    def as_dict(self) -> dict[str, float]:
        return {"cos_fair": self.cos_fair, "cos_fedit": self.cos_fedit, "delta_b_rel_norm": self.delta_b_rel_norm,
                "p_over_t": self.p_over_t, "iterations": float(self.iterations)}


def refine_delta_b(a_bar: torch.Tensor, b_bar: torch.Tensor, target: torch.Tensor, *, lam: float = 0.01,
                   lr: float = 0.01, iterations: int = 1000, early_stop: bool = False) -> Refinement:
    """LoRA-FAIR's residual on B (see the module docstring). All in fp32; ΔB starts at zero."""
    a_bar, b_bar, target = a_bar.float(), b_bar.float(), target.float()
    t_norm = target.norm()
    delta = torch.zeros_like(b_bar, requires_grad=True)
    done = 0
    if float(t_norm) > EPS:  # with no target (nothing was learned) there is nothing to correct
        prev, calm = None, 0
        for step in range(1, iterations + 1):
            done = step
            p = (b_bar + delta) @ a_bar
            loss = 1.0 - (p * target).sum() / (p.norm() * t_norm + EPS) + lam * (delta**2).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= lr * grad
            value = float(loss.detach())
            if early_stop and prev is not None:
                calm = calm + 1 if abs(prev - value) < 1e-6 else 0
                if calm >= 5:
                    break
            prev = value
    delta = delta.detach()
    p = (b_bar + delta) @ a_bar
    return Refinement(delta, cosine(p, target), cosine(b_bar @ a_bar, target),
                      float(delta.norm() / (b_bar.norm() + EPS)), float(p.norm() / (t_norm + EPS)), done)


def closed_form_delta_b(a_bar: torch.Tensor, b_bar: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔB minimising ‖(B̄ + ΔB)Ā − T‖² + λ‖ΔB‖² (an L2 cross-check, not the paper's cosine objective)."""
    r = a_bar.shape[0]
    gram = a_bar @ a_bar.T + lam * torch.eye(r)
    return (target @ a_bar.T - b_bar @ a_bar @ a_bar.T) @ torch.linalg.inv(gram)


def synthetic_factors(seed: int, *, clients: int = 6, rank: int = 4, dim: int = 32, mix: float = 0.3,
                      off: float = 0.03, b_scale: float = 0.1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The spec's synthetic check: `clients` factor pairs (A_k r×d, B_k d×r) as federated LoRA produces them.

    Every client starts from one shared A0 ~ U(±1/√d) (Avg-Initial) and B = 0. A moves little and mostly
    within its row space: A_k = (I + mix·M_k) A0 + off·U(±1/√d), M_k ~ N(0, 1) r×r. B moves a lot and
    differently per client: B_k ~ N(0, b_scale²). Independent random A_k could not be fixed by any ΔB (the
    product (B̄ + ΔB)Ā only spans Ā's row space), so the check uses this structure; `b_scale` 0.1 is the order
    of trained LoRA B entries (they start at zero). Drawn with numpy PCG64(seed).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    bound = 1.0 / np.sqrt(dim)
    a0 = rng.uniform(-bound, bound, (rank, dim))
    a = [(np.eye(rank) + mix * rng.standard_normal((rank, rank))) @ a0 + off * rng.uniform(-bound, bound, (rank, dim))
         for _ in range(clients)]
    b = [b_scale * rng.standard_normal((dim, rank)) for _ in range(clients)]
    return ([torch.tensor(x, dtype=torch.float32) for x in a], [torch.tensor(x, dtype=torch.float32) for x in b])


def synthetic_check(seed: int, lam: float = 0.01, **kw: float) -> Refinement:
    """FedIT's and LoRA-FAIR's cos(P, ΔW) on one synthetic draw (equal client weights)."""
    a, b = synthetic_factors(seed, **kw)  # type: ignore[arg-type]
    w = client_weights([1] * len(a))
    return refine_delta_b(weighted_mean(a, w), weighted_mean(b, w), product_mean(a, b, w), lam=lam)
