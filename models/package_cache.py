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
Files are written atomically (temporary file, mode 0600, then rename) and named by their key and the
SHA-256 of the bytes built (`<key>-<sha256>.zip`); a blob that reads back as something else than a package
(checked by the coordinator's load, `EdgeModel.from_bytes`) is the caller's cue to `package(..., refresh=True)`.

The coordinator signs what this cache returns and ships it to every agent, so nobody else may plant a
package in it. The cache directory is created mode 0700 (each level this module creates), and a cached
file is used only when all of these hold; otherwise the package is built again (and stored again, when the
directory can be trusted), never signed from the cache:
- the `packages/` directory is a real directory (not a symlink) owned by this user; its mode is tightened
  to 0700 if it is looser; its parent is owned by this user or root and writable by no one else (or sticky);
- the file is a regular file owned by this user, writable by no one else;
- its bytes hash to the SHA-256 recorded in its name when this cache stored it.

Where: `$FEDFLEET_CACHE_DIR`, else `$XDG_CACHE_HOME/fedfleet`, else `~/.cache/fedfleet`, under `packages/`.
It keeps the newest 32 packages. An unwritable or untrusted cache directory only means no caching.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

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
    blob = None if refresh else load(key)
    if blob is None:
        blob = build_package(mode, head_hidden=head_hidden, seed=seed, dataset=dataset, head_layers=head_layers)
        store(key, blob)
    return blob


def load(key: str) -> bytes | None:
    """The blob cached under `key`, when the cache and its file can be trusted (module docstring); else None."""
    directory = _trusted_dir(cache_dir())
    return None if directory is None else _cached(directory, key)


def store(key: str, blob: bytes) -> None:
    """Keep `blob` under `key` (nothing, when the cache directory cannot be trusted or written)."""
    directory = _trusted_dir(cache_dir())
    if directory is not None:
        _store(directory, key, blob)


def _own(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid()


def _trusted_dir(directory: Path) -> Path | None:
    """`directory`, created (0700) if absent, when nobody else can write into it; None otherwise."""
    try:
        parent = directory.parent
        if not parent.exists():
            parent.parent.mkdir(parents=True, exist_ok=True)  # above the cache: the user's own ~/.cache
            parent.mkdir(mode=0o700, exist_ok=True)
        if not directory.exists():
            directory.mkdir(mode=0o700, exist_ok=True)
        st, up = os.lstat(directory), os.stat(parent)
    except OSError:
        return None
    why = ""
    if not stat.S_ISDIR(st.st_mode):
        why = "is not a directory (a symlink?)"
    elif not _own(st):
        why = f"is owned by uid {st.st_uid}, not this user"
    elif up.st_uid not in (os.geteuid(), 0):
        why = f"lies in {parent}, owned by uid {up.st_uid}"
    elif up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX:
        why = f"lies in {parent}, which others can write to"
    if why:
        log.warning("package cache %s %s: not used (packages are built anew)", directory, why)
        return None
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.chmod(directory, 0o700)
        except OSError:
            return None
    return directory


def _cached(directory: Path, key: str) -> bytes | None:
    """The blob stored under `key`, if its file is this user's own, writable by no one else, and its bytes are
    the ones recorded in its name."""
    for path in sorted(directory.glob(f"{key}-*.zip")):
        want = path.name[len(key) + 1 : -len(".zip")]
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or not _own(st) or st.st_mode & 0o022:
                log.warning("package cache: %s is not this user's own file: rebuilding", path.name)
                continue
            blob = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(blob).hexdigest() == want:
            return blob
        log.warning("package cache: %s does not hold the bytes recorded when it was built: rebuilding", path.name)
    return None


def _store(directory: Path, key: str, blob: bytes) -> None:
    path = directory / f"{key}-{hashlib.sha256(blob).hexdigest()}.zip"
    try:
        for stale in directory.glob(f"{key}*.zip"):  # a planted or damaged copy under this key
            if stale != path:
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".zip")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        by_age = sorted(directory.glob("*.zip"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in by_age[KEEP:]:  # builds of older code or other arguments
            old.unlink(missing_ok=True)
    except OSError:
        pass  # no cache then; the blob is still returned
