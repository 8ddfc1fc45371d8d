"""Model packages on the edge: load, validate, and run a frozen backbone plus a numpy MLP head.

A package is one zip blob (written by `fedfleet.models.package.build_package`) holding:
- `manifest.json`: format, format_version, name, mode ("transfer" or "full"), input_shape, feature_dim,
  head_sizes, head_layout ([[name, shape], ...] exactly as `fedfleet.edge_agent.nn.mlp.layout(head_sizes)`), classes,
  and in transfer mode `backbone` = {file, sha256, format "onnx", input, output};
  optionally `backbone_alternates`: more entries of the same form in other formats (e.g. "tflite"), so one
  package runs on either runtime; the loader picks the entry whose format matches the runtime;
- the backbone file(s) (transfer mode only), int8 feature extractors;
- `head_init.npz`: the initial head tensors, float32, named as in the layout.
Mode "lora" (see `fedfleet.edge_agent.nn.lora`): no backbone; `head_sizes` are the widths of a frozen base MLP shipped as
an npz whose sha256 the manifest's `lora` section carries; `head_layout` and `head_init.npz` are the trainable
tensors (LoRA A and B per adapted layer, and the head).
Mode "diffusion" (see `fedfleet.edge_agent.nn.diffusion_spec`): no backbone; the layout is the whole conditional video
denoiser, and the manifest's `objective` and `diffusion` table say what it is and how it trains.

`EdgeModel.from_bytes` checks everything before use (the checks are in `fedfleet.edge_agent.package_reader`): overall and declared member sizes (zip-bomb guard,
before anything is decompressed), member names, manifest fields, backbone digest, backbone input and
output shapes, and the head tensors against the layout. Any problem is a ModelError saying what and why.
This module never imports torch.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.nn import lora as lora_mlp
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.package_reader import (  # re-exported: the package format's names
    FORMAT,
    FORMAT_RUNTIME,
    FORMAT_VERSION,
    HEAD_INIT,
    LOAD_LOCK,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MODES,
    Manifest,
    _field,
    backbone_bytes,
    check_declared_sizes,
    check_mode,
    head_graph_bytes,
    load_head,
    load_npy,
    open_zip,
    read_manifest,
    read_member,
)
from fedfleet.edge_agent.runtime import Runner, open_runner
from fedfleet.edge_agent.wire import protocol

__all__ = ["BATCH", "FORMAT", "FORMAT_RUNTIME", "FORMAT_VERSION", "HEAD_INIT", "LOAD_LOCK", "MANIFEST",
           "MAX_MANIFEST_BYTES", "MODES", "EdgeModel", "load_npy"]

BATCH = 256


@dataclass
class EdgeModel:
    manifest: dict[str, Any]
    mode: str
    input_shape: tuple[int, ...]
    feature_dim: int
    head_sizes: list[int]
    head_layout: list[tuple[str, tuple[int, ...]]]
    head_init: dict[str, np.ndarray]
    digest: str
    backbone: Runner | None = None
    backbone_spec: dict[str, Any] | None = None  # the manifest entry of the backbone in use
    head_runner: Runner | None = None  # the head with its tensors as graph inputs, on this runtime
    lora: lora_mlp.LoraBase | None = None  # mode "lora": the frozen base MLP and the adapter configuration
    head_on_features = True  # head_logits takes backbone features (computed once, cached), not raw input
    _cache: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_bytes(
        cls,
        blob: bytes,
        *,
        runtime: str = "onnxruntime",
        threads: int = 1,
        max_bytes: int = 64 << 20,
        expected_digest: str | None = None,
    ) -> EdgeModel:
        """Load and validate a package blob. Raises ModelError for anything wrong with it."""
        if not isinstance(blob, (bytes, bytearray)):
            raise ModelError(f"a model package must be bytes, got {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) > max_bytes:
            raise ModelError(f"model package is {len(blob)} bytes, over the {max_bytes}-byte cap")
        digest = protocol.digest(blob)  # the identity the coordinator announces
        if expected_digest is not None and digest != expected_digest:
            raise ModelError(
                f"model package digest {digest[:16]}... does not match the announced {expected_digest[:16]}...; "
                "the download is corrupt or stale: fetch it again"
            )
        zf = open_zip(blob, "model package")
        check_declared_sizes(zf, max_bytes, "model package")
        names = set(zf.namelist())
        m, base, base_file = check_mode(read_manifest(zf), zf, max_bytes)
        expected = {MANIFEST, HEAD_INIT} | ({base_file} if base_file else set())
        backbone, backbone_spec = cls._backbone(zf, m, runtime, threads, max_bytes, expected)
        head_runner = cls._head_runner(zf, m, runtime, threads, max_bytes, expected)
        if names != expected:
            raise ModelError(
                f"model package members {sorted(names)} differ from the expected {sorted(expected)}"
            )
        if HEAD_INIT not in names:
            raise ModelError(f"model package has no {HEAD_INIT}")
        head_init = load_head(read_member(zf, HEAD_INIT, max_bytes), m.head_layout, max_bytes)
        return cls(m.raw, m.mode, m.input_shape, m.feature_dim, m.head_sizes, m.head_layout, head_init, digest,
                   backbone, backbone_spec, head_runner, base)

    @staticmethod
    def _backbone(zf: zipfile.ZipFile, m: Manifest, runtime: str, threads: int, max_bytes: int,
                  expected: set[str]) -> tuple[Runner | None, dict[str, Any] | None]:
        """Mode "transfer": every backbone file checked, the one for `runtime` opened (its names added to
        `expected`); other modes have none, and their features are the raw input."""
        if m.mode != "transfer":
            if int(np.prod(m.input_shape)) != m.feature_dim:
                raise ModelError(
                    f"{m.mode} mode needs feature_dim == prod(input_shape), got {m.feature_dim} vs {m.input_shape}"
                )
            return None, None
        specs = [_field(m.raw, "backbone", dict), *m.raw.get("backbone_alternates", [])]
        raws = [backbone_bytes(zf, spec, max_bytes) for spec in specs]  # every file checked, used or not
        expected.update(spec["file"] for spec in specs)
        chosen = [i for i, spec in enumerate(specs) if FORMAT_RUNTIME.get(spec["format"]) == runtime]
        if not chosen:
            formats = [spec["format"] for spec in specs]
            raise ModelError(
                f"this package has backbones in formats {formats}, none runs on runtime {runtime!r}; "
                f"pick --runtime {FORMAT_RUNTIME.get(formats[0], 'onnxruntime')} or a package for {runtime}"
            )
        spec = specs[chosen[0]]
        return _open_backbone(raws[chosen[0]], spec, m.input_shape, m.feature_dim, runtime, threads), spec

    @staticmethod
    def _head_runner(zf: zipfile.ZipFile, m: Manifest, runtime: str, threads: int, max_bytes: int,
                     expected: set[str]) -> Runner | None:
        """The head graph for `runtime` (every listed graph checked; their names added to `expected`)."""
        head_runner = None
        for spec in m.raw.get("head_graphs", []):
            raw = head_graph_bytes(zf, spec, max_bytes)
            expected.add(spec["file"])
            if FORMAT_RUNTIME.get(spec["format"]) == runtime and head_runner is None:
                head_runner = open_runner(raw, runtime=runtime, threads=threads)
                want = ["features", *(n for n, _ in m.head_layout)]
                if sorted(head_runner.input_names) != sorted(want):
                    raise ModelError(f"head graph {spec['file']} has inputs {head_runner.input_names}, "
                                     f"expected {want}; rebuild the package")
        return head_runner

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim < 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ModelError(f"input has shape {x.shape}, the model package expects (N, {self.input_shape})")
        return np.ascontiguousarray(x, dtype=np.float32)

    def features(self, x: np.ndarray, cache_key: str | None = None) -> np.ndarray:
        """float32 (N, feature_dim): the frozen backbone's output (identity in full mode), cached per key.

        A cache entry is reused only if the input bytes are the same as when it was filled.
        """
        x = self._check_x(x)
        if self.backbone is None:
            return x.reshape(len(x), -1)
        tag = hashlib.blake2b(x.tobytes(), digest_size=16).hexdigest() + str(x.shape) if cache_key else ""
        if cache_key is not None and cache_key in self._cache and self._cache[cache_key][0] == tag:
            return self._cache[cache_key][1]
        spec = self.backbone_spec or {}
        k = self.backbone.output_names.index(spec["output"])
        chunks = [self.backbone.run({spec["input"]: x[i : i + BATCH]})[k] for i in range(0, len(x), BATCH)]
        out = (
            np.concatenate(chunks).astype(np.float32, copy=False)
            if chunks
            else np.zeros((0, self.feature_dim), np.float32)
        )
        out = out.reshape(len(x), self.feature_dim)
        if cache_key is not None:
            self._cache[cache_key] = (tag, out)
        return out

    def head_logits(self, head: mlp.Params, features: np.ndarray) -> np.ndarray:
        """Logits from one runtime call of the head graph, the head tensors fed as graph inputs."""
        if self.head_runner is None:
            raise ModelError("this package has no head graph for this runtime; rebuild it with fedfleet >= 0.1")
        feeds = {"features": np.asarray(features, np.float32)}
        feeds.update({n: np.asarray(head[n], np.float32) for n, _ in self.head_layout})
        return self.head_runner.run(feeds)[0]

    def clear_cache(self) -> None:
        self._cache.clear()

    def logits(self, head: mlp.Params, x: np.ndarray, cache_key: str | None = None) -> np.ndarray:
        if self.lora is not None:
            return lora_mlp.forward(self.lora, head, self.features(x, cache_key))
        return mlp.forward(head, self.features(x, cache_key))

    def accuracy(self, head: mlp.Params, x: np.ndarray, y: np.ndarray, cache_key: str | None = None) -> float:
        if self.lora is not None:
            return lora_mlp.accuracy(self.lora, head, self.features(x, cache_key), np.asarray(y))
        return mlp.accuracy(head, self.features(x, cache_key), np.asarray(y))


def _open_backbone(
    raw: bytes,
    spec: dict[str, Any],
    input_shape: tuple[int, ...],
    feature_dim: int,
    runtime: str,
    threads: int,
) -> Runner:
    runner = open_runner(raw, runtime=runtime, threads=threads)
    if runner.input_names != [spec["input"]] or spec["output"] not in runner.output_names:
        raise ModelError(
            f"backbone has inputs {runner.input_names} / outputs {runner.output_names}, "
            f"the manifest says {spec['input']!r} -> {spec['output']!r}"
        )
    got = runner.input_shapes[spec["input"]][1:]
    if tuple(got) != input_shape:
        raise ModelError(f"backbone input shape {got} does not match the manifest input_shape {input_shape}")
    probe = runner.run({spec["input"]: np.zeros((1, *input_shape), np.float32)})[
        runner.output_names.index(spec["output"])
    ]
    if probe.reshape(1, -1).shape[1] != feature_dim:
        raise ModelError(
            f"backbone outputs {probe.shape[1:]} features, the manifest says feature_dim {feature_dim}"
        )
    return runner
