"""Your own model as a fedfleet package: a job's [model] table -> a frozen int8 backbone plus an MLP head.

The [model] keys (checked here; `where` names the table in every error):
- the backbone, one of:
  - `torch = "model.py:make_backbone"`: a Python file in the job's folder and a function returning a torch
    `nn.Module` (the frozen feature extractor, (N, *input_shape) -> (N, F)); it is exported to fp32 ONNX and
    quantised to int8 QDQ (`fedfleet.models.quantize.quantize_qdq`, calibrated on the first `calibration`
    training samples), and for `runtime = "litert"` jobs also written as int8 TFLite when every layer has a
    TFLite mapping (`fedfleet.models.export_tflite`); `weights = "file"` names a file the function reads, so
    a changed file is a new build;
  - `onnx = "backbone.onnx"` and/or `tflite = "backbone.tflite"`: a ready backbone used as shipped, with
    `input` and `output` naming its tensors (default: its only input and first output);
- `input_shape = [C, L]` (required with `torch`; read from the file otherwise);
- `head_hidden` (32; 0 = a linear head) and `classes` (a count, or a list of class names).

`build(table, base_dir, calibration, runtime=..., seed=...)` returns the package bytes, written by the
same `fedfleet.models.package.assemble` as the built-in packages, and keeps them in the package cache
(`fedfleet.models.package_cache.cache_dir()`): the key is the SHA-256 of the table, the input files, the
calibration samples, the seed, the runtime, fedfleet's package-writing sources and the installed libraries,
so a second run with the same inputs does not export or quantise again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.edge_agent.data import import_function
from fedfleet.edge_agent.errors import ConfigError, ModelError
from fedfleet.edge_agent.model import FORMAT, FORMAT_VERSION
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.runtime import open_runner
from fedfleet.models import package_cache
from fedfleet.models.package import BackboneFile, _entry, assemble

__all__ = ["MODEL_KEYS", "ModelSpec", "parse", "build", "cache_key"]

MODEL_KEYS = ("torch", "onnx", "tflite", "input", "output", "input_shape", "weights", "head_hidden", "classes",
              "calibration", "name")
INPUT, OUTPUT = "x", "features"  # tensor names of a backbone exported from torch
SOURCES = ("models/own_model.py", "models/quantize.py", "models/export_onnx.py", "models/export_tflite.py")
PRETRAINED = "the job's own backbone (see its [model] table)"


class ModelSpec:
    """A checked [model] table: paths resolved against the job's folder."""

    def __init__(self, table: Mapping[str, Any], base_dir: str | Path, where: str = "[model]") -> None:
        self.where = where
        unknown = sorted(set(table) - set(MODEL_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(MODEL_KEYS)}")
        base = Path(base_dir or ".")
        self.torch = self._str(table, "torch")
        self.onnx = self._file(table, "onnx", base)
        self.tflite = self._file(table, "tflite", base)
        self.weights = self._file(table, "weights", base)
        if self.torch and (self.onnx or self.tflite):
            raise ConfigError(f"{where}: give 'torch' (exported here) or 'onnx'/'tflite' (ready files), not both")
        if not (self.torch or self.onnx or self.tflite):
            raise ConfigError(f"{where}: name the backbone: torch = \"model.py:make_backbone\", or onnx = "
                              "\"backbone.onnx\" / tflite = \"backbone.tflite\"")
        self.torch_file: Path | None = None
        if self.torch:
            file, sep, func = self.torch.rpartition(":")
            if not sep or not file.endswith(".py") or not func.isidentifier():
                raise ConfigError(f"{where}: field 'torch' is written 'model.py:function', got {self.torch!r}")
            self.torch_file, self.torch_func = base / file, func
            if not self.torch_file.is_file():
                raise ConfigError(f"{where}: field 'torch': no such file {self.torch_file}")
        self.input = self._str(table, "input")
        self.output = self._str(table, "output")
        shape = table.get("input_shape")
        if shape is None and self.torch:
            raise ConfigError(f"{where}: field 'input_shape' is required with 'torch' (e.g. [1, 256])")
        if shape is not None and (not isinstance(shape, list) or not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise ConfigError(f"{where}: field 'input_shape' must be a list of positive integers, got {shape!r}")
        self.input_shape: list[int] | None = shape
        hidden = table.get("head_hidden", 32)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ConfigError(f"{where}: field 'head_hidden' must be an integer >= 0 (0: a linear head), got {hidden!r}")
        self.head_hidden = hidden
        classes = table.get("classes")
        if isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes):
            self.class_names: list[str] | None = list(classes)
            self.classes = len(classes)
        elif isinstance(classes, int) and not isinstance(classes, bool) and classes >= 2:
            self.class_names, self.classes = None, classes
        else:
            raise ConfigError(f"{where}: field 'classes' must be the number of classes (>= 2) or a list of their "
                              f"names, got {classes!r}")
        calib = table.get("calibration", 256)
        if isinstance(calib, bool) or not isinstance(calib, int) or calib < 1:
            raise ConfigError(f"{where}: field 'calibration' must be an integer >= 1 (training samples), got {calib!r}")
        self.calibration = calib
        self.name = self._str(table, "name") or "custom"
        self.table = dict(table)

    def _str(self, table: Mapping[str, Any], key: str) -> str | None:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{self.where}: field '{key}' must be a non-empty string, got {value!r}")
        return value

    def _file(self, table: Mapping[str, Any], key: str, base: Path) -> Path | None:
        value = self._str(table, key)
        if value is None:
            return None
        path = base / value
        if not path.is_file():
            raise ConfigError(f"{self.where}: field '{key}': no such file {path}")
        return path

    def files(self) -> list[Path]:
        return [p for p in (self.torch_file, self.weights, self.onnx, self.tflite) if p is not None]


def parse(table: Mapping[str, Any] | None, base_dir: str | Path, where: str = "[model]") -> ModelSpec:
    if not table:
        raise ConfigError(f"{where}: the table is missing; a custom task needs its model")
    return ModelSpec(table, base_dir, where)


def cache_key(spec: ModelSpec, calibration: np.ndarray, runtime: str, seed: int) -> str:
    """SHA-256 (hex) of everything the package bytes depend on (see the module docstring)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    h.update(json.dumps({"table": spec.table, "runtime": runtime, "seed": seed,
                         "libraries": {n: package_cache._installed(n) for n in (*package_cache.LIBRARIES, "torch",
                                                                                "onnxruntime")}},
                        sort_keys=True, default=str).encode())
    for path in spec.files():
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(np.ascontiguousarray(calibration, np.float32).tobytes() + str(calibration.shape).encode())
    for rel in (*package_cache.SOURCES, *SOURCES):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()


def build(spec: ModelSpec, calibration: np.ndarray, *, runtime: str = "onnxruntime", seed: int = 0,
          refresh: bool = False) -> bytes:
    """The package of `spec` (from the cache when the same inputs built one; `refresh`: build anew).
    `calibration`: training samples (N, *input_shape), the first `spec.calibration` of them calibrate int8."""
    calibration = np.ascontiguousarray(calibration[: spec.calibration], np.float32)
    try:
        key = cache_key(spec, calibration, runtime, seed)
    except OSError:  # fedfleet's sources are not on disk (an install without them): no cache
        return _build(spec, calibration, runtime, seed)
    blob = None if refresh else package_cache.load(f"custom-{key}")  # checked: fedfleet.models.package_cache
    if blob is None:
        blob = _build(spec, calibration, runtime, seed)
        package_cache.store(f"custom-{key}", blob)
    return blob


def _build(spec: ModelSpec, calibration: np.ndarray, runtime: str, seed: int) -> bytes:
    if spec.torch:
        main, alternates = _from_torch(spec, calibration, runtime)
    else:
        main, alternates = _from_files(spec)
    input_shape = spec.input_shape or _runner_shape(main, spec.where)
    feature_dim = _feature_dim(main, input_shape, spec.where)
    sizes = [feature_dim, spec.head_hidden, spec.classes] if spec.head_hidden else [feature_dim, spec.classes]
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": spec.name, "mode": "transfer",
        "dataset": "custom", "input_shape": list(input_shape), "feature_dim": feature_dim, "head_sizes": sizes,
        "head_layout": [[name, list(shape)] for name, shape in mlp.layout(sizes)],
        "classes": list(range(spec.classes)),
        "backbone": _entry(f"backbone.{main.format}", main.data, main.format, main.input, main.output,
                           main.precision, PRETRAINED),
    }
    if spec.class_names:
        manifest["class_names"] = spec.class_names
    if alternates:
        manifest["backbone_alternates"] = [
            _entry(f"backbone.{i}.{a.format}", a.data, a.format, a.input, a.output, a.precision, PRETRAINED)
            for i, a in enumerate(alternates)]
    return assemble(manifest, main.data, alternates, seed)


def _from_torch(spec: ModelSpec, calibration: np.ndarray, runtime: str) -> tuple[BackboneFile, list[BackboneFile]]:
    import torch
    from torch import nn

    from fedfleet.models.export_onnx import export_fp32
    from fedfleet.models.quantize import quantize_qdq

    assert spec.torch_file is not None and spec.input_shape is not None
    where = f"{spec.where} torch"
    make = import_function(spec.torch_file, spec.torch_func, where)
    try:
        module = make()
    except Exception as exc:  # noqa: BLE001 - the user's code: say where it failed
        raise ConfigError(f"{where}: {spec.torch} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where}: {spec.torch} must return a torch nn.Module, got {type(module).__name__}")
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            module(torch.zeros(1, *spec.input_shape))
        fp32 = export_fp32(module, tuple(spec.input_shape), input_name=INPUT, output_name=OUTPUT)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a module that does not fit
        raise ConfigError(f"{where}: the module does not run or export on input_shape {spec.input_shape} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if len(calibration) == 0:
        raise ConfigError(f"{where}: int8 calibration needs training samples; [data] gave none")
    int8 = quantize_qdq(fp32, calibration, input_name=INPUT)
    main = BackboneFile("onnx", int8, INPUT, OUTPUT, "int8-qdq")
    if runtime != "litert":
        return main, []
    from fedfleet.models.export_tflite import export_backbone

    try:
        tfl = export_backbone(module, tuple(spec.input_shape), calibration, input_name=INPUT, output_name=OUTPUT)
    except ModelError as exc:
        raise ConfigError(f"{where}: no int8 TFLite twin for runtime 'litert': {_tflite_blocker(module) or exc}; "
                          "use runtime 'onnxruntime' or give a ready tflite file") from None
    return main, [BackboneFile("tflite", tfl, INPUT, OUTPUT, "int8")]


TFLITE_LAYERS = ("Linear", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Softmax")


def _tflite_blocker(module: Any) -> str | None:
    """Which layer keeps `module` from fedfleet's TFLite writer (an nn.Sequential of TFLITE_LAYERS), or None."""
    from torch import nn

    leaves = [(name, m) for name, m in module.named_modules() if not list(m.children())]
    for name, m in leaves:
        if type(m).__name__ not in TFLITE_LAYERS:
            return f"layer {name or 'the module'} ({type(m).__name__}) has no TFLite mapping"
    if not isinstance(module, nn.Sequential):
        return (f"{type(module).__name__} computes in its own forward(); the TFLite writer takes an nn.Sequential "
                f"of {', '.join(TFLITE_LAYERS)}")
    return None


def _from_files(spec: ModelSpec) -> tuple[BackboneFile, list[BackboneFile]]:
    files = [(fmt, path) for fmt, path in (("onnx", spec.onnx), ("tflite", spec.tflite)) if path is not None]
    out = []
    for fmt, path in files:
        data = path.read_bytes()
        runtime = "onnxruntime" if fmt == "onnx" else "litert"
        try:
            runner = open_runner(data, runtime=runtime)
        except Exception as exc:  # noqa: BLE001 - the runtimes raise many types for a bad file
            raise ConfigError(f"{spec.where} {fmt}: {path.name} does not load in {runtime} ({exc})") from None
        inp = spec.input or (runner.input_names[0] if len(runner.input_names) == 1 else None)
        if inp is None or inp not in runner.input_names:
            raise ConfigError(f"{spec.where}: field 'input' must name the backbone's input, one of "
                              f"{runner.input_names}, got {spec.input!r}")
        if len(runner.input_names) != 1:
            raise ConfigError(f"{spec.where} {fmt}: the backbone must have one input, {path.name} has "
                              f"{runner.input_names}")
        outp = spec.output or runner.output_names[0]
        if outp not in runner.output_names:
            raise ConfigError(f"{spec.where}: field 'output' must name one of the backbone's outputs "
                              f"{runner.output_names}, got {outp!r}")
        out.append(BackboneFile(fmt, data, inp, outp, "as shipped"))
    return out[0], out[1:]


def _runner_shape(main: BackboneFile, where: str) -> list[int]:
    runner = open_runner(main.data, runtime="onnxruntime" if main.format == "onnx" else "litert")
    shape = runner.input_shapes[main.input][1:]
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(f"{where}: the backbone's input shape {shape} has free dimensions; set 'input_shape'")
    return [int(d) for d in shape]


def _feature_dim(main: BackboneFile, input_shape: list[int], where: str) -> int:
    runner = open_runner(main.data, runtime="onnxruntime" if main.format == "onnx" else "litert")
    try:
        out = runner.run({main.input: np.zeros((1, *input_shape), np.float32)})
    except Exception as exc:  # noqa: BLE001 - the runtimes raise many types for a wrong shape
        raise ConfigError(f"{where}: the backbone does not run on input_shape {input_shape} ({exc})") from None
    return int(np.prod(out[runner.output_names.index(main.output)].shape[1:]))
