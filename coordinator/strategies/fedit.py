"""FedIT: federated LoRA by plain FedAvg of the factors. Ā = Σ p_k A_k and B̄ = Σ p_k B_k separately, the head
averaged; every agent starts the next round from (Ā, B̄). The served model is W0 + s·B̄Ā, which differs
from the average of the clients' updates Σ p_k B_k A_k by the cross-covariance of the factors; the history
records that gap as cos(ΔW, B̄Ā) per layer and round."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfleet.coordinator.strategies._lora import LoraConfig, LoraStrategy
from fedfleet.coordinator.strategies.base import ClientResult, register
from fedfleet.models.mirrors import lora


@dataclass(frozen=True)
class Config(LoraConfig):
    """FedIT's [method] fields: the federated LoRA methods' local training."""


@register
class FedIT(LoraStrategy):
    name = "fedit"
    Config = Config
    learner = "fedit"

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        self.average_factors(round, results)

    def refine_b(self, a: list[torch.Tensor], b: list[torch.Tensor], w: torch.Tensor, a_bar: torch.Tensor,
                 b_bar: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return b_bar, {"cos_fedit": lora.cosine(b_bar @ a_bar, lora.product_mean(a, b, w))}
