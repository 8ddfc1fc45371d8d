"""LiteRT (TFLite) backend of the Runner interface.

`open(blob, threads=...)` loads `.tflite` bytes with `ai_edge_litert.interpreter.Interpreter`, or with
`tflite_runtime.interpreter.Interpreter` when only that is installed (older boards). The interpreter runs
with `num_threads=threads` and LiteRT's default delegate (XNNPACK on CPU).

Batch: models are written with batch 1 and a dynamic batch in the shape signature. A feed with another
batch size resizes the inputs (`resize_tensor_input`) and re-allocates once; repeated calls at the same
shapes reuse the allocation. Feeds are checked (names, rank, fixed dimensions, dtype kind) before the
interpreter sees them, and corrupt, truncated or non-TFLite bytes are refused before they are parsed, so
every mistake is a ModelError that names what was wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.runtime import Runner

_IDENTIFIER = b"TFL3"
_MIN_BYTES = 16


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError as exc:
            raise ModelError(
                "no TFLite interpreter is installed; install it with `pip install 'fedfleet[tflite]'` "
                "(ai-edge-litert) or use --runtime onnxruntime"
            ) from exc
    return Interpreter


def check_bytes(blob: bytes) -> None:
    """Cheap structural checks on a .tflite file before the interpreter parses it."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ModelError(f"a TFLite model must be bytes, not {type(blob).__name__}")
    n = len(blob)
    if n < _MIN_BYTES:
        raise ModelError(f"the TFLite model is {n} bytes: empty or truncated; re-download or re-export it")
    head = bytes(blob[:8])
    if head[4:8] != _IDENTIFIER:
        raise ModelError(
            f"not a TFLite file: expected identifier {_IDENTIFIER!r} at byte 4, found {head[4:8]!r}; "
            "check the model format in the manifest"
        )
    root = int.from_bytes(head[:4], "little")
    if root < 8 or root + 4 > n:
        raise ModelError(
            f"the TFLite model is truncated or corrupt (root table at {root}, file is {n} bytes)"
        )


def _dims(detail: dict[str, Any]) -> tuple[int | None, ...]:
    sig = detail.get("shape_signature")
    dims = sig if sig is not None and len(sig) else detail["shape"]
    return tuple(None if int(s) < 0 else int(s) for s in dims)


class LiteRTRunner(Runner):
    runtime = "litert"

    def __init__(self, interpreter: Any, blob: bytes) -> None:
        self._blob = blob  # the interpreter reads the model in place; keep it alive
        self.interpreter = interpreter
        self._in = interpreter.get_input_details()
        self._out = interpreter.get_output_details()
        self.input_names = [d["name"] for d in self._in]
        self.input_shapes = {d["name"]: _dims(d) for d in self._in}
        self.input_dtypes = {d["name"]: np.dtype(d["dtype"]) for d in self._in}
        self.output_names = [d["name"] for d in self._out]
        self._allocated: tuple[tuple[int, ...], ...] = tuple(
            tuple(int(s) for s in d["shape"]) for d in self._in
        )

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = list(self.check_feeds(feeds, cast_float_only=True).values())
        it = self.interpreter
        try:
            shapes = tuple(a.shape for a in arrays)
            if shapes != self._allocated:
                for d, a in zip(self._in, arrays, strict=True):
                    it.resize_tensor_input(d["index"], a.shape, strict=True)
                it.allocate_tensors()
                self._allocated = shapes
            for d, a in zip(self._in, arrays, strict=True):
                it.set_tensor(d["index"], a)
            it.invoke()
            return [it.get_tensor(d["index"]) for d in self._out]
        except (RuntimeError, ValueError) as exc:
            self._allocated = ()  # force a fresh allocation on the next call
            raise ModelError(f"LiteRT failed to run the model: {exc}") from exc


def open(blob: bytes, *, threads: int = 1) -> LiteRTRunner:  # the backend contract names it `open`
    """Load .tflite bytes. Corrupt, truncated or non-TFLite bytes raise ModelError."""
    if threads < 1:
        raise ModelError(f"threads must be >= 1, got {threads}")
    check_bytes(blob)
    blob = bytes(blob)
    interpreter_cls = _interpreter_class()
    try:
        interpreter = interpreter_cls(model_content=blob, num_threads=threads)
        interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        raise ModelError(
            f"cannot load the TFLite model ({len(blob)} bytes): it is corrupt, truncated or uses ops this "
            f"runtime lacks ({exc}); re-download or re-export it"
        ) from exc
    return LiteRTRunner(interpreter, blob)
