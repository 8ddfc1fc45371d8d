"""Write `.tflite` flatbuffers from a small layer graph, without TensorFlow, plus a numpy reference of it.

A `Graph` is a chain of layers given with torch-layout numpy weights (`Dense`, `Conv2D`, `MaxPool2D`,
`Flatten`, `Relu`, `Softmax`). `lower()` turns it into a list of TFLite steps (FULLY_CONNECTED, CONV_2D,
MAX_POOL_2D, RESHAPE, TRANSPOSE, RELU, SOFTMAX, QUANTIZE, DEQUANTIZE) with concrete tensors and
quantisation parameters. Both consumers read those same steps:

- `to_tflite()` packs them with the `flatbuffers` package and the schema shipped in ai-edge-litert;
- `reference()` runs them in numpy, emulating TFLite's integer arithmetic (int32 accumulators, fixed-point
  requantisation rounded the way LiteRT's default XNNPACK path rounds), so a written model can be checked against the graph it encodes.

Precision: fp32 when no calibration is given; full-integer int8 otherwise (`calibrate()` records activation
ranges on real data): int8 activations (asymmetric, per tensor), int8 weights (symmetric, per output
channel), int32 biases (scale = input scale x weight scale), and either float in/out with QUANTIZE and
DEQUANTIZE at the edges (`io="float"`) or int8 in/out (`io="int8"`).

Layout: a (C, H, W) input is fed in torch's NCHW and turned into NHWC by the graph (a RESHAPE when C == 1,
else a TRANSPOSE); conv weights are transposed to TFLite's (O, kh, kw, I). `Flatten(chw=True)` flattens in
torch's (C, H, W) order with a TRANSPOSE; `chw=False` flattens NHWC directly (the exporter then permutes the
next Dense's columns instead, which costs nothing at run time).

With `Graph.head_inputs`, the last layer (a Dense) takes its weight (out, in) and bias (out,) as graph
inputs in float: the backbone stays int8 and ends in a DEQUANTIZE, so one call evaluates one head.
"""

from __future__ import annotations

from typing import Any

import flatbuffers
import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.models.tflite_graph import (  # the graph and its lowering, re-exported for the writer's callers
    Conv2D,
    Dense,
    Flatten,
    Graph,
    Layer,
    MaxPool2D,
    Q,
    Range,
    Relu,
    Softmax,
    Step,
    act_q,
    calibrate,
    lower,
    quantize_multiplier,
    quantize_weight,
    reference,
    requantize,
    run_steps,
)
from fedfleet.models.tflite_schema import FILE_IDENTIFIER, SCHEMA_VERSION, schema

__all__ = ["Conv2D", "Dense", "Flatten", "Graph", "Layer", "MaxPool2D", "Q", "Range", "Relu", "Softmax", "Step", "act_q", "calibrate", "lower", "quantize_multiplier", "quantize_weight", "reference", "requantize", "run_steps", "to_tflite"]

# ---------------------------------------------------------------------------------------- flatbuffer


_VERSIONS = {  # (op, int8) -> operator version, as the TFLite converter would record them
    ("FULLY_CONNECTED", True): 4,
    ("CONV_2D", True): 3,
    ("MAX_POOL_2D", True): 2,
    ("SOFTMAX", True): 2,
    ("RELU", True): 2,
    ("TRANSPOSE", True): 2,
    ("QUANTIZE", True): 2,
    ("DEQUANTIZE", True): 2,
}


class _AlignedBufferT(schema.BufferT):  # type: ignore[misc,name-defined]
    """A Buffer whose data vector starts on a 16-byte boundary (what the converter does)."""

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 (flatbuffers API name)
        data = None
        if self.data is not None:
            payload = bytes(self.data)
            builder.StartVector(1, len(payload), 16)
            builder.head = builder.head - len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            builder.vectorNumElems = len(payload)
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


class _Builder:
    def __init__(self) -> None:
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [schema.BufferT()]  # buffer 0: the empty sentinel
        self.ops: list[Any] = []
        self.opcodes: dict[tuple[str, int], int] = {}

    def tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: int,
        *,
        data: np.ndarray | None = None,
        q: tuple[Any, Any] | None = None,
        batch: bool = False,
    ) -> int:
        t = schema.TensorT()
        t.name = name
        t.type = dtype
        t.shape = np.array([1, *shape] if batch else list(shape), np.int32)
        if batch:
            t.shapeSignature = np.array([-1, *shape], np.int32)
        if data is not None:
            buf = _AlignedBufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        if q is not None:
            qp = schema.QuantizationParametersT()
            qp.scale = np.atleast_1d(np.asarray(q[0], np.float32))
            qp.zeroPoint = np.atleast_1d(np.asarray(q[1], np.int64))
            qp.quantizedDimension = 0
            t.quantization = qp
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, name: str, inputs: list[int], outputs: list[int], int8: bool, options: Any = None) -> None:
        version = _VERSIONS.get((name, int8), 1)
        key = (name, version)
        if key not in self.opcodes:
            self.opcodes[key] = len(self.opcodes)
        o = schema.OperatorT()
        o.opcodeIndex = self.opcodes[key]
        o.inputs = np.array(inputs, np.int32)
        o.outputs = np.array(outputs, np.int32)
        if options is not None:
            o.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__[:-1])
            o.builtinOptions = options
        self.ops.append(o)

    def finish(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        sg = schema.SubGraphT()
        sg.tensors, sg.operators, sg.name = self.tensors, self.ops, "main"
        sg.inputs, sg.outputs = np.array(inputs, np.int32), np.array(outputs, np.int32)
        codes = []
        for (name, version), _ in sorted(self.opcodes.items(), key=lambda kv: kv[1]):
            oc = schema.OperatorCodeT()
            code = getattr(schema.BuiltinOperator, name)
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
            codes.append(oc)
        model = schema.ModelT()
        model.version, model.description = SCHEMA_VERSION, description
        model.operatorCodes, model.subgraphs, model.buffers = codes, [sg], self.buffers
        fb = flatbuffers.Builder(1024)
        fb.Finish(model.Pack(fb), file_identifier=FILE_IDENTIFIER)
        return bytes(fb.Output())


_F32, _I8, _I32 = schema.TensorType.FLOAT32, schema.TensorType.INT8, schema.TensorType.INT32
_ACT = {False: schema.ActivationFunctionType.NONE, True: schema.ActivationFunctionType.RELU}


def to_tflite(
    graph: Graph,
    calibration: list[Range] | None = None,
    io: str = "float",
    description: str = "fedfleet",
) -> bytes:
    """The `.tflite` file of `graph`: fp32 without `calibration`, full-integer int8 with it."""
    steps = lower(graph, calibration, io)
    b = _Builder()
    in_q = act_q(*calibration[0]) if calibration is not None and io == "int8" else None
    cur = b.tensor(graph.input_name, tuple(graph.input_shape), _I8 if in_q else _F32, q=in_q, batch=True)
    graph_inputs = [cur]
    head_ids: tuple[int, int] | None = None
    if graph.head_inputs:
        last = graph.layers[-1]
        assert isinstance(last, Dense)
        wn, bn = graph.head_names
        head_ids = (b.tensor(wn, last.weight.shape, _F32), b.tensor(bn, last.bias.shape, _F32))
        graph_inputs += list(head_ids)
    cur_q = in_q
    for k, step in enumerate(steps):
        last_step = k == len(steps) - 1
        name = graph.output_name if last_step else f"{k}_{step.op.lower()}"
        out = b.tensor(name, step.shape, _I8 if step.out_q else _F32, q=step.out_q, batch=True)
        int8 = step.out_q is not None or cur_q is not None
        a = step.attrs
        if step.op in ("QUANTIZE", "DEQUANTIZE", "RELU"):
            b.op(step.op, [cur], [out], int8)
        elif step.op in ("RESHAPE", "TRANSPOSE"):
            if step.op == "RESHAPE":
                const = np.array([-1, *step.shape], np.int32)
            else:
                const = np.array(a["perm"], np.int32)
            c = b.tensor(f"{k}_{step.op.lower()}_arg", const.shape, _I32, data=const)
            b.op(step.op, [cur, c], [out], int8)
        elif step.op == "MAX_POOL_2D":
            opt = schema.Pool2DOptionsT()
            opt.padding = schema.Padding.VALID
            opt.strideW = opt.strideH = a["stride"]
            opt.filterWidth = opt.filterHeight = a["size"]
            b.op(step.op, [cur], [out], int8, opt)
        elif step.op == "SOFTMAX":
            opt = schema.SoftmaxOptionsT()
            opt.beta = float(a["beta"])
            b.op(step.op, [cur], [out], int8, opt)
        elif step.op in ("FULLY_CONNECTED", "CONV_2D"):
            if a.get("head"):
                assert head_ids is not None
                wi, bi = head_ids
            elif step.out_q is None:
                wi = b.tensor(f"{k}_weight", a["w"].shape, _F32, data=a["w"])
                bi = b.tensor(f"{k}_bias", a["b"].shape, _F32, data=a["b"])
            else:
                wi = b.tensor(
                    f"{k}_weight",
                    a["w"].shape,
                    _I8,
                    data=a["w"],
                    q=(a["w_scale"], np.zeros(len(a["w_scale"]))),
                )
                bi = b.tensor(
                    f"{k}_bias",
                    a["b"].shape,
                    _I32,
                    data=a["b"],
                    q=(a["b_scale"], np.zeros(len(a["b_scale"]))),
                )
            if step.op == "FULLY_CONNECTED":
                opt = schema.FullyConnectedOptionsT()
            else:
                opt = schema.Conv2DOptionsT()
                opt.padding = schema.Padding.SAME if a["padding"] == "same" else schema.Padding.VALID
                opt.strideW = opt.strideH = a["stride"]
            opt.fusedActivationFunction = _ACT[bool(a["relu"])]
            b.op(step.op, [cur, wi, bi], [out], int8, opt)
        else:  # pragma: no cover - lower() only emits the ops above
            raise ModelError(f"cannot write op {step.op}")
        cur, cur_q = out, step.out_q
    return b.finish(graph_inputs, [cur], description)
