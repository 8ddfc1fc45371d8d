"""Static int8 QDQ quantisation of ONNX models with onnxruntime.quantization and a calibration reader.

Weights are int8, symmetric, per-channel and kept in 7 bits (`reduce_range`: ONNX Runtime's U8S8
kernels on x86 CPUs without VNNI saturate full 8-bit products, and x86 would then disagree with ARM);
activations are uint8 with ranges calibrated (MinMax) on real samples fed through
`ArrayCalibrationReader`. This is the U8S8 QDQ form ONNX Runtime runs with
integer kernels on ARM and x86. Dynamic quantisation is not offered: it is slower on small boards.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from fedfleet.edge_agent.errors import ModelError


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds `samples` (N, ...) to input `input_name` in batches, plus constant `extra` feeds if given."""

    def __init__(
        self,
        samples: np.ndarray,
        input_name: str = "x",
        batch_size: int = 64,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if len(samples) == 0:
            raise ModelError("calibration needs at least one sample; pass real training samples")
        self.samples = np.ascontiguousarray(samples, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = batch_size
        self.extra = dict(extra or {})
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.samples):
            return None
        batch = self.samples[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch, **self.extra}

    def rewind(self) -> None:
        self._pos = 0


def quantize_qdq(
    fp32: bytes,
    calibration: np.ndarray,
    *,
    input_name: str = "x",
    per_channel: bool = True,
    exclude_nodes: Iterable[str] = (),
    batch_size: int = 64,
) -> bytes:
    """int8 static QDQ copy of the fp32 ONNX model `fp32`, calibrated on `calibration` samples.

    Nodes named in `exclude_nodes` stay float (used to keep a trainable head in fp32).
    """
    try:
        model = onnx.load_from_string(fp32)
    except Exception as exc:  # onnx raises several types for bad bytes
        raise ModelError(f"cannot parse the fp32 ONNX model to quantise ({exc}); re-export it") from exc
    reader = ArrayCalibrationReader(calibration, input_name=input_name, batch_size=batch_size)
    root = logging.getLogger()
    level = root.level
    # onnxruntime logs a pre-processing hint through the root logger on every call: keep it quiet
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "int8.onnx"
            _quantize(model, out, reader, per_channel, list(exclude_nodes))
            return out.read_bytes()
    finally:
        root.setLevel(level)


def _quantize(
    model: onnx.ModelProto, out: Path, reader: CalibrationDataReader, per_channel: bool, exclude: list[str]
) -> None:
    quantize_static(
        model,
        out,
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        calibrate_method=CalibrationMethod.MinMax,
        reduce_range=True,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
