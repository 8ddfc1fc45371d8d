"""A small layer graph for TFLite and its lowering to TFLite steps, with a numpy reference that runs them.

A `Graph` is a chain of layers given with torch-layout numpy weights (`Dense`, `Conv2D`, `MaxPool2D`,
`Flatten`, `Relu`, `Softmax`). `lower()` turns it into a list of TFLite steps (FULLY_CONNECTED, CONV_2D,
MAX_POOL_2D, RESHAPE, TRANSPOSE, RELU, SOFTMAX, QUANTIZE, DEQUANTIZE) with concrete tensors and
quantisation parameters; `reference()` runs those steps in numpy, emulating TFLite's integer arithmetic,
and `fedfleet.models.tflite_writer.to_tflite()` packs the same steps into a `.tflite` file. The precision
and layout rules are in `fedfleet.models.tflite_writer`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ModelError

# ---------------------------------------------------------------------------------------------- graph IR


@dataclass
class Dense:
    weight: np.ndarray  # (out, in), torch layout
    bias: np.ndarray  # (out,)
    relu: bool = False


@dataclass
class Conv2D:
    weight: np.ndarray  # (out, in, kh, kw), torch layout
    bias: np.ndarray  # (out,)
    stride: int = 1
    padding: str = "same"  # "same" or "valid"
    relu: bool = False


@dataclass
class MaxPool2D:
    size: int = 2
    stride: int = 2


@dataclass
class Flatten:
    chw: bool = False  # flatten in torch (C, H, W) order (adds a TRANSPOSE) instead of NHWC order


@dataclass
class Relu:
    pass


@dataclass
class Softmax:
    beta: float = 1.0


Layer = Dense | Conv2D | MaxPool2D | Flatten | Relu | Softmax


@dataclass
class Graph:
    input_shape: tuple[int, ...]  # one sample, torch layout: (F,) or (C, H, W)
    layers: list[Layer]
    head_inputs: bool = False  # the last layer's weight and bias are float graph inputs
    input_name: str = "x"
    output_name: str = "logits"
    head_names: tuple[str, str] = ("head.weight", "head.bias")


Range = tuple[float, float]
Q = tuple[float, int]  # (scale, zero_point) of an int8 tensor


@dataclass
class Step:
    op: str  # TFLite builtin operator name
    shape: tuple[int, ...]  # output shape of one sample (TFLite layout)
    out_q: Q | None  # None: float32 output
    layer: int  # index of the Graph layer this step belongs to; -1 for input handling
    attrs: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ quantisation


def act_q(lo: float, hi: float) -> Q:
    """int8 asymmetric parameters covering [lo, hi] (widened to include 0, as TFLite requires)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zp = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zp


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 (axis 0): (int8 values, float32 scales)."""
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(flat).max(axis=1)
    scales = np.where(amax > 0, amax / 127.0, 1.0)
    q = np.clip(np.round(flat / scales[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
    return q, scales.astype(np.float32)


def quantize_multiplier(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's QuantizeMultiplier: real m = q * 2**(shift - 31) with q an int32 in [2**30, 2**31)."""
    mant, shift = np.frexp(np.asarray(m, np.float64))
    q = np.round(mant * (1 << 31)).astype(np.int64)
    wrap = q == (1 << 31)
    q = np.where(wrap, q // 2, q)
    shift = np.where(wrap, shift + 1, shift).astype(np.int64)
    tiny = shift < -31
    return np.where(tiny, 0, q), np.where(tiny, 0, shift)


def requantize(acc: np.ndarray, q: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier as LiteRT builds it (single rounding): round(acc * q / 2**(31 - shift))
    with ties rounded up."""
    total = 31 - shift
    return (acc.astype(np.int64) * q + (np.int64(1) << (total - 1))) >> total


# ----------------------------------------------------------------------------------------------- lowering


def _conv_out(size: int, k: int, stride: int, padding: str) -> int:
    return -(-size // stride) if padding == "same" else (size - k) // stride + 1


def lower(graph: Graph, calibration: list[Range] | None = None, io: str = "float") -> list[Step]:
    """The TFLite steps of `graph`. `calibration` (from `calibrate`) makes it full-integer int8."""
    if io not in ("float", "int8"):
        raise ModelError(f"io must be 'float' or 'int8', not {io!r}")
    int8 = calibration is not None
    if int8 and len(calibration) != len(graph.layers) + 1:
        raise ModelError(
            f"calibration has {len(calibration)} ranges but the graph needs {len(graph.layers) + 1} "
            "(input + one per layer); rebuild it with calibrate() on this graph"
        )
    if io == "int8" and (not int8 or graph.head_inputs):
        raise ModelError("int8 in/out needs a calibrated graph without float head inputs")
    if graph.head_inputs and not (graph.layers and isinstance(graph.layers[-1], Dense)):
        raise ModelError("head_inputs needs a graph whose last layer is a Dense")
    steps: list[Step] = []
    shape = tuple(graph.input_shape)
    cur: Q | None = act_q(*calibration[0]) if int8 else None
    if int8 and io == "float":
        steps.append(Step("QUANTIZE", shape, cur, -1))
    if len(shape) == 3:
        c, h, w = shape
        shape = (h, w, c)
        if c == 1:
            steps.append(Step("RESHAPE", shape, cur, -1))
        else:
            steps.append(Step("TRANSPOSE", shape, cur, -1, {"perm": (0, 2, 3, 1)}))
    elif len(shape) != 1:
        raise ModelError(f"input shape {graph.input_shape} is neither (features,) nor (C, H, W)")

    n = len(graph.layers)
    for i, layer in enumerate(graph.layers):
        head = graph.head_inputs and i == n - 1
        if head and cur is not None:
            steps.append(Step("DEQUANTIZE", shape, None, i))
            cur = None
        out_q = act_q(*calibration[i + 1]) if cur is not None else None
        if isinstance(layer, Dense):
            if len(shape) != 1:
                raise ModelError(f"layer {i} (Dense) needs a flat input; add a Flatten before it")
            if layer.weight.shape[1] != shape[0]:
                raise ModelError(f"layer {i} (Dense) expects {layer.weight.shape[1]} inputs, gets {shape[0]}")
            shape = (layer.weight.shape[0],)
            attrs: dict[str, Any] = {"relu": layer.relu, "head": head}
            if not head:
                attrs.update(_weights(layer.weight, layer.bias, cur, out_q))
            steps.append(Step("FULLY_CONNECTED", shape, out_q, i, attrs))
        elif isinstance(layer, Conv2D):
            if len(shape) != 3 or layer.weight.shape[1] != shape[2]:
                raise ModelError(
                    f"layer {i} (Conv2D {layer.weight.shape}) does not fit input {shape} (H, W, C)"
                )
            if layer.padding not in ("same", "valid"):
                raise ModelError(f"layer {i}: padding must be 'same' or 'valid', not {layer.padding!r}")
            kh, kw = layer.weight.shape[2:]
            h, w = shape[0], shape[1]
            shape = (
                _conv_out(h, kh, layer.stride, layer.padding),
                _conv_out(w, kw, layer.stride, layer.padding),
                layer.weight.shape[0],
            )
            attrs = {"relu": layer.relu, "stride": layer.stride, "padding": layer.padding}
            attrs.update(_weights(np.transpose(layer.weight, (0, 2, 3, 1)), layer.bias, cur, out_q))
            steps.append(Step("CONV_2D", shape, out_q, i, attrs))
        elif isinstance(layer, MaxPool2D):
            if len(shape) != 3:
                raise ModelError(f"layer {i} (MaxPool2D) needs an (H, W, C) input, gets {shape}")
            shape = (
                (shape[0] - layer.size) // layer.stride + 1,
                (shape[1] - layer.size) // layer.stride + 1,
                shape[2],
            )
            steps.append(Step("MAX_POOL_2D", shape, cur, i, {"size": layer.size, "stride": layer.stride}))
        elif isinstance(layer, Flatten):
            if len(shape) == 3 and layer.chw and shape[0] * shape[1] > 1 and shape[2] > 1:
                steps.append(
                    Step("TRANSPOSE", (shape[2], shape[0], shape[1]), cur, i, {"perm": (0, 3, 1, 2)})
                )
            shape = (int(np.prod(shape)),)
            steps.append(Step("RESHAPE", shape, cur, i))
        elif isinstance(layer, Relu):
            steps.append(Step("RELU", shape, cur, i))
        elif isinstance(layer, Softmax):
            if len(shape) != 1:
                raise ModelError(f"layer {i} (Softmax) needs a flat input, gets {shape}")
            sq = (1.0 / 256.0, -128) if cur is not None else None
            steps.append(Step("SOFTMAX", shape, sq, i, {"beta": layer.beta}))
        else:
            raise ModelError(f"layer {i}: unsupported layer type {type(layer).__name__}")
        cur = steps[-1].out_q
    if cur is not None and io == "float":
        steps.append(Step("DEQUANTIZE", shape, None, n - 1))
    return steps


def _weights(w: np.ndarray, b: np.ndarray, in_q: Q | None, out_q: Q | None) -> dict[str, Any]:
    if in_q is None or out_q is None:
        return {"w": np.ascontiguousarray(w, np.float32), "b": np.ascontiguousarray(b, np.float32)}
    wq, ws = quantize_weight(w)
    # a channel whose weights are (almost) all zero gets a tiny scale, and its bias would overflow int32:
    # floor such scales so the bias fits (the channel's weights then round to zero, as they nearly are)
    floor = np.abs(np.asarray(b, np.float64)) / (in_q[0] * 2.0**30)
    if np.any(ws < floor):
        ws = np.maximum(ws.astype(np.float64), floor).astype(np.float32)
        flat = w.reshape(w.shape[0], -1).astype(np.float64)
        wq = np.clip(np.round(flat / ws[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
    bs = in_q[0] * ws.astype(np.float64)
    bq = np.round(np.asarray(b, np.float64) / bs)
    if np.abs(bq).max(initial=0) >= 2**31:
        raise ModelError("a bias does not fit int32 at input_scale x weight_scale; recalibrate on wider data")
    mq, mshift = quantize_multiplier(in_q[0] * ws.astype(np.float64) / out_q[0])
    return {
        "w": wq,
        "w_scale": ws,
        "b": bq.astype(np.int32),
        "b_scale": bs.astype(np.float32),
        "mult": (mq, mshift),
    }


# ------------------------------------------------------------------------------------------------ numpy


def _windows(x: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # (N, H', W', C, kh, kw)
    return win[:, ::stride, ::stride]


def _pad_same(x: np.ndarray, kh: int, kw: int, stride: int, value: float) -> np.ndarray:
    pads = []
    for size, k in ((x.shape[1], kh), (x.shape[2], kw)):
        total = max((-(-size // stride) - 1) * stride + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=value)


def _clamp_q(acc: np.ndarray, out_q: Q, relu: bool) -> np.ndarray:
    lo = max(-128, out_q[1]) if relu else -128
    return np.clip(acc + out_q[1], lo, 127).astype(np.int8)


def _run_step(
    step: Step, x: np.ndarray, in_q: Q | None, head: tuple[np.ndarray, np.ndarray] | None
) -> np.ndarray:
    a = step.attrs
    if step.op == "QUANTIZE":
        s, zp = step.out_q  # type: ignore[misc]
        return np.clip(np.round(x.astype(np.float32) / np.float32(s)) + zp, -128, 127).astype(np.int8)
    if step.op == "DEQUANTIZE":
        s, zp = in_q  # type: ignore[misc]
        return ((x.astype(np.int32) - zp) * np.float32(s)).astype(np.float32)
    if step.op in ("RESHAPE", "TRANSPOSE"):
        if step.op == "TRANSPOSE":
            x = np.transpose(x, a["perm"])
        return np.ascontiguousarray(x).reshape((x.shape[0], *step.shape))
    if step.op == "RELU":
        return np.maximum(x, in_q[1] if in_q else 0).astype(x.dtype)
    if step.op == "MAX_POOL_2D":
        return _windows(x, a["size"], a["size"], a["stride"]).max(axis=(4, 5))
    if step.op == "SOFTMAX":
        f = x.astype(np.float64) if in_q is None else (x.astype(np.float64) - in_q[1]) * in_q[0]
        e = np.exp(a["beta"] * (f - f.max(axis=1, keepdims=True)))
        p = e / e.sum(axis=1, keepdims=True)
        if step.out_q is None:
            return p.astype(np.float32)
        return np.clip(np.round(p * 256.0) - 128, -128, 127).astype(np.int8)
    if step.op in ("FULLY_CONNECTED", "CONV_2D"):
        if step.op == "CONV_2D":
            w = a["w"]
            kh, kw = w.shape[1], w.shape[2]
            pad = in_q[1] if in_q else 0.0
            xp = _pad_same(x, kh, kw, a["stride"], pad) if a["padding"] == "same" else x
            win = _windows(xp, kh, kw, a["stride"])  # (N, Ho, Wo, C, kh, kw)
            n, ho, wo = win.shape[:3]
            cols = np.transpose(win, (0, 1, 2, 4, 5, 3)).reshape(n * ho * wo, -1)
            w2, b = w.reshape(w.shape[0], -1), a["b"]
        else:
            cols = x
            if a["head"] and head is None:
                raise ModelError("this graph takes the head as inputs; pass head=(weight, bias)")
            w2, b = head if a["head"] else (a["w"], a["b"])  # type: ignore[misc]
        if step.out_q is None:
            out = cols.astype(np.float32) @ np.asarray(w2, np.float32).T + np.asarray(b, np.float32)
            out = np.maximum(out, 0) if a["relu"] else out
        else:
            # exact int32 accumulation via float64 (every partial sum is far below 2**53)
            acc = (cols.astype(np.float64) - in_q[1]) @ w2.astype(np.float64).T  # type: ignore[index]
            acc = acc.astype(np.int64) + b.astype(np.int64)
            out = _clamp_q(requantize(acc, *a["mult"]), step.out_q, a["relu"])
        return out.reshape((x.shape[0], *step.shape))
    raise ModelError(f"no numpy reference for op {step.op}")


def run_steps(
    steps: list[Step],
    x: np.ndarray,
    head: tuple[np.ndarray, np.ndarray] | None = None,
    in_q: Q | None = None,
    record: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Run lowered steps in numpy; `record` collects each step's output."""
    cur_q = in_q
    for step in steps:
        x = _run_step(step, x, cur_q, head)
        cur_q = step.out_q
        if record is not None:
            record.append(x)
    return x


def reference(
    graph: Graph,
    x: np.ndarray,
    calibration: list[Range] | None = None,
    io: str = "float",
    head: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """What `to_tflite(graph, calibration, io)` should compute on `x` (the graph input, batch first)."""
    steps = lower(graph, calibration, io)
    in_q = act_q(*calibration[0]) if calibration is not None and io == "int8" else None
    x = np.asarray(x, np.int8 if in_q else np.float32)
    return run_steps(steps, x, head, in_q)


def calibrate(graph: Graph, x: np.ndarray) -> list[Range]:
    """Activation ranges (min, max) of the fp32 graph on calibration data: the input, then every layer."""
    steps = lower(graph)
    outs: list[np.ndarray] = []
    head = None
    if graph.head_inputs:
        last = graph.layers[-1]
        assert isinstance(last, Dense)
        head = (last.weight, last.bias)
    run_steps(steps, np.asarray(x, np.float32), head, record=outs)
    ranges: list[Range] = [(float(np.min(x)), float(np.max(x)))]
    for i in range(len(graph.layers)):
        last_out = [o for s, o in zip(steps, outs, strict=True) if s.layer == i][-1]
        ranges.append((float(last_out.min()), float(last_out.max())))
    return ranges
