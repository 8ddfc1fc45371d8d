"""TFLite export of zoo models without TensorFlow: fp32, full-integer int8, and int8 head-as-inputs.

Graph interface (every variant, the same as the ONNX exports):
- input  `x`: float32 (batch, *input_shape) in torch layout (NCHW for the CNN), batch dynamic;
- output `logits`: float32 (batch, classes).
The int8 variants quantise `x` on entry and dequantise the logits on exit (QUANTIZE / DEQUANTIZE), with
activation ranges calibrated on real training samples and per-channel int8 weights. The head-as-inputs
variant adds float32 inputs `head.weight` (out, in) and `head.bias` (out,), the zoo model's last Linear in
torch layout: its backbone is int8 and its head a float FULLY_CONNECTED fed per call, so a zeroth-order
query with a perturbed head costs one call.

`to_graph()` maps a torch `nn.Sequential` (Linear, Conv2d, ReLU, MaxPool2d, Flatten, Softmax) onto
`fedfleet.models.tflite_writer.Graph`. Every model written is run through the LiteRT runner and checked against the
writer's numpy reference of the same graph (`verify`); a mismatch raises ModelError.

`export_backbone()` writes a frozen feature extractor (e.g. the digits package's backbone) as int8 TFLite.
`python -m fedfleet.models.export_tflite NAME OUTDIR` writes `<OUTDIR>/<NAME>.<variant>.tflite` for every variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.runtime import open_runner
from fedfleet.models import tflite_writer as tw
from fedfleet.models import zoo
from fedfleet.models.export_onnx import HEAD_INPUTS, INPUT, OUTPUT, calibration_samples

VARIANTS = ("tflite-fp32", "tflite-int8", "tflite-int8-headinputs")
INT8_TOLERANCE_LSB = (
    4.0  # max |runtime - reference| in output quantisation steps (kernels may round differently)
)
FP32_TOLERANCE = 1e-4


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv(layer: nn.Conv2d, relu: bool) -> tw.Conv2D:
    (sh, sw), (kh, kw) = _pair(layer.stride), _pair(layer.kernel_size)
    pad = _pair(layer.padding) if not isinstance(layer.padding, str) else layer.padding
    if sh != sw or _pair(layer.dilation) != (1, 1) or layer.groups != 1 or layer.padding_mode != "zeros":
        raise ModelError(
            f"{layer}: only square strides, no dilation, groups=1 and zero padding export to TFLite"
        )
    if pad in ((0, 0), "valid"):
        padding = "valid"
    elif pad == "same" or (sh == 1 and kh % 2 == 1 and kw % 2 == 1 and pad == (kh // 2, kw // 2)):
        padding = "same"
    else:
        raise ModelError(f"{layer}: padding {pad} has no TFLite equivalent; use 0 or kernel//2 with stride 1")
    bias = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(layer.out_channels, np.float32)
    return tw.Conv2D(layer.weight.detach().numpy().copy(), bias.copy(), sh, padding, relu)


def to_graph(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    head_inputs: bool = False,
    input_name: str = INPUT,
    output_name: str = OUTPUT,
) -> tw.Graph:
    """The writer graph of a torch Sequential. ReLUs after Linear/Conv2d are fused into them."""
    layers = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    out: list[tw.Layer] = []
    x = torch.zeros(1, *input_shape)
    flat_from: tuple[int, int, int] | None = (
        None  # (C, H, W) of the last NHWC flatten, for column permutation
    )
    i = 0
    with torch.no_grad():
        while i < len(layers):
            layer = layers[i]
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            if isinstance(layer, nn.Linear):
                w = layer.weight.detach().numpy().copy()
                if flat_from is not None:  # NHWC flatten: reorder columns from (C, H, W) to (H, W, C)
                    c, h, ww = flat_from
                    w = np.ascontiguousarray(
                        w.reshape(-1, c, h, ww).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
                    )
                    flat_from = None
                b = (
                    layer.bias.detach().numpy().copy()
                    if layer.bias is not None
                    else np.zeros(w.shape[0], np.float32)
                )
                out.append(tw.Dense(w, b, relu))
            elif isinstance(layer, nn.Conv2d):
                out.append(_conv(layer, relu))
            elif isinstance(layer, nn.MaxPool2d):
                k, s = (
                    _pair(layer.kernel_size),
                    _pair(layer.stride if layer.stride is not None else layer.kernel_size),
                )
                if k[0] != k[1] or s[0] != s[1] or _pair(layer.padding) != (0, 0) or layer.ceil_mode:
                    raise ModelError(
                        f"{layer}: only square, unpadded, floor-mode max pooling exports to TFLite"
                    )
                out.append(tw.MaxPool2D(k[0], s[0]))
            elif isinstance(layer, nn.Flatten):
                chw = head_inputs or x.dim() != 4
                if not chw:
                    flat_from = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
                out.append(tw.Flatten(chw=chw))
            elif isinstance(layer, nn.ReLU):
                out.append(tw.Relu())
            elif isinstance(layer, nn.Softmax):
                out.append(tw.Softmax())
            else:
                raise ModelError(f"layer {type(layer).__name__} has no TFLite mapping in fedfleet's writer")
            x = layer(x)
            if relu and isinstance(layer, (nn.Linear, nn.Conv2d)):
                x = layers[i + 1](x)
                i += 1
            i += 1
    if head_inputs and not isinstance(out[-1], tw.Dense):
        raise ModelError("head-as-inputs needs a model whose last layer is a Linear")
    return tw.Graph(tuple(input_shape), out, head_inputs, input_name, output_name, HEAD_INPUTS)


def verify(
    blob: bytes,
    graph: tw.Graph,
    calibration: list[tw.Range] | None,
    x: np.ndarray,
    head: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Run `blob` with LiteRT and compare with the numpy reference. Returns the max error (absolute for
    fp32, in output quantisation steps for int8); raises ModelError beyond tolerance."""
    runner = open_runner(blob, runtime="litert", threads=1)
    feeds = {graph.input_name: x}
    if graph.head_inputs:
        if head is None:
            last = graph.layers[-1]
            assert isinstance(last, tw.Dense)
            head = (last.weight, last.bias)
        feeds.update(dict(zip(graph.head_names, head, strict=True)))
    got = runner.run(feeds)[0]
    want = tw.reference(graph, x, calibration, head=head)
    err = float(np.abs(got.astype(np.float64) - want).max())
    if calibration is None:
        if err > FP32_TOLERANCE:
            raise ModelError(
                f"fp32 TFLite output differs from the numpy reference by {err:.3g} (> {FP32_TOLERANCE})"
            )
        return err
    steps = tw.lower(graph, calibration)
    if graph.head_inputs:  # one feature step moves a logit by at most scale * sum|w|
        feat_q = [s.out_q for s in steps if s.out_q is not None][-1]
        step = feat_q[0] * float(np.abs(head[0]).sum(axis=1).max())  # type: ignore[index]
    else:
        step = [s.out_q for s in steps if s.out_q is not None][-1][0]
    err_lsb = err / step
    if err_lsb > INT8_TOLERANCE_LSB:
        raise ModelError(
            f"int8 TFLite output differs from the numpy reference by {err_lsb:.2f} quantisation steps "
            f"(> {INT8_TOLERANCE_LSB}); the writer and the runtime disagree"
        )
    return err_lsb


def export_variants(
    name: str, model: nn.Module | None = None, *, seed: int = 0, check: bool = True
) -> dict[str, bytes]:
    """All TFLite variants of zoo model `name` (trained with `seed` unless `model` is given), each verified."""
    entry = zoo.get(name)
    if model is None:
        model = zoo.train(name, seed=seed)
    model = model.eval()
    calib = calibration_samples(name, seed=seed)
    graph = to_graph(model, entry.input_shape)
    head_graph = to_graph(model, entry.input_shape, head_inputs=True)
    cal = tw.calibrate(graph, calib)
    head_cal = tw.calibrate(head_graph, calib)
    blobs = {
        "tflite-fp32": tw.to_tflite(graph, description=f"fedfleet {name} fp32"),
        "tflite-int8": tw.to_tflite(graph, cal, description=f"fedfleet {name} int8"),
        "tflite-int8-headinputs": tw.to_tflite(
            head_graph, head_cal, description=f"fedfleet {name} int8 head-as-inputs"
        ),
    }
    if check:
        _, test_set = zoo.datasets(name)
        x = test_set.x[:256]
        verify(blobs["tflite-fp32"], graph, None, x)
        verify(blobs["tflite-int8"], graph, cal, x)
        verify(blobs["tflite-int8-headinputs"], head_graph, head_cal, x)
    return blobs


def export_backbone(
    extractor: nn.Module,
    input_shape: tuple[int, ...],
    calibration_x: np.ndarray,
    *,
    input_name: str = INPUT,
    output_name: str = "features",
    check_x: np.ndarray | None = None,
) -> bytes:
    """A frozen feature extractor as full-integer int8 TFLite (float in, float features out), calibrated
    on `calibration_x` and verified against the numpy reference on `check_x` (default: the calibration
    data): the TFLite twin of an int8 ONNX backbone, for model packages run with --runtime litert."""
    graph = to_graph(extractor.eval(), input_shape, input_name=input_name, output_name=output_name)
    cal = tw.calibrate(graph, calibration_x)
    blob = tw.to_tflite(graph, cal, description="fedfleet int8 backbone")
    verify(blob, graph, cal, calibration_x[:256] if check_x is None else check_x)
    return blob


def export_all(
    name: str, outdir: str | Path, model: nn.Module | None = None, *, seed: int = 0
) -> dict[str, Path]:
    """Write `<outdir>/<name>.<variant>.tflite` for every variant in `VARIANTS`; returns variant -> path."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for variant, blob in export_variants(name, model, seed=seed).items():
        path = outdir / f"{name}.{variant}.tflite"
        path.write_bytes(blob)
        paths[variant] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedfleet.models.export_tflite", description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=zoo.names())
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for variant, path in export_all(args.name, args.outdir, seed=args.seed).items():
        print(f"{variant}\t{path}\t{path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
