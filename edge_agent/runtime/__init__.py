"""One Runner interface over ONNX Runtime and LiteRT/TFLite.

`open_runner(model, runtime=..., threads=...)` loads a model (bytes or a path) with the backend module
`edge_agent.runtime.<runtime>` ("onnxruntime" or "litert"); each backend module defines
`open(blob: bytes, *, threads: int) -> Runner`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from os import PathLike

import numpy as np

from edge_agent.errors import ModelError

RUNTIMES = ("onnxruntime", "litert")


class Runner(ABC):
    """A loaded inference session. Inputs and outputs are numpy arrays, named as in the model file."""

    runtime: str = ""
    input_names: list[str]
    input_shapes: dict[str, tuple[int | None, ...]]  # None for a dynamic dimension
    output_names: list[str]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once. Missing or mis-shaped feeds raise ModelError naming the input."""


def open_runner(model: bytes | str | PathLike[str], *, runtime: str = "onnxruntime", threads: int = 1) -> Runner:
    """Load `model` (file bytes or a path) with the named runtime."""
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if not isinstance(model, bytes):
        with open(model, "rb") as fh:
            model = fh.read()
    backend = importlib.import_module(f"edge_agent.runtime.{runtime}")
    return backend.open(model, threads=threads)
