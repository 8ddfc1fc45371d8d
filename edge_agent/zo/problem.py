"""Turn a ZO task (config + tensors) and an agent's data and model into a counted objective over a vector.

Owns the task-config contract shared by the FedZO and FZooS learners and strategies:
- `{"objective": "quadratic", "c1": [...], "c2": [...]}` with tensors `{"x": (d,)}`;
- `{"objective": "macro_f1", "zo_tensors": [names], "zo_path": "numpy" | "runtime"}` with the head
  tensors as task tensors: 1 − macro-F1 on the agent's shard. "numpy" runs the head (`fedfleet.edge_agent.nn.mlp`)
  in numpy over the EdgeModel's cached int8-backbone features; "runtime" feeds the head as graph inputs of the int8 model
  (`model.head_logits(head, x)`), one runtime call per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.zo.objectives import Counted, MacroF1Objective, Quadratic, Tensors, VectorView

OBJECTIVES = ("quadratic", "macro_f1")


class RunnerHead:
    """A model whose head tensors are graph inputs of an inference runtime (ONNX Runtime or LiteRT).

    `inputs` maps each head tensor name to its graph input name, e.g. {"fc1.weight": "head.weight"};
    `head_logits(head, x)` is one runtime call with the raw input `x` and the head fed alongside.
    """

    head_on_features = False

    def __init__(self, runner: Any, inputs: dict[str, str], *, x_name: str = "x"):
        missing = [n for n in [x_name, *inputs.values()] if n not in runner.input_names]
        if missing:
            raise ConfigError(f"the model has no graph inputs {missing} (it has {runner.input_names}); "
                              "load the head-as-inputs variant")
        self.runner, self.inputs, self.x_name = runner, dict(inputs), x_name

    def head_logits(self, head: Tensors, x: np.ndarray) -> np.ndarray:
        feeds = {self.x_name: np.asarray(x, np.float32)}
        feeds.update({graph: np.asarray(head[name], np.float32) for name, graph in self.inputs.items()})
        return self.runner.run(feeds)[0]


@dataclass
class Problem:
    objective: Counted
    view: VectorView
    x0: np.ndarray

    def tensors(self, x: np.ndarray) -> Tensors:
        """The tuned tensors for vector x (float32), ready to upload."""
        return self.view.split(x)


def zo_names(config: dict[str, Any], tensors: Tensors) -> list[str]:
    names = config.get("zo_tensors")
    return list(names) if names else list(tensors)


def _logits_fn(model: Any, data: Any, path: str, cache_key: str) -> Any:
    if model is None:
        raise ConfigError("the macro_f1 objective needs the agent's model; start the agent with a model package")
    if path == "runtime":
        if not hasattr(model, "head_logits"):
            raise ConfigError("zo_path 'runtime' needs a model with the head as graph inputs (head_logits); "
                              "use zo_path 'numpy' or load a head-as-inputs package")
        feats = model.features(data.x, cache_key) if getattr(model, "head_on_features", False) else data.x
        return lambda head: model.head_logits(head, feats)
    if path == "numpy":
        feats = model.features(data.x, cache_key)  # frozen backbone: computed once, cached
        return lambda head: mlp.forward(head, feats)
    raise ConfigError(f"unknown zo_path {path!r}; use 'numpy' or 'runtime'")


def build(config: dict[str, Any], tensors: Tensors, data: Any, model: Any, *, cache_key: str = "zo") -> Problem:
    kind = config.get("objective", "macro_f1")
    if kind == "quadratic":
        if "x" not in tensors:
            raise ConfigError("the quadratic objective expects task tensor 'x'")
        q = Quadratic(np.asarray(config["c1"], np.float64), np.asarray(config["c2"], np.float64))
        if tensors["x"].shape != (q.d,):
            raise ConfigError(f"task tensor 'x' has shape {tensors['x'].shape}, quadratic has d={q.d}")
        view = VectorView({"x": tensors["x"]}, ["x"])
        return Problem(Counted(q, q.grad), view, view.pack(tensors))
    if kind == "macro_f1":
        view = VectorView(tensors, zo_names(config, tensors))
        fn = _logits_fn(model, data, str(config.get("zo_path", "numpy")), cache_key)
        obj = MacroF1Objective(fn, data.y, view)
        return Problem(Counted(obj), view, view.pack(tensors))
    raise ConfigError(f"unknown ZO objective {kind!r}; use one of {', '.join(OBJECTIVES)}")
