"""Reading a model package safely, before anything runs: zip guards, the manifest as a typed `Manifest`, one
check per package mode, member bytes against their sha256, and the head tensors against the layout.

`fedfleet.edge_agent.model.EdgeModel.from_bytes` composes these; every problem is a one-line ModelError saying
what and why. The package format itself is described in `fedfleet.edge_agent.model`'s docstring.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ModelError
from fedfleet.edge_agent.nn import lora as lora_mlp
from fedfleet.edge_agent.nn import mlp
from fedfleet.edge_agent.runtime.onnx_scan import external_tensors

FORMAT = "fedfleet-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEAD_INIT = "head_init.npz"
MODES = ("transfer", "full", "lora", "diffusion")
MAX_MANIFEST_BYTES = 64 << 10
FORMAT_RUNTIME = {
    "onnx": "onnxruntime",
    "tflite": "litert",
}  # backbone file format -> the runtime that runs it


def read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
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


def check_declared_sizes(zf: zipfile.ZipFile, max_bytes: int, what: str) -> None:
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


def open_zip(blob: bytes, what: str) -> zipfile.ZipFile:
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


def load_head(
    raw: bytes, layout: list[tuple[str, tuple[int, ...]]], max_bytes: int
) -> dict[str, np.ndarray]:
    npz = open_zip(raw, HEAD_INIT)
    check_declared_sizes(npz, max_bytes, HEAD_INIT)
    want = {name: shape for name, shape in layout}
    members = {n.removesuffix(".npy") for n in npz.namelist()}
    if members != set(want):
        raise ModelError(f"{HEAD_INIT} holds {sorted(members)} but the head layout names {sorted(want)}")
    head: dict[str, np.ndarray] = {}
    for name, shape in layout:
        data = read_member(npz, f"{name}.npy", max_bytes)
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


def head_graph_bytes(zf: zipfile.ZipFile, spec: Any, max_bytes: int) -> bytes:
    """The bytes of one head graph, after checking its manifest entry and its sha256."""
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in ("file", "sha256", "format")):
        raise ModelError("a manifest head_graphs entry needs file, sha256 and format strings; rebuild the package")
    if spec["format"] not in FORMAT_RUNTIME:
        raise ModelError(f"head graph format {spec['format']!r} is unknown; expected one of {list(FORMAT_RUNTIME)}")
    if spec["file"] not in zf.namelist():
        raise ModelError(f"the manifest names head graph {spec['file']!r} but the package lacks it")
    raw = read_member(zf, spec["file"], max_bytes)
    if hashlib.sha256(raw).hexdigest() != spec["sha256"]:
        raise ModelError(f"head graph {spec['file']} fails its sha256 check: the package is corrupt")
    _self_contained(raw, spec)
    return raw


def _self_contained(raw: bytes, spec: dict[str, Any]) -> None:
    """An ONNX member must hold all its tensor data (no external data files: see `runtime.onnx_scan`)."""
    if spec["format"] != "onnx":
        return
    try:
        external = external_tensors(raw)
    except ValueError:
        return  # malformed: the runtime's load says so
    if external:
        raise ModelError(f"package member {spec['file']!r} keeps tensor data outside the package (external data: "
                         f"{', '.join(external[:5])}); packages must be self-contained: rebuild it")


def backbone_bytes(zf: zipfile.ZipFile, spec: Any, max_bytes: int) -> bytes:
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
    raw = read_member(zf, spec["file"], max_bytes)
    if hashlib.sha256(raw).hexdigest() != spec["sha256"]:
        raise ModelError(
            f"backbone {spec['file']!r} does not match its sha256 in the manifest: corrupt package"
        )
    _self_contained(raw, spec)
    return raw



@dataclass(frozen=True)
class Manifest:
    """The manifest's fields every mode has, checked for type and shape (`raw`: the whole JSON object)."""

    raw: dict[str, Any]
    mode: str
    input_shape: tuple[int, ...]
    feature_dim: int
    head_sizes: list[int]
    head_layout: list[tuple[str, tuple[int, ...]]]
    classes: list[Any]


def read_manifest(zf: zipfile.ZipFile) -> Manifest:
    """The package's manifest, with its format, mode and shapes checked."""
    names = set(zf.namelist())
    if MANIFEST not in names:
        raise ModelError(f"model package has no {MANIFEST}; members are {sorted(names)}")
    try:
        manifest = json.loads(read_member(zf, MANIFEST, MAX_MANIFEST_BYTES))
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
    return Manifest(manifest, mode, input_shape, feature_dim, head_sizes, head_layout, [])


def check_mode(m: Manifest, zf: zipfile.ZipFile, max_bytes: int) -> tuple[Manifest, lora_mlp.LoraBase | None,
                                                                              str | None]:
    """The mode's own checks of the layout, the classes and the widths: (manifest with its classes, the LoRA
    base and its file for mode "lora", else None, None)."""
    base: lora_mlp.LoraBase | None = None
    base_file = None
    if m.mode == "lora":
        base, base_file = lora_mlp.read_base(zf, m.raw, m.head_sizes, max_bytes)
        want_layout = lora_mlp.trainable_layout(m.head_sizes, base.adapted, base.rank)
        if m.head_layout != want_layout:
            raise ModelError(f"head_layout {m.head_layout} is not the LoRA trainable layout {want_layout}; "
                             "rebuild the package")
    elif m.mode != "diffusion" and m.head_layout != mlp.layout(m.head_sizes):
        raise ModelError(
            f"head_layout {m.head_layout} is inconsistent with head_sizes {m.head_sizes} "
            f"(expected {mlp.layout(m.head_sizes)}); rebuild the package"
        )
    classes = _field(m.raw, "classes", list)
    if m.mode == "diffusion":  # the denoiser's input is the clip plus time and condition features
        from fedfleet.edge_agent.nn import diffusion_spec

        diffusion_spec.check(m.raw, m.head_sizes, m.input_shape, m.feature_dim, m.head_layout)
    elif m.head_sizes[0] != m.feature_dim:
        raise ModelError(f"head input width {m.head_sizes[0]} differs from feature_dim {m.feature_dim}")
    elif len(classes) != m.head_sizes[-1]:
        raise ModelError(f"{len(classes)} classes but the head has {m.head_sizes[-1]} outputs")
    return Manifest(m.raw, m.mode, m.input_shape, m.feature_dim, m.head_sizes, m.head_layout, classes), base, base_file
