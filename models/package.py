"""Build the digits model package: a frozen int8 ONNX backbone plus an MLP head, or a full MLP.

`build_package(mode, head_hidden=32, seed=0) -> bytes` writes one deterministic zip (fixed timestamps,
sorted members) that `fedfleet.edge_agent.model.EdgeModel.from_bytes` loads:
- mode "transfer": backbone `backbone.onnx` = the shipped MNIST-pretrained int8 QDQ extractor
  (`fedfleet.models.backbone`, 64 -> 64 features); head 64-`head_hidden`-10 trained federatedly on digits
  (head_hidden = 0: a linear 64-10 head, as GGEUR trains).
- mode "full": no backbone; the head is the whole 64-`head_hidden`-10 MLP on raw 8x8 pixels.
- mode "lora": a frozen pre-trained MLP with LoRA adapters and a trainable head (`fedfleet.models.lora_base`).
The head's initial tensors come from `fedfleet.edge_agent.nn.mlp.init(head_sizes, seed)`.

`python -m fedfleet.models.package` prints the central (non-federated) head accuracy on digits for both modes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.model import FORMAT, FORMAT_VERSION, HEAD_INIT, MANIFEST
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.wire.protocol import digest
from fedfleet.models import backbone, head_graph
from fedfleet.models._zip import npz as _npz
from fedfleet.models._zip import write_zip

__all__ = ["BackboneFile", "assemble", "build_package", "write_zip", "central_head_accuracy"]

BACKBONE_FILE = "backbone.onnx"
INPUT_SHAPE = [64]
CLASSES = list(range(10))


@dataclass(frozen=True)
class BackboneFile:
    """An extra copy of the backbone in another format (e.g. TFLite for LiteRT agents)."""

    format: str  # "tflite" (or "onnx")
    data: bytes
    input: str = backbone.INPUT
    output: str = backbone.OUTPUT
    precision: str = "int8"


def _entry(file: str, data: bytes, fmt: str, inp: str, out: str, precision: str,
           pretrained_on: str = "mnist5k 8x8 (UCI-style preprocessing)") -> dict[str, str]:
    return {
        "file": file,
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": fmt,
        "precision": precision,
        "input": inp,
        "output": out,
        "pretrained_on": pretrained_on,
    }


DATASET_INPUTS = {"digits": [64], "mnist": [784]}


def manifest_for(
    mode: str, head_hidden: int, backbone_bytes: bytes | None, alternates: Sequence[BackboneFile] = (),
    dataset: str = "digits", head_layers: int = 1,
) -> dict[str, Any]:
    input_shape = DATASET_INPUTS[dataset]
    feature_dim = backbone.FEATURE_DIM if mode == "transfer" else int(np.prod(input_shape))
    sizes = [feature_dim, *[head_hidden] * head_layers, len(CLASSES)] if head_hidden else [feature_dim, len(CLASSES)]
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": f"{dataset}-{mode}",
        "mode": mode,
        "dataset": dataset,
        "input_shape": input_shape,
        "feature_dim": feature_dim,
        "head_sizes": sizes,
        "head_layout": [[name, list(shape)] for name, shape in mlp.layout(sizes)],
        "classes": CLASSES,
    }
    if backbone_bytes is not None:
        manifest["backbone"] = _entry(
            BACKBONE_FILE, backbone_bytes, "onnx", backbone.INPUT, backbone.OUTPUT, "int8-qdq"
        )
        if alternates:
            manifest["backbone_alternates"] = [
                _entry(f"backbone.{i}.{a.format}", a.data, a.format, a.input, a.output, a.precision)
                for i, a in enumerate(alternates)
            ]
    return manifest


def build_package(
    mode: str = "transfer", *, head_hidden: int = 32, seed: int = 0,
    alternates: Sequence[BackboneFile] | None = None, dataset: str = "digits", head_layers: int = 1,
) -> bytes:
    """One package blob for `mode` ("transfer" or "full"); deterministic for a given (mode, head_hidden, seed).

    `alternates` adds the same backbone in other formats (transfer mode). By default (None) that is the
    shipped int8 TFLite twin (`fedfleet.models.backbone.load_tflite()`), so LiteRT agents load the same package;
    pass `()` for an ONNX-only package. `dataset="mnist"` (full mode only) makes a 784-`head_hidden`-10
    MLP on raw 28x28 MNIST pixels, the FedZip benchmark's model. `head_layers` hidden layers of
    `head_hidden` units each (1).
    """
    if mode == "lora":  # a frozen pre-trained MLP plus LoRA adapters: fedfleet.models.lora_base
        from fedfleet.models.lora_base import build_lora_package

        return build_lora_package(dataset, seed=seed)
    if dataset not in DATASET_INPUTS:
        raise ConfigError(f"dataset {dataset!r} is unknown; choose one of {sorted(DATASET_INPUTS)}")
    if dataset != "digits" and mode != "full":
        raise ConfigError(f"the transfer backbone is for digits; use mode 'full' with dataset {dataset!r}")
    if mode not in ("transfer", "full"):
        raise ConfigError(f"package mode {mode!r} is unknown; choose 'transfer' or 'full'")
    if head_hidden < 0 or head_layers < 1:
        raise ConfigError(f"head_hidden must be >= 0 (0: a linear head) and head_layers >= 1, got {head_hidden}, "
                          f"{head_layers}")
    if alternates and mode != "transfer":
        raise ConfigError("backbone alternates only make sense in transfer mode; full mode has no backbone")
    backbone_bytes = backbone.load() if mode == "transfer" else None
    if alternates is None:  # by default ship the TFLite twin so LiteRT agents run the same package
        alternates = (BackboneFile("tflite", backbone.load_tflite()),) if mode == "transfer" else ()
    manifest = manifest_for(mode, head_hidden, backbone_bytes, alternates, dataset, head_layers)
    return assemble(manifest, backbone_bytes, alternates, seed)


def assemble(manifest: dict[str, Any], backbone_bytes: bytes | None, alternates: Sequence[BackboneFile],
             seed: int) -> bytes:
    """The package zip of `manifest` (its `head_sizes`, and `backbone` / `backbone_alternates` entries for
    `backbone_bytes` and `alternates`): the head's initial tensors (`mlp.init(head_sizes, seed)`), the
    backbone files and the head graphs. Every package with an MLP head is written here, built in or your
    own (`fedfleet.models.own_model`)."""
    members = {
        MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode(),
        HEAD_INIT: _npz(mlp.init(manifest["head_sizes"], seed)),
    }
    if backbone_bytes is not None:
        members[manifest["backbone"]["file"]] = backbone_bytes
    for spec, alt in zip(manifest.get("backbone_alternates", []), alternates, strict=True):
        members[spec["file"]] = alt.data
    # the head with its tensors as graph inputs, for zeroth-order queries in the agent's runtime
    graphs = {"onnx": head_graph.onnx_head(manifest["head_sizes"]),
              "tflite": head_graph.tflite_head(manifest["head_sizes"])}
    manifest["head_graphs"] = [{"file": f"head.{fmt}", "format": fmt, "sha256": hashlib.sha256(data).hexdigest(),
                                "input": "features", "output": "logits"} for fmt, data in graphs.items()]
    members[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    for fmt, data in graphs.items():
        members[f"head.{fmt}"] = data
    return write_zip(members)


def central_head_accuracy(
    mode: str, *, seed: int = 0, epochs: int = 60, lr: float = 0.05, batch_size: int = 32
) -> float:
    """Test accuracy of the head trained centrally (numpy SGD, edge maths) on the digits train split."""
    from fedfleet.edge_agent.model import EdgeModel
    from fedfleet.models import data as fdata

    model = EdgeModel.from_bytes(build_package(mode, seed=seed))
    train_set, test_set = fdata.split(fdata.digits(), 0.2, seed=0)
    f_train = model.features(train_set.x, "train")
    head = {k: v.copy() for k, v in model.head_init.items()}
    rng = np.random.Generator(np.random.PCG64(seed))
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(f_train)), max(1, len(f_train) // batch_size)):
            _, grads = mlp.loss_and_grad(head, f_train[idx], train_set.y[idx])
            for k in head:
                head[k] -= lr * grads[k]
    return model.accuracy(head, test_set.x, test_set.y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the digits packages and report central head accuracy."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for mode in ("transfer", "full"):
        blob = build_package(mode, seed=args.seed)
        acc = central_head_accuracy(mode, seed=args.seed)
        print(
            json.dumps({"mode": mode, "bytes": len(blob), "digest": digest(blob), "central_acc": acc})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
