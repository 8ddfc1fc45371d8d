"""Model packages built once per machine: a cache of `fedfleet.models.package.build_package` blobs on disk.

Building a package is deterministic, but it imports onnx (for the head graph) and the TFLite schema and
flatbuffers (for the TFLite head): about 15 MiB and 0.05-0.1 s in every `fedfleet demo` or `serve` process,
for 47 kB of bytes that are the same every time. `package(mode, ...)` returns the cached blob when one was
built from the same inputs, else builds it and keeps it.

The cache key is the SHA-256 of everything the bytes depend on: the arguments, the shipped backbone
artifacts, the source of the modules that write a package, and the installed copies of the libraries that
serialise it (onnx, flatbuffers, ai_edge_litert, numpy: the path, size and modification time of each one's
`__init__.py`, found without importing it; reading their versions from package metadata would cost a
scan of every installed distribution, 0.25 s here). A changed input is a new key, never a stale blob.
Files are written atomically (temporary file, then rename) and named by their key; a blob that reads back
as something else than a package (checked by the coordinator's load, `EdgeModel.from_bytes`) is the
caller's cue to `package(..., refresh=True)`.

Where: `$FEDFLEET_CACHE_DIR`, else `$XDG_CACHE_HOME/fedfleet`, else `~/.cache/fedfleet`, under `packages/`.
It keeps the newest 32 packages. An unwritable cache directory only means no caching.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

# the modules whose code decides a package's bytes (relative to the repository root)
SOURCES = ("models/package.py", "models/head_graph.py", "models/tflite_writer.py", "models/tflite_graph.py",
           "models/tflite_schema.py", "models/backbone.py", "edge_agent/nn/mlp.py", "edge_agent/model.py",
           "edge_agent/package_reader.py", "models/package_cache.py")
LIBRARIES = ("onnx", "flatbuffers", "ai_edge_litert", "numpy")
KEEP = 32  # newest cached packages kept; older ones are removed when a new one is stored
_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    base = os.environ.get("FEDFLEET_CACHE_DIR")
    if base:
        return Path(base) / "packages"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedfleet" / "packages"


def _installed(name: str) -> str:
    """Which copy of library `name` is installed: its `__init__.py`'s path, size and mtime (not imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return "absent"
    st = os.stat(spec.origin)
    return f"{spec.origin}:{st.st_size}:{st.st_mtime_ns}"


def cache_key(mode: str, *, head_hidden: int, seed: int, dataset: str, head_layers: int) -> str:
    """SHA-256 (hex) of every input of `build_package(mode, ...)` with the default backbone alternates."""
    from fedfleet.models import backbone

    h = hashlib.sha256()
    h.update(json.dumps({"mode": mode, "head_hidden": head_hidden, "seed": seed, "dataset": dataset,
                         "head_layers": head_layers, "libraries": {n: _installed(n) for n in LIBRARIES}},
                        sort_keys=True).encode())
    for rel in SOURCES:
        h.update(rel.encode() + b"\0" + (_ROOT / rel).read_bytes())
    if mode == "transfer":
        h.update(backbone.load() + backbone.load_tflite())
    return h.hexdigest()


def package(mode: str = "transfer", *, head_hidden: int = 32, seed: int = 0, dataset: str = "digits",
            head_layers: int = 1, refresh: bool = False) -> bytes:
    """`build_package(mode, head_hidden=..., seed=..., dataset=..., head_layers=...)`, from the cache when
    it holds the same build (`refresh`: build anew and replace the cached copy)."""
    from fedfleet.models.package import build_package

    try:
        key = cache_key(mode, head_hidden=head_hidden, seed=seed, dataset=dataset, head_layers=head_layers)
    except OSError:  # a builder's source is not on disk (an install without sources): no cache
        return build_package(mode, head_hidden=head_hidden, seed=seed, dataset=dataset, head_layers=head_layers)
    path = cache_dir() / f"{key}.zip"
    if not refresh:
        try:
            return path.read_bytes()
        except OSError:
            pass
    blob = build_package(mode, head_hidden=head_hidden, seed=seed, dataset=dataset, head_layers=head_layers)
    _store(path, blob)
    return blob


def _store(path: Path, blob: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".zip")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        by_age = sorted(path.parent.glob("*.zip"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in by_age[KEEP:]:  # builds of older code or other arguments
            old.unlink(missing_ok=True)
    except OSError:
        pass  # no cache then; the blob is still returned
