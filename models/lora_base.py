"""Frozen, pre-trained base MLPs for the `lora` package mode, and the package builder.

Two bases, each pre-trained centrally with `fedfleet.models.train.fit` (seeded Adam) on data the federated jobs never
see, so fine-tuning starts from a real pre-trained model without test leakage:
- `digits`: 64-64-10, pre-trained on the MNIST 5k images in sklearn-digits style
  (`fedfleet.models.backbone.mnist_8x8_uci`); fine-tuned on (feature-shifted) sklearn digits. Shipped as
  `models/artifacts/digits-lora-base.npz` because the MNIST preprocessing is slow; `python -m fedfleet.models.lora_base`
  rebuilds it (the same seed gives the same tensors on the same torch build).
- `mnist`: 784-256-256-10, pre-trained on the pre-training half of the MNIST 5k file
  (`fedfleet.models.shifts.lora_pool(..., "pretrain")`); fine-tuned on the other half. Built on first use and cached
  in the process (a few seconds).

`build_lora_package(dataset, rank, alpha, seed)` writes a deterministic package: the base as `lora_base.npz`
(sha256 in the manifest), A per adapted layer drawn with numpy PCG64(seed), B zero, and the head initialised to
the base's last layer. LoRA adapts every hidden layer; the last layer is the trainable head.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.model import FORMAT, FORMAT_VERSION, HEAD_INIT, MANIFEST
from fedfleet.edge_agent.nn import lora as lora_mlp
from fedfleet.edge_agent.nn import mlp

SIZES = {"digits": [64, 64, 10], "mnist": [784, 256, 256, 10]}
INPUT_SHAPES = {"digits": [64], "mnist": [784]}
ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "digits-lora-base.npz"
BASE_FILE = "lora_base.npz"
PRETRAIN = {"digits": {"epochs": 30, "lr": 3e-3}, "mnist": {"epochs": 15, "lr": 1e-3}}
DEFAULT_RANK = 4
DEFAULT_ALPHA = 8.0  # s = alpha / r = 2 at r = 4 (re-implementations use alpha 8 or 32)
_BASES: dict[str, dict[str, np.ndarray]] = {}


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out)
        if i < len(sizes) - 2:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(layers)


def pretraining_data(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The data a base is pre-trained on (never part of a federated job's train or test sets)."""
    if dataset == "digits":
        from fedfleet.models import backbone

        d = backbone.mnist_8x8_uci()
        return d.x, d.y
    from fedfleet.models import shifts

    d = shifts.lora_pool("mnist", "pretrain")
    return d.x, d.y


def pretrain(dataset: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Central pre-training of the base MLP; float32 tensors named as `fedfleet.edge_agent.nn.mlp.layout`."""
    from fedfleet.models.train import fit

    if dataset not in SIZES:
        raise ConfigError(f"no LoRA base for dataset {dataset!r}; choose one of {sorted(SIZES)}")
    x, y = pretraining_data(dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = fit(_mlp(SIZES[dataset]), x, y, batch_size=64, seed=seed, **PRETRAIN[dataset])
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def base(dataset: str) -> dict[str, np.ndarray]:
    """The frozen base for `dataset`: the shipped artifact for digits, else pre-trained once per process."""
    if dataset not in _BASES:
        if dataset == "digits" and ARTIFACT.exists():
            with np.load(ARTIFACT, allow_pickle=False) as f:
                _BASES[dataset] = {k: f[k].astype(np.float32) for k in f.files}
        else:
            _BASES[dataset] = pretrain(dataset)
    return _BASES[dataset]


def _npz(tensors: dict[str, np.ndarray]) -> bytes:
    from fedfleet.models._zip import npz as stored_npz

    return stored_npz(tensors)


def build_lora_package(dataset: str = "digits", *, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
                       seed: int = 0) -> bytes:
    """A deterministic `lora` package blob for `dataset` (see the module docstring)."""
    from fedfleet.models._zip import write_zip

    if dataset not in SIZES:
        raise ConfigError(f"no LoRA base for dataset {dataset!r}; choose one of {sorted(SIZES)}")
    sizes = SIZES[dataset]
    adapted = list(range(len(sizes) - 2))
    if not 1 <= rank <= min(min(sizes[i], sizes[i + 1]) for i in adapted):
        raise ConfigError(f"lora rank must be between 1 and the narrowest adapted layer of {sizes}, got {rank}")
    weights = base(dataset)
    base_bytes = _npz(weights)
    rng = np.random.Generator(np.random.PCG64(seed))
    init: dict[str, np.ndarray] = {}
    for i in adapted:
        init[f"fc{i}.lora_A"] = lora_mlp.init_a(rank, sizes[i], rng)
        init[f"fc{i}.lora_B"] = np.zeros((sizes[i + 1], rank), np.float32)
    head = len(sizes) - 2
    init[f"fc{head}.weight"] = weights[f"fc{head}.weight"].copy()
    init[f"fc{head}.bias"] = weights[f"fc{head}.bias"].copy()
    layout = lora_mlp.trainable_layout(sizes, adapted, rank)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": f"{dataset}-lora", "mode": "lora",
        "dataset": dataset, "input_shape": INPUT_SHAPES[dataset], "feature_dim": sizes[0], "head_sizes": sizes,
        "head_layout": [[n, list(s)] for n, s in layout], "classes": list(range(sizes[-1])),
        "lora": {"rank": rank, "alpha": float(alpha), "adapted": adapted,
                 "base": {"file": BASE_FILE, "sha256": hashlib.sha256(base_bytes).hexdigest(),
                          "layout": [[n, list(s)] for n, s in mlp.layout(sizes)],
                          "pretrained_on": "mnist5k 8x8 (UCI-style)" if dataset == "digits"
                          else "mnist5k pre-training half"}},
    }
    return write_zip({MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode(), BASE_FILE: base_bytes,
                      HEAD_INIT: _npz(init)})


def write_artifact(path: Path = ARTIFACT, seed: int = 0) -> str:
    """Pre-train the digits base and write it as the shipped npz; returns its sha256."""
    weights = pretrain("digits", seed)
    buf = io.BytesIO()
    np.savez(buf, **weights)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="rebuild the shipped digits LoRA base (64-64-10)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps({"artifact": ARTIFACT.name, "sha256": write_artifact(seed=args.seed)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
