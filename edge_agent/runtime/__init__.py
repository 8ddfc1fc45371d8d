"""One Runner interface over ONNX Runtime and LiteRT/TFLite.

`open_runner(model, runtime=..., threads=...)` loads a model (bytes or a path) with the backend module
`fedfleet.edge_agent.runtime.<runtime>` ("onnxruntime" or "litert"); each backend module defines
`open(blob: bytes, *, threads: int) -> Runner`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from os import PathLike

import numpy as np

from fedfleet.edge_agent.errors import ModelError

RUNTIMES = ("onnxruntime", "litert")


class Runner(ABC):
    """A loaded inference session. Inputs and outputs are numpy arrays, named as in the model file."""

    runtime: str = ""
    input_names: list[str]
    input_shapes: dict[str, tuple[int | None, ...]]  # None for a dynamic dimension
    input_dtypes: dict[str, np.dtype]
    output_names: list[str]

    def check_feeds(self, feeds: dict[str, np.ndarray], *, cast_float_only: bool = False) -> dict[str, np.ndarray]:
        """The feeds in input order as contiguous arrays of the model's dtypes; ModelError naming the input
        when one is missing, unknown, or of the wrong shape. With `cast_float_only`, integer inputs must
        already be integers (an int8 model's input is quantised by the caller) but ints may feed floats."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ModelError(f"missing model input(s) {missing}; the model expects {self.input_names}")
        extra = [n for n in feeds if n not in self.input_shapes]
        if extra:
            raise ModelError(f"unknown model input(s) {extra}; the model expects {self.input_names}")
        checked: dict[str, np.ndarray] = {}
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            want = self.input_shapes[name]
            if arr.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, arr.shape, strict=False)):
                shown = tuple("N" if w is None else w for w in want)
                raise ModelError(f"input {name!r} has shape {arr.shape}, the model expects {shown}")
            dtype = self.input_dtypes[name]
            if cast_float_only and arr.dtype.kind != dtype.kind and not (dtype.kind == "f" and arr.dtype.kind in "iu"):
                raise ModelError(
                    f"input {name!r} is {arr.dtype}, the model expects {dtype}; "
                    "quantise it with the input's scale and zero point first"
                )
            checked[name] = np.ascontiguousarray(arr, dtype=dtype)
        return checked

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
    backend = importlib.import_module(f"fedfleet.edge_agent.runtime.{runtime}")
    return backend.open(model, threads=threads)
