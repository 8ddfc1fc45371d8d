"""ONNX export of zoo models: fp32, int8 static QDQ, and the int8 head-as-inputs variant.

Graph interface (every variant):
- input  `x`: float32 (batch, *input_shape), batch dynamic;
- output `logits`: float32 (batch, classes).
The head-as-inputs variant adds two float32 inputs, `head.weight` (out, in) and `head.bias` (out,): the
last Linear layer's tensors, fed per call instead of stored, so a zeroth-order query with a perturbed head
costs one runtime call. Its backbone is int8 QDQ; the head's Gemm stays float.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from fedfleet.edge_agent.errors import ModelError
from fedfleet.models import zoo
from fedfleet.models.quantize import quantize_qdq

INPUT = "x"
OUTPUT = "logits"
HEAD_INPUTS = ("head.weight", "head.bias")
OPSET = 17
VARIANTS = ("onnx-fp32", "onnx-int8", "onnx-int8-headinputs")


def export_fp32(
    model: nn.Module, input_shape: tuple[int, ...], *, input_name: str = INPUT, output_name: str = OUTPUT
) -> bytes:
    """Export `model` (eval mode) to ONNX fp32 bytes with a dynamic batch dimension."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, *input_shape),),
            buf,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()


def node_consuming(model_bytes: bytes, tensor: str) -> str:
    """Name of the node that consumes initializer `tensor` (the head layer's Gemm)."""
    graph = onnx.load_from_string(model_bytes).graph
    for node in graph.node:
        if tensor in node.input:
            return node.name
    raise ModelError(f"no node consumes {tensor!r}; is it the head of this model?")


def head_as_inputs(model_bytes: bytes, head: list[str], input_names: tuple[str, str] = HEAD_INPUTS) -> bytes:
    """Turn the head initializers `head` (weight, bias) into graph inputs named `input_names`."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    for old, new in zip(head, input_names, strict=True):
        if old not in inits:
            raise ModelError(f"head tensor {old!r} is not an initializer of the model; export it baked first")
        init = inits[old]
        graph.initializer.remove(init)
        graph.input.append(helper.make_tensor_value_info(new, TensorProto.FLOAT, list(init.dims)))
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
    onnx.checker.check_model(model)
    return model.SerializeToString()


def calibration_samples(name: str, n: int = 512, seed: int = 0) -> np.ndarray:
    """`n` real training samples of zoo model `name`, drawn with a seeded generator."""
    train_set, _ = zoo.datasets(name)
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = np.sort(rng.choice(len(train_set), size=min(n, len(train_set)), replace=False))
    return train_set.x[idx]


def export_variants(name: str, model: nn.Module | None = None, *, seed: int = 0) -> dict[str, bytes]:
    """All ONNX variants of zoo model `name` (trained with `seed` unless `model` is given).

    Keys: the three of `VARIANTS` plus "onnx-int8-headfp32", the baked twin of the head-as-inputs variant.
    """
    entry = zoo.get(name)
    if model is None:
        model = zoo.train(name, seed=seed)
    fp32 = export_fp32(model, entry.input_shape)
    calib = calibration_samples(name, seed=seed)
    int8 = quantize_qdq(fp32, calib)
    head_fp32 = quantize_qdq(fp32, calib, exclude_nodes=[node_consuming(fp32, entry.head[0])])
    return {
        "onnx-fp32": fp32,
        "onnx-int8": int8,
        "onnx-int8-headinputs": head_as_inputs(head_fp32, entry.head),
        "onnx-int8-headfp32": head_fp32,
    }


def export_all(
    name: str, outdir: str | Path, model: nn.Module | None = None, *, seed: int = 0
) -> dict[str, Path]:
    """Write `<outdir>/<name>.<variant>.onnx` for every variant in `VARIANTS`; returns variant -> path."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    blobs = export_variants(name, model, seed=seed)
    paths: dict[str, Path] = {}
    for variant in VARIANTS:
        path = outdir / f"{name}.{variant}.onnx"
        path.write_bytes(blobs[variant])
        paths[variant] = path
    return paths
