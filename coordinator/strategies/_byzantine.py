"""Byzantine agents inside the robust strategies (MoNNA and robust FedAvg): their tasks from the attack
plans, and the honest side of the spec's label-flip attack.

The spec's label flip is mu - gamma_t * mean_i grad NLL(theta_i; labels y -> C - 1 - y) over the honest
nodes. Only the honest nodes hold the data for that gradient, so when an omniscient label flipper is in
the fleet, every honest task asks for it (`flip_grad`) and expects it back as "flip.<name>" next to the
update; `split_flip` takes it out of a result again. The module name starts with "_" so the registry does
not take it for a method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.strategies import _attacks as attacks
from fedfleet.coordinator.strategies import _robust as robust
from fedfleet.coordinator.strategies.base import Layout, TaskSpec, to_wire

FLIP = "flip."

__all__ = ["attack_tasks", "flip_layout", "needs_flip_grad", "split_flip"]


def attack_tasks(
    plans: dict[str, attacks.AttackPlan], byzantine: dict[str, str], layout: Layout, base: dict[str, Any]
) -> dict[str, TaskSpec]:
    """One TaskSpec per Byzantine agent from the attack plans."""
    out: dict[str, TaskSpec] = {}
    for agent, plan in plans.items():
        tensors: dict[str, np.ndarray] = {}
        for role, vec in plan.vectors.items():
            tensors.update(to_wire(vec, layout, prefix=f"{role}."))
        cfg = {**base, "learner": "byzantine", "attack": byzantine[agent], **plan.scalars}
        out[agent] = TaskSpec(config=cfg, tensors=tensors, expect=layout)
    return out


def needs_flip_grad(byzantine: dict[str, str], omniscient: bool) -> bool:
    """Whether honest tasks must return their flipped-label gradient (an omniscient label flipper runs)."""
    return omniscient and "label_flip" in byzantine.values()


def flip_layout(layout: Layout) -> Layout:
    """The layout of the flipped-label gradient an honest node returns beside its update."""
    return [(FLIP + name, shape) for name, shape in layout]


def split_flip(tensors: dict[str, np.ndarray], layout: Layout) -> torch.Tensor | None:
    """The flat flipped-label gradient in a result, or None when the result carries none."""
    if not any(k.startswith(FLIP) for k in tensors):
        return None
    return robust.flatten({k[len(FLIP) :]: v for k, v in tensors.items() if k.startswith(FLIP)}, layout)
