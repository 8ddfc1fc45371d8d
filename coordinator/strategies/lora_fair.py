"""LoRA-FAIR: server-side residual ΔB with Avg-Initial (arXiv 2411.14961).

Per adapted layer: Ā = Σ p_k A_k, B̄ = Σ p_k B_k and the target ΔW = Σ p_k B_k A_k (accumulated client by
client, never sent); ΔB* = argmin [1 − cos(ΔW, (B̄ + ΔB)Ā)] + λ‖ΔB‖_F², solved in torch by SGD from ΔB = 0
(`fedfleet.models.mirrors.lora.refine_delta_b`: lr 0.01, 1000 iterations, λ = 0.01, the squared norm as in the code);
then B̄′ = B̄ + ΔB*, the head averaged, and every agent starts the next round from (Ā, B̄′): no re-initialisation
and no extra traffic (the downlink is the uplink's size). The model served and evaluated is W0 + s·B̄′Ā.

Config: `lam` (0.01), `refine_lr` (0.01), `refine_iterations` (1000), `refine_early_stop` (false: 5
iterations in a row with |Δloss| < 1e-6 end the solve). The history holds, per round and layer,
‖ΔB‖/‖B̄‖, cos(ΔW, B̄′Ā), FedIT's cos(ΔW, B̄Ā), ‖P‖/‖T‖ and the iterations used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfleet.coordinator.strategies._config import POSITIVE, ranged
from fedfleet.coordinator.strategies._lora import LoraConfig, LoraStrategy
from fedfleet.coordinator.strategies.base import ClientResult, register
from fedfleet.models.mirrors import lora


@dataclass(frozen=True)
class Config(LoraConfig):
    """LoRA-FAIR's [method] fields: the federated LoRA methods' local training and the server solve, with the
    spec's lambda, lr and iterations."""

    lam: float = ranged(0.01, check=(lambda v: v >= 0, "a number >= 0"))  # lambda of the ||Delta B||^2 term
    refine_lr: float = ranged(0.01, check=POSITIVE)  # SGD step of the solve
    refine_iterations: int = ranged(1000, check=(lambda v: v >= 1, "an integer >= 1"))  # iterations of the solve
    refine_early_stop: bool = False  # stop after 5 iterations in a row with |Delta loss| < 1e-6


@register
class LoraFair(LoraStrategy):
    name = "lora_fair"
    Config = Config
    learner = "lora_fair"

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        self.average_factors(round, results)

    def refine_b(self, a: list[torch.Tensor], b: list[torch.Tensor], w: torch.Tensor, a_bar: torch.Tensor,
                 b_bar: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        fix = lora.refine_delta_b(
            a_bar, b_bar, lora.product_mean(a, b, w), lam=float(self.config.get("lam", 0.01)),
            lr=float(self.config.get("refine_lr", 0.01)),
            iterations=int(self.config.get("refine_iterations", 1000)),
            early_stop=bool(self.config.get("refine_early_stop", False)))
        return b_bar + fix.delta_b, fix.as_dict()
