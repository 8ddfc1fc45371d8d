"""ONNX Runtime backend of the Runner interface.

`open(blob, threads=...)` builds an InferenceSession from model bytes with intra/inter-op thread counts
set and intra-op spinning off (`session.intra_op.allow_spinning=0`): spinning threads burn a small board's
cores between calls. Feeds are checked (names, rank, fixed dimensions, dtype) before ORT is called, so a
bad feed gives a ModelError naming the input instead of an ORT stack trace. A model whose tensors keep
their data outside it (ONNX external data) is refused before ORT sees it: ORT would read those files
relative to the working directory (`fedfleet.edge_agent.runtime.onnx_scan`).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.runtime import Runner
from fedfleet.edge_agent.runtime.onnx_scan import external_tensors

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def _dim(d: object) -> int | None:
    return d if isinstance(d, int) and d >= 0 else None


class OnnxRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        inputs = session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.input_shapes = {i.name: tuple(_dim(d) for d in i.shape) for i in inputs}
        self.input_dtypes = {i.name: np.dtype(_DTYPES.get(i.type, np.float32)) for i in inputs}
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        checked = self.check_feeds(feeds)
        try:
            return self.session.run(self.output_names, checked)
        except Exception as exc:  # ORT raises its own pybind exception types
            raise ModelError(f"ONNX Runtime failed to run the model: {exc}") from exc


def session_options(threads: int) -> ort.SessionOptions:
    if threads < 1:
        raise ModelError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def check_self_contained(blob: bytes) -> None:
    """ModelError if the model keeps tensor data in files outside it (malformed bytes are left to ORT's load,
    which reports them as corrupt)."""
    try:
        external = external_tensors(blob)
    except ValueError:
        return
    if external:
        raise ModelError(f"the ONNX model keeps tensor data outside it (external data: {', '.join(external[:5])}"
                         f"{' ...' if len(external) > 5 else ''}); fedfleet models must be self-contained: "
                         "re-export it with the weights inside (onnx.save(..., save_as_external_data=False))")


def open(blob: bytes, *, threads: int = 1) -> OnnxRunner:  # the backend contract names it `open`
    """Load ONNX model bytes. Corrupt or truncated bytes raise ModelError."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) == 0:
        raise ModelError("the ONNX model is empty; pass the bytes of a .onnx file")
    check_self_contained(blob)
    try:
        session = ort.InferenceSession(
            bytes(blob), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises InvalidProtobuf, Fail, InvalidGraph ... as pybind types
        raise ModelError(
            f"cannot load the ONNX model ({len(blob)} bytes): it is corrupt, truncated or not ONNX ({exc}); "
            "re-download or re-export it"
        ) from exc
    return OnnxRunner(session)
