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

`EdgeModel.from_bytes` checks everything before use: overall and declared member sizes (zip-bomb guard,
before anything is decompressed), member names, manifest fields, backbone digest, backbone input and
output shapes, and the head tensors against the layout. Any problem is a ModelError saying what and why.
This module never imports torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.nn import lora as lora_mlp
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.runtime import Runner, open_runner
from fedfleet.edge_agent.wire import protocol

FORMAT = "fedfleet-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEAD_INIT = "head_init.npz"
MODES = ("transfer", "full", "lora", "diffusion")
BATCH = 256
MAX_MANIFEST_BYTES = 64 << 10
FORMAT_RUNTIME = {
    "onnx": "onnxruntime",
    "tflite": "litert",
}  # backbone file format -> the runtime that runs it


def _read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """Read one member, refusing to inflate more than `limit` bytes even if its header lies."""
    try:
        with zf.open(name) as fh:
            data = fh.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise ModelError(
            f"package member {name!r} is corrupt or truncated ({exc}); rebuild the package"
        ) from exc
    except Exception as exc:  # zlib.error and friends
        raise ModelError(
            f"package member {name!r} cannot be decompressed ({exc}); rebuild the package"
        ) from exc
    if len(data) > limit:
        raise ModelError(f"package member {name!r} inflates past {limit} bytes; refusing a possible zip bomb")
    return data


def _check_declared_sizes(zf: zipfile.ZipFile, max_bytes: int, what: str) -> None:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise ModelError(f"{what} has duplicate member names {sorted(names)}; rebuild it")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise ModelError(
            f"{what} declares {total} bytes uncompressed, over the {max_bytes}-byte cap; "
            "refusing a possible zip bomb (raise max_bytes only for a trusted package)"
        )


def _open_zip(blob: bytes, what: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(blob))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ModelError(
            f"{what} is not a readable zip ({exc}): corrupt or truncated; download it again"
        ) from exc


def _field(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in manifest:
        raise ModelError(f"package manifest has no {key!r} field; rebuild the package")
    value = manifest[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ModelError(f"package manifest field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _int_list(value: list[Any], key: str) -> list[int]:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ModelError(f"package manifest field {key!r} must be a list of positive integers, got {value!r}")
    return [int(v) for v in value]


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11's AST constructor keeps its recursion
# depth in interpreter-wide state: two threads parsing at once can fail with "AST constructor recursion depth
# mismatch" (CPython gh-106905). Seen here when 20 in-process agents loaded one package together; one lock
# makes the loads take turns (they are small). It is the interpreter's, so it is the only one: every
# `fedfleet.edge_agent.host.Host` hands out this lock as its `load_lock`, and an agent holds it (reentrant)
# while it loads a whole package.
LOAD_LOCK = threading.RLock()


def load_npy(data: bytes) -> np.ndarray:
    """One .npy array from bytes (no pickles), safe to call from many threads at once."""
    with LOAD_LOCK:
        return np.load(io.BytesIO(data), allow_pickle=False)


def _load_head(
    raw: bytes, layout: list[tuple[str, tuple[int, ...]]], max_bytes: int
) -> dict[str, np.ndarray]:
    npz = _open_zip(raw, HEAD_INIT)
    _check_declared_sizes(npz, max_bytes, HEAD_INIT)
    want = {name: shape for name, shape in layout}
    members = {n.removesuffix(".npy") for n in npz.namelist()}
    if members != set(want):
        raise ModelError(f"{HEAD_INIT} holds {sorted(members)} but the head layout names {sorted(want)}")
    head: dict[str, np.ndarray] = {}
    for name, shape in layout:
        data = _read_member(npz, f"{name}.npy", max_bytes)
        try:
            arr = load_npy(data)
        except Exception as exc:  # numpy raises ValueError/OSError/EOFError for bad .npy bytes
            raise ModelError(f"{HEAD_INIT}: tensor {name!r} is unreadable ({exc})") from exc
        if arr.shape != shape:
            raise ModelError(
                f"{HEAD_INIT}: tensor {name!r} has shape {arr.shape}, the head layout says {shape}"
            )
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise ModelError(f"{HEAD_INIT}: tensor {name!r} must be finite floats, got {arr.dtype}")
        head[name] = arr.astype(np.float32)
    return head


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
        zf = _open_zip(blob, "model package")
        _check_declared_sizes(zf, max_bytes, "model package")
        names = set(zf.namelist())
        if MANIFEST not in names:
            raise ModelError(f"model package has no {MANIFEST}; members are {sorted(names)}")
        try:
            manifest = json.loads(_read_member(zf, MANIFEST, MAX_MANIFEST_BYTES))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{MANIFEST} is not valid JSON ({exc}); rebuild the package") from exc
        if not isinstance(manifest, dict):
            raise ModelError(f"{MANIFEST} must be a JSON object")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ModelError(
                f"package format {manifest.get('format')!r} v{manifest.get('format_version')!r} is not "
                f"{FORMAT!r} v{FORMAT_VERSION}; upgrade fedfleet or rebuild the package"
            )
        mode = _field(manifest, "mode", str)
        if mode not in MODES:
            raise ModelError(f"package mode {mode!r} is not one of {MODES}")
        input_shape = tuple(_int_list(_field(manifest, "input_shape", list), "input_shape"))
        feature_dim = _field(manifest, "feature_dim", int)
        head_sizes = _int_list(_field(manifest, "head_sizes", list), "head_sizes")
        if len(head_sizes) < 2:
            raise ModelError(f"head_sizes {head_sizes} needs at least an input and an output width")
        raw_layout = _field(manifest, "head_layout", list)
        try:
            head_layout = [(str(n), tuple(int(d) for d in s)) for n, s in raw_layout]
        except (TypeError, ValueError) as exc:
            raise ModelError(f"head_layout must be [[name, shape], ...] ({exc})") from exc
        base: lora_mlp.LoraBase | None = None
        base_file = None
        if mode == "lora":
            base, base_file = lora_mlp.read_base(zf, manifest, head_sizes, max_bytes)
            want_layout = lora_mlp.trainable_layout(head_sizes, base.adapted, base.rank)
            if head_layout != want_layout:
                raise ModelError(f"head_layout {head_layout} is not the LoRA trainable layout {want_layout}; "
                                 "rebuild the package")
        elif head_layout != mlp.layout(head_sizes):
            raise ModelError(
                f"head_layout {head_layout} is inconsistent with head_sizes {head_sizes} "
                f"(expected {mlp.layout(head_sizes)}); rebuild the package"
            )
        classes = _field(manifest, "classes", list)
        if mode == "diffusion":  # the denoiser's input is the clip plus time and condition features
            from fedfleet.edge_agent.nn import diffusion_spec

            diffusion_spec.check(manifest, head_sizes, input_shape, feature_dim)
        elif head_sizes[0] != feature_dim:
            raise ModelError(f"head input width {head_sizes[0]} differs from feature_dim {feature_dim}")
        elif len(classes) != head_sizes[-1]:
            raise ModelError(f"{len(classes)} classes but the head has {head_sizes[-1]} outputs")
        expected = {MANIFEST, HEAD_INIT} | ({base_file} if base_file else set())
        backbone: Runner | None = None
        backbone_spec: dict[str, Any] | None = None
        if mode == "transfer":
            specs = [_field(manifest, "backbone", dict), *manifest.get("backbone_alternates", [])]
            raws = [_backbone_bytes(zf, spec, max_bytes) for spec in specs]  # every file checked, used or not
            expected.update(spec["file"] for spec in specs)
            chosen = [i for i, spec in enumerate(specs) if FORMAT_RUNTIME.get(spec["format"]) == runtime]
            if not chosen:
                formats = [spec["format"] for spec in specs]
                raise ModelError(
                    f"this package has backbones in formats {formats}, none runs on runtime {runtime!r}; "
                    f"pick --runtime {FORMAT_RUNTIME.get(formats[0], 'onnxruntime')} or a package for {runtime}"
                )
            backbone_spec = specs[chosen[0]]
            backbone = _open_backbone(
                raws[chosen[0]], backbone_spec, input_shape, feature_dim, runtime, threads
            )
        elif int(np.prod(input_shape)) != feature_dim:
            raise ModelError(
                f"{mode} mode needs feature_dim == prod(input_shape), got {feature_dim} vs {input_shape}"
            )
        head_runner = None
        for spec in manifest.get("head_graphs", []):
            raw = _head_graph_bytes(zf, spec, max_bytes)
            expected.add(spec["file"])
            if FORMAT_RUNTIME.get(spec["format"]) == runtime and head_runner is None:
                head_runner = open_runner(raw, runtime=runtime, threads=threads)
                want = ["features", *(n for n, _ in head_layout)]
                if sorted(head_runner.input_names) != sorted(want):
                    raise ModelError(f"head graph {spec['file']} has inputs {head_runner.input_names}, "
                                     f"expected {want}; rebuild the package")
        if names != expected:
            raise ModelError(
                f"model package members {sorted(names)} differ from the expected {sorted(expected)}"
            )
        if HEAD_INIT not in names:
            raise ModelError(f"model package has no {HEAD_INIT}")
        head_init = _load_head(_read_member(zf, HEAD_INIT, max_bytes), head_layout, max_bytes)
        return cls(
            manifest,
            mode,
            input_shape,
            feature_dim,
            head_sizes,
            head_layout,
            head_init,
            digest,
            backbone,
            backbone_spec,
            head_runner,
            base,
        )

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


def _head_graph_bytes(zf: zipfile.ZipFile, spec: Any, max_bytes: int) -> bytes:
    """The bytes of one head graph, after checking its manifest entry and its sha256."""
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in ("file", "sha256", "format")):
        raise ModelError("a manifest head_graphs entry needs file, sha256 and format strings; rebuild the package")
    if spec["format"] not in FORMAT_RUNTIME:
        raise ModelError(f"head graph format {spec['format']!r} is unknown; expected one of {list(FORMAT_RUNTIME)}")
    if spec["file"] not in zf.namelist():
        raise ModelError(f"the manifest names head graph {spec['file']!r} but the package lacks it")
    raw = _read_member(zf, spec["file"], max_bytes)
    if hashlib.sha256(raw).hexdigest() != spec["sha256"]:
        raise ModelError(f"head graph {spec['file']} fails its sha256 check: the package is corrupt")
    return raw


def _backbone_bytes(zf: zipfile.ZipFile, spec: Any, max_bytes: int) -> bytes:
    """The bytes of one backbone file, after checking its manifest entry and its sha256."""
    if not isinstance(spec, dict):
        raise ModelError("a manifest backbone entry must be an object; rebuild the package")
    for key in ("file", "sha256", "format", "input", "output"):
        if not isinstance(spec.get(key), str):
            raise ModelError(f"manifest backbone.{key} is missing or not a string; rebuild the package")
    if spec["format"] not in FORMAT_RUNTIME:
        raise ModelError(
            f"backbone format {spec['format']!r} is unknown; expected one of {list(FORMAT_RUNTIME)}"
        )
    if spec["file"] not in zf.namelist():
        raise ModelError(f"backbone file {spec['file']!r} named in the manifest is not in the package")
    raw = _read_member(zf, spec["file"], max_bytes)
    if hashlib.sha256(raw).hexdigest() != spec["sha256"]:
        raise ModelError(
            f"backbone {spec['file']!r} does not match its sha256 in the manifest: corrupt package"
        )
    return raw


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
