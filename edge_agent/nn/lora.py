"""LoRA on a frozen numpy MLP: the `lora` package section, the trainable layout, forward and backward.

A `lora` model package holds a frozen base MLP (`fc{i}.weight` (out, in), `fc{i}.bias`, ReLU between layers,
as `fedfleet.edge_agent.nn.mlp`) and trains, per adapted hidden layer i, the factors `fc{i}.lora_A` (r, d_in) and
`fc{i}.lora_B` (d_out, r), plus the last layer (the head, `fc{L-1}.weight`, `fc{L-1}.bias`), plain. An adapted
layer computes

    z = x W0ᵀ + b0 + s · ((x Aᵀ) Bᵀ [+ x Mᵀ])        s = alpha / r

where M, `fc{i}.merged` (d_out, d_in), is optional: the sum of B·A products a re-initialising baseline (FLoRA)
has merged into the layer so far (in the units of B·A, so the scale s applies to it as to the adapters); it is
sent down with the task and never trained. With δ = ∂L/∂z the
gradients are G_B = s · δᵀ (x Aᵀ) and G_A = s · Bᵀ δᵀ x (the spec's G_B = s·δ(Ax)ᵀ, G_A = s·Bᵀδxᵀ for
column vectors). The base never changes.

The manifest's `lora` section: {"rank", "alpha", "adapted": [i, ...], "base": {"file", "sha256"}}; the base
file is an npz of float32 tensors named as `fedfleet.edge_agent.nn.mlp.layout(head_sizes)`. `read_base` checks its sha256
against the manifest before anything else. Pure numpy: this module never imports torch.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.nn import mlp

Params = dict[str, np.ndarray]
Layout = list[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class LoraBase:
    """The frozen base of a `lora` package and its adapter configuration."""

    sizes: list[int]  # layer widths, input first, classes last
    weights: Params  # frozen fc{i}.weight / fc{i}.bias, float32
    adapted: tuple[int, ...]  # indices of the layers that carry adapters (hidden layers)
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def head(self) -> int:
        return len(self.sizes) - 2


def trainable_layout(sizes: list[int], adapted: tuple[int, ...] | list[int], rank: int) -> Layout:
    """The tensors a `lora` package trains: A and B per adapted layer, then the head's weight and bias."""
    out: Layout = []
    for i in adapted:
        out.append((f"fc{i}.lora_A", (rank, sizes[i])))
        out.append((f"fc{i}.lora_B", (sizes[i + 1], rank)))
    head = len(sizes) - 2
    out += [(f"fc{head}.weight", (sizes[head + 1], sizes[head])), (f"fc{head}.bias", (sizes[head + 1],))]
    return out


def init_a(rank: int, d_in: int, rng: np.random.Generator) -> np.ndarray:
    """A fresh A: U(±1/√d_in), the kaiming-uniform(a=√5) default of common LoRA code; B starts at zero."""
    bound = 1.0 / np.sqrt(d_in)
    return rng.uniform(-bound, bound, (rank, d_in)).astype(np.float32)


def _npz_tensors(raw: bytes, what: str, max_bytes: int) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
        if sum(i.file_size for i in zf.infolist()) > max_bytes:
            raise ModelError(f"{what} declares more than {max_bytes} bytes; refusing a possible zip bomb")
        out = {}
        for name in zf.namelist():
            arr = np.load(io.BytesIO(zf.read(name)), allow_pickle=False)
            out[name.removesuffix(".npy")] = arr
        return out
    except ModelError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise a zoo of types for bad bytes
        raise ModelError(f"{what} is unreadable ({type(exc).__name__}: {exc}); rebuild the package") from exc


def _int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"manifest lora.{key} must be a positive integer, got {value!r}")
    return int(value)


def read_base(zf: zipfile.ZipFile, manifest: dict[str, Any], sizes: list[int], max_bytes: int) -> tuple[LoraBase, str]:
    """The frozen base named by the manifest's `lora` section, after its digest and shapes check out.

    Returns (base, the base file's member name). Raises ModelError saying what is wrong.
    """
    spec = manifest.get("lora")
    if not isinstance(spec, dict):
        raise ModelError("package mode 'lora' needs a 'lora' object in its manifest; rebuild the package")
    rank = _int(spec.get("rank"), "rank")
    alpha = spec.get("alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha) or alpha <= 0:
        raise ModelError(f"manifest lora.alpha must be a positive number, got {alpha!r}")
    adapted = spec.get("adapted")
    if (not isinstance(adapted, list) or not adapted
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(sizes) - 2 for i in adapted)
            or sorted(set(adapted)) != adapted):
        raise ModelError(f"manifest lora.adapted must be increasing hidden-layer indices < {len(sizes) - 2}, "
                         f"got {adapted!r}")
    if rank > min(min(sizes[i], sizes[i + 1]) for i in adapted):
        raise ModelError(f"lora rank {rank} exceeds the width of an adapted layer of {sizes}")
    base_spec = spec.get("base")
    if not isinstance(base_spec, dict) or not all(isinstance(base_spec.get(k), str) for k in ("file", "sha256")):
        raise ModelError("manifest lora.base must be {file, sha256}; rebuild the package")
    name = base_spec["file"]
    if name not in zf.namelist():
        raise ModelError(f"the manifest names the LoRA base {name!r} but the package lacks it")
    with zf.open(name) as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ModelError(f"LoRA base {name!r} inflates past {max_bytes} bytes; refusing a possible zip bomb")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != base_spec["sha256"]:
        raise ModelError(f"the frozen LoRA base {name!r} does not match its sha256 in the manifest "
                         f"({digest[:12]}... vs {base_spec['sha256'][:12]}...): corrupt or altered package")
    tensors = _npz_tensors(raw, name, max_bytes)
    want = dict(mlp.layout(sizes))
    if set(tensors) != set(want):
        raise ModelError(f"LoRA base holds {sorted(tensors)}, the layer widths {sizes} need {sorted(want)}")
    weights: Params = {}
    for key, shape in want.items():
        arr = tensors[key]
        if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise ModelError(f"LoRA base tensor {key!r} must be finite floats of shape {shape}, "
                             f"got {arr.dtype} {arr.shape}")
        weights[key] = arr.astype(np.float32)
    return LoraBase(list(sizes), weights, tuple(adapted), rank, float(alpha)), name


def _layer(base: LoraBase, params: Params, i: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(pre-activation of layer i, x Aᵀ or None)."""
    if i == base.head:
        return h @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"], None
    z = h @ base.weights[f"fc{i}.weight"].T + base.weights[f"fc{i}.bias"]
    merged = params.get(f"fc{i}.merged")
    if merged is not None:
        z = z + base.scale * (h @ merged.T)
    if i not in base.adapted:
        return z, None
    ax = h @ params[f"fc{i}.lora_A"].T
    return z + base.scale * (ax @ params[f"fc{i}.lora_B"].T), ax


def _floats(x: np.ndarray) -> np.ndarray:
    """float32 input (float64 stays float64, for gradient checks)."""
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32, copy=False)


def forward(base: LoraBase, params: Params, x: np.ndarray) -> np.ndarray:
    """Logits (N, classes) of the base plus adapters `params` (trainable layout, optional merged residuals)."""
    h = _floats(x)
    for i in range(base.head + 1):
        h, _ = _layer(base, params, i, h)
        if i < base.head:
            h = np.maximum(h, 0.0)
    return h


def loss_and_grad(base: LoraBase, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    """Mean softmax cross-entropy and its gradient for every trainable tensor (A, B, head); base frozen."""
    acts, axs = [_floats(x)], []
    h = acts[0]
    for i in range(base.head + 1):
        h, ax = _layer(base, params, i, h)
        axs.append(ax)
        if i < base.head:
            h = np.maximum(h, 0.0)
        acts.append(h)
    p = mlp.softmax(acts[-1])
    m = len(y)
    value = float(-np.log(p[np.arange(m), y] + 1e-12).mean())
    delta = p
    delta[np.arange(m), y] -= 1.0
    delta /= m
    grads: Params = {}
    s = base.scale
    for i in range(base.head, -1, -1):
        inp = acts[i]
        if i == base.head:
            grads[f"fc{i}.weight"] = (delta.T @ inp).astype(np.float32)
            grads[f"fc{i}.bias"] = delta.sum(axis=0).astype(np.float32)
            w_eff = params[f"fc{i}.weight"]
        else:
            w_eff = base.weights[f"fc{i}.weight"]
            if f"fc{i}.merged" in params:
                w_eff = w_eff + s * params[f"fc{i}.merged"]
            if i in base.adapted:
                a, b, ax = params[f"fc{i}.lora_A"], params[f"fc{i}.lora_B"], axs[i]
                grads[f"fc{i}.lora_B"] = (s * (delta.T @ ax)).astype(np.float32)  # s·δ(Ax)ᵀ
                grads[f"fc{i}.lora_A"] = (s * (b.T @ (delta.T @ inp))).astype(np.float32)  # s·Bᵀδxᵀ
                w_eff = w_eff + s * (b @ a)
        if i > 0:
            delta = (delta @ w_eff) * (acts[i] > 0)
    return value, grads


def accuracy(base: LoraBase, params: Params, x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(base, params, x).argmax(axis=1) == y).mean()) if len(y) else 0.0
