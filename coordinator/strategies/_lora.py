"""What the federated LoRA strategies (FedIT, FLoRA, LoRA-FAIR) share on the coordinator: the tasks they send
and the per-round history of the LoRA diagnostics.

The state is the package's trainable layout (`fc{i}.lora_A`, `fc{i}.lora_B` per adapted layer, and the head);
a strategy may add tensors the agents need but do not train (FLoRA's `fc{i}.merged`), listed in
`self.frozen`. Every selected agent gets the whole state, trains A, B and the head from it with local SGD,
and uploads its A_k, B_k and head (not deltas), densely: r·(d_in + d_out) floats per layer plus the head. The
engine refuses an upload whose layout (names, ranks, shapes) differs from `expect` with `rejected:shape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedfleet.coordinator.strategies._config import own
from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    layout_of,
    task_seed,
    to_numpy,
)
from fedfleet.models.mirrors import lora

TASK_KEYS = ("lr", "epochs", "batch", "weight_decay")


@dataclass(frozen=True)
class LoraConfig:
    """The [method] fields of the federated LoRA methods (mode "lora": frozen pre-trained MLP, LoRA r = 4 on
    every hidden layer, trainable head): local SGD on A, B and the head, lr/epochs/batch set once, before any
    comparison (the spec's lr 0.01 and batch 128 are for ViT-sized shards)."""

    lr: float = 0.05  # local SGD learning rate
    epochs: int = 2  # local epochs per round
    batch: int = 32  # local minibatch size
    weight_decay: float = own(0.0)  # the learner's L2 weight decay


class LoraStrategy(Strategy):
    """Base for the LoRA strategies: `configure` and the head average; subclasses fold A and B."""

    Config = LoraConfig
    package_mode = "lora"

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        self.layers = lora.adapted_layers(list(self.state))
        if not self.layers:
            raise ValueError(f"{self.name} needs a LoRA state (fc<i>.lora_A / fc<i>.lora_B); run it with a "
                             "'lora' model package")
        self.frozen: set[str] = set()
        self.history: list[dict[str, Any]] = []

    def update_kind(self, phase: int) -> str:
        """Agents upload A, B and the head as values: the update the norm bound sees is their change."""
        return "model"

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        cfg = {k: self.config[k] for k in TASK_KEYS if k in self.config}
        down = to_numpy(self.state)
        expect = layout_of({k: v for k, v in self.state.items() if k not in self.frozen})
        uplink = dict(self.config.get("uplink", {"name": "none"}))
        seed = int(self.config.get("seed", 0))
        return {a: TaskSpec(config={**cfg, "seed": task_seed(seed, round, phase, a)}, tensors=down, expect=expect,
                            uplink_codec=uplink) for a in agents}

    def factor_names(self) -> set[str]:
        return {f"{p}.lora_{x}" for p in self.layers for x in "AB"}

    def average_others(self, results: list[ClientResult], weights: torch.Tensor) -> None:
        """FedAvg of every trained tensor that is not a LoRA factor (the head)."""
        skip = self.factor_names() | self.frozen
        for name in self.state:
            if name not in skip:
                self.state[name] = lora.weighted_mean([torch.from_numpy(r.tensors[name]) for r in results], weights)

    def factors(self, results: list[ClientResult], layer: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        a = [torch.from_numpy(r.tensors[f"{layer}.lora_A"]) for r in results]
        b = [torch.from_numpy(r.tensors[f"{layer}.lora_B"]) for r in results]
        return a, b

    def average_factors(self, round: int, results: list[ClientResult]) -> None:
        """The Avg-Initial aggregation FedIT and LoRA-FAIR share: Ā and B̄ per layer (B̄ as `refine_b` makes
        it, with the layer's stats for the history), then FedAvg of the head."""
        if not results:
            return
        w = lora.client_weights([r.samples for r in results])
        layers = {}
        for layer in self.layers:
            a, b = self.factors(results, layer)
            a_bar, b_bar = lora.weighted_mean(a, w), lora.weighted_mean(b, w)
            b_new, layers[layer] = self.refine_b(a, b, w, a_bar, b_bar)
            self.state[f"{layer}.lora_A"], self.state[f"{layer}.lora_B"] = a_bar, b_new
        self.average_others(results, w)
        self.record(round, layers)

    def refine_b(self, a: list[torch.Tensor], b: list[torch.Tensor], w: torch.Tensor, a_bar: torch.Tensor,
                 b_bar: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The layer's new B and its stats (FedIT: B̄ itself)."""
        raise NotImplementedError

    def record(self, round: int, layers: dict[str, dict[str, float]]) -> None:
        self.history.append({"round": round, "layers": layers})

    def extra_state(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore the per-round history on resume (the factors and the head are the restored state; FLoRA's
        fresh A is seeded by the round). A history that is not a list of {round, layers} tables is a ValueError."""
        history = extra.get("history")
        if not isinstance(history, list) or not all(
                isinstance(h, dict) and isinstance(h.get("round"), int) and not isinstance(h.get("round"), bool)
                and isinstance(h.get("layers"), dict) for h in history):
            raise ValueError(f"{self.name}: the checkpoint's history is not a list of {{round, layers}} tables")
        self.history = [dict(h) for h in history]

    def round_note(self) -> str:
        if not self.history:
            return ""
        parts = []
        for layer, d in self.history[-1]["layers"].items():
            bits = [layer]
            if "cos_fair" in d:
                bits.append(f"cos(ΔW,B̄′Ā) {d['cos_fair']:.3f}")
            if "cos_fedit" in d:
                bits.append(f"cos(ΔW,B̄Ā) {d['cos_fedit']:.3f}")
            if "delta_b_rel_norm" in d:
                bits += [f"|ΔB|/|B̄| {d['delta_b_rel_norm']:.3f}", f"|P|/|T| {d['p_over_t']:.2f}"]
            parts.append(" ".join(bits))
        return "; ".join(parts)
