"""FedIT: federated LoRA by plain FedAvg of the factors. Ā = Σ p_k A_k and B̄ = Σ p_k B_k separately, the head
averaged; every agent starts the next round from (Ā, B̄). The served model is W0 + s·B̄Ā, which differs
from the average of the clients' updates Σ p_k B_k A_k by the cross-covariance of the factors; the history
records that gap as cos(ΔW, B̄Ā) per layer and round."""

from __future__ import annotations

from coordinator import lora
from coordinator.lora_strategy import LoraStrategy
from coordinator.strategies.base import ClientResult, register


@register
class FedIT(LoraStrategy):
    name = "fedit"

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        if not results:
            return
        w = lora.client_weights([r.samples for r in results])
        layers = {}
        for layer in self.layers:
            a, b = self.factors(results, layer)
            a_bar, b_bar = lora.weighted_mean(a, w), lora.weighted_mean(b, w)
            layers[layer] = {"cos_fedit": lora.cosine(b_bar @ a_bar, lora.product_mean(a, b, w))}
            self.state[f"{layer}.lora_A"], self.state[f"{layer}.lora_B"] = a_bar, b_bar
        self.average_others(results, w)
        self.record(round, layers)
