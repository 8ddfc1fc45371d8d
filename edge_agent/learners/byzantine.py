"""Byzantine agent behaviours: an agent that runs like any other but uploads an attack vector.

Attacks are in parameter space (the robust methods mix models). The task config names the attack;
the tensors carry what the coordinator's omniscient-attacker hook computed (only when the experiment
enables it), prefixed by role:

- alie:       mu.*, sigma.*, config a  -> mu + a * sigma
- foe:        mu.*, config a           -> (1 - a) * mu
- sign_flip:  mu.*                     -> -mu
- mimic:      target.*                 -> target (a copy of one honest model)
- label_flip, omniscient hook on (the spec's attack): mu.*, grad.*, config lr -> mu - lr * grad, where
  grad is the mean over the honest nodes of their gradients with labels y -> C - 1 - y (each honest node
  computes its own on its batch; the coordinator averages them);
- label_flip, hook off: model.*, config lr -> model - lr * grad NLL(model; local batch with y -> C - 1 - y)
  computed locally on this agent's own data with a raw gradient (no momentum), `model` this agent's own.

Numpy only; the upload uses the plain trainable tensor names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners._inputs import features, flipped_labels, minibatch, params_from, task_rng
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, register
from fedfleet.edge_agent.nn import mlp


@register
class ByzantineLearner(Learner):
    name = "byzantine"

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        attack = str(task.config.get("attack", ""))
        if attack == "alie":
            mu, sigma = params_from(task, "mu."), params_from(task, "sigma.")
            a = float(task.config["a"])
            out = {k: (mu[k] + a * sigma[k]).astype(np.float32) for k in mu}
        elif attack == "foe":
            a = float(task.config["a"])
            out = {k: ((1.0 - a) * v).astype(np.float32) for k, v in params_from(task, "mu.").items()}
        elif attack == "sign_flip":
            out = {k: (-v).astype(np.float32) for k, v in params_from(task, "mu.").items()}
        elif attack == "mimic":
            out = params_from(task, "target.")
        elif attack == "label_flip":
            out = self._label_flip(task, data, model)
        else:
            raise ConfigError(
                f"byzantine task names attack {attack!r}; expected alie, foe, sign_flip, mimic or label_flip"
            )
        return LearnResult(tensors=out, samples=len(data), metrics={"attack": 1.0})

    @staticmethod
    def _label_flip(task: Task, data: LocalData, model: Any) -> dict[str, np.ndarray]:
        lr = float(task.config["lr"])
        if any(k.startswith("grad.") for k in task.tensors):  # omniscient: the honest nodes' mean gradient
            mu, grad = params_from(task, "mu."), params_from(task, "grad.")
            return {k: (v - lr * grad[k]).astype(np.float32) for k, v in mu.items()}
        theta = params_from(task, "model.")
        x = features(model, data, "train")
        idx = minibatch(task_rng(task, salt=1), len(data), int(task.config.get("batch", 16)))
        _, grads = mlp.loss_and_grad(theta, x[idx], flipped_labels(theta, data.y[idx]))
        return {k: (v - lr * grads[k]).astype(np.float32) for k, v in theta.items()}
