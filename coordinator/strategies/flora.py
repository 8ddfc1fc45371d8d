"""FLoRA-like baseline: merge the exact average update into the layer, then re-initialise the adapters every
round.

Per adapted layer the server computes ΔW = Σ p_k B_k A_k (what stacking the clients' factors gives, exact,
no cross-term bias), adds it to the merged residual M (`fc{i}.merged`, d_out×d_in, in B·A units; the layer
computes W0 + s·(M + BA)), and starts the next round from a fresh A ~ U(±1/√d_in), drawn with numpy
PCG64([seed, round, layer]), and B = 0. The head is averaged. W0 itself never changes: M travels with every task
(dense, d_out·d_in floats per layer), so an agent that missed rounds needs nothing else. That downlink is where
this differs from FLoRA's paper, which sends the stacked factors (N·r·(d_in + d_out) floats) and has clients
merge them into their own copy of the weights. The history records ‖ΔW‖ and ‖M‖ per layer.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.strategies._lora import LoraConfig, LoraStrategy
from fedfleet.coordinator.strategies.base import ClientResult, register
from fedfleet.edge_agent.nn import lora as lora_mlp
from fedfleet.models.mirrors import lora


@dataclass(frozen=True)
class Config(LoraConfig):
    """FLoRA's [method] fields: the federated LoRA methods' local training."""


@register
class FLoRA(LoraStrategy):
    name = "flora"
    Config = Config
    learner = "flora"

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        for layer in self.layers:
            d_out, d_in = self.state[f"{layer}.lora_B"].shape[0], self.state[f"{layer}.lora_A"].shape[1]
            self.state.setdefault(f"{layer}.merged", torch.zeros(d_out, d_in))
            self.frozen.add(f"{layer}.merged")

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        if not results:
            return
        w = lora.client_weights([r.samples for r in results])
        seed = int(self.config.get("seed", 0))
        layers = {}
        for layer in self.layers:
            a, b = self.factors(results, layer)
            delta_w = lora.product_mean(a, b, w)
            self.state[f"{layer}.merged"] = self.state[f"{layer}.merged"] + delta_w
            rank, d_in = self.state[f"{layer}.lora_A"].shape
            rng = np.random.Generator(np.random.PCG64([seed, round, zlib.crc32(layer.encode())]))
            self.state[f"{layer}.lora_A"] = torch.from_numpy(lora_mlp.init_a(rank, d_in, rng))
            self.state[f"{layer}.lora_B"] = torch.zeros_like(self.state[f"{layer}.lora_B"])
            layers[layer] = {"delta_w_norm": float(delta_w.norm()),
                             "merged_norm": float(self.state[f"{layer}.merged"].norm())}
        self.average_others(results, w)
        self.record(round, layers)

    def round_note(self) -> str:
        if not self.history:
            return ""
        return "; ".join(f"{k} |ΔW| {d['delta_w_norm']:.3f} |M| {d['merged_norm']:.3f}"
                         for k, d in self.history[-1]["layers"].items())
