"""Training objectives of the numpy learners: what a minibatch's loss and gradient are, picked by the package.

A model package's manifest may name an `objective`:
- "classification" (the default, and every package without the field): softmax cross-entropy of the MLP
  on (features, labels), `fedfleet.edge_agent.nn.mlp.loss_and_grad` (optionally restricted to a continual task's classes);
- "denoising" (mode "diffusion", `fedfleet.edge_agent.nn.diffusion_spec`): the conditional video denoiser's loss
  `fedfleet.edge_agent.nn.video_denoiser.loss_and_grad` on clean clips with condition ids as labels; t and the noise
  are drawn from the task's own Generator, so a round is reproducible.

`for_model(model, rng, classes)` returns one `Loss`: (params, x batch, y batch) -> (value, grads).
Numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.nn import mlp

Params = dict[str, np.ndarray]
Loss = Callable[[Params, np.ndarray, np.ndarray], tuple[float, Params]]
NAMES = ("classification", "denoising")


def classification(classes: Any = None) -> Loss:
    return lambda params, x, y: mlp.loss_and_grad(params, x, y, classes)


def denoising(rng: np.random.Generator, steps: int) -> Loss:
    from fedfleet.edge_agent.nn import video_denoiser as vd

    ab = vd.alpha_bar(steps)
    return lambda params, x, y: vd.loss_and_grad(params, x, y, rng, ab)


def name_of(model: Any) -> str:
    """The objective a model package declares ("classification" when it declares none)."""
    manifest = getattr(model, "manifest", None) or {}
    name = manifest.get("objective", "classification")
    if name not in NAMES:
        raise ModelError(f"package objective {name!r} is not one of {', '.join(NAMES)}; upgrade fedfleet")
    return str(name)


def for_model(model: Any, rng: np.random.Generator, classes: Any = None) -> Loss:
    """The loss the agent's package asks for; `rng` draws the denoising objective's t and noise."""
    if name_of(model) == "denoising":
        return denoising(rng, int(model.manifest["diffusion"]["steps"]))
    return classification(classes)
