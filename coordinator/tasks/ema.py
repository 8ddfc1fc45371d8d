"""A server-side exponential moving average of the global model, for a task that ships the average instead of
the last iterate (the diffusion task: generators are sampled from an average of their weights).

`EMAStrategy(inner, decay)` wraps a strategy: everything is the inner strategy's (the agents train and receive
the inner global state, unchanged), and after every aggregation of the last phase of a round the average moves:
ema = decay * ema + (1 - decay) * global. It starts at the initial global state. The average is checkpointed
with the method's own state (`extra_state()["ema"]`), so a resumed run continues it; a checkpoint whose
average does not match the model is refused in one line by the resume (`RunStore.resume_run`).

`decay_per_round(decay_per_step, steps_per_round)`: the per-round decay whose window, in local steps, is the
per-step decay's (a round of FedAvg moves the model by about its local steps).
"""

from __future__ import annotations

from typing import Any

import torch

from fedfleet.coordinator.strategies.base import ClientResult, Strategy, WrappedStrategy

EMA_KEY = "ema"


def decay_per_round(decay_per_step: float, steps_per_round: int) -> float:
    if not 0.0 <= decay_per_step < 1.0 or steps_per_round < 1:
        raise ValueError(f"decay {decay_per_step} must be in [0, 1) and steps {steps_per_round} >= 1")
    return float(decay_per_step ** steps_per_round)


class EMAStrategy(WrappedStrategy):
    """See the module docstring."""

    def __init__(self, inner: Strategy, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        super().__init__(inner)
        self.decay = float(decay)
        self.tasks_carry_state = inner.tasks_carry_state  # the agents receive the inner state: it may be synced
        self.ema = {k: v.detach().clone().float() for k, v in inner.global_state().items()}

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The moving average of the global state."""
        return self.ema

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        self.inner.aggregate(round, phase, results)
        if phase == self.phases - 1:
            with torch.no_grad():
                for k, v in self.inner.global_state().items():
                    self.ema[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    def extra_state(self) -> dict[str, Any]:
        return {**self.inner.extra_state(), EMA_KEY: self.ema}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        extra = dict(extra)
        ema = extra.pop(EMA_KEY, None)
        like = self.inner.global_state()
        if not isinstance(ema, dict) or set(ema) != set(like) or any(
                not isinstance(ema[k], torch.Tensor) or tuple(ema[k].shape) != tuple(like[k].shape) for k in like):
            # the store turns it into its one-line refusal naming the run directory
            raise ValueError("field 'extra.ema' is not a moving average of this model's tensors")
        self.inner.load_extra_state(extra)
        self.ema = {k: ema[k].detach().clone().float() for k in like}
