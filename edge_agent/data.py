"""A device's local data: the loaders that turn files into `LocalData` (x float32 (N, ...), y int64 (N,)).

numpy only (Pillow is imported only to read an image folder; never torch or pandas). One loader per format:
- `load_npz(path)`: a `.npz` holding `x` (N, ...) and `y` (N,);
- `load_csv(path, label="label")`: a CSV with a header row, one integer label column (named) and numeric
  feature columns (every other column);
- `load_images(folder, shape)`: one subfolder per class, named by the class index (`3/` or `3_kettle/`, so
  every device numbers its classes alike), images greyscaled (1 channel) or RGB and resized to `shape`
  ((C, H, W) or (H, W)), scaled to [0, 1];
- `load_python("loader.py:load")`: a small Python file whose function returns (x, y).
`load_source(table, base_dir, where)` picks one from a `[data]`/`[eval]`-style table (`path`, `format`,
`label`, `loader`) and `check(data, where, input_shape, classes)` refuses NaN, wrong shapes and labels
outside the classes. Every error is a one-line ConfigError that starts with `where` (the option or the
job table and key) and says what to do.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners.base import LocalData

__all__ = ["LocalData", "FORMATS", "load_npz", "load_csv", "load_images", "load_python", "load_path",
           "load_source", "check", "parse_shape", "import_function"]

FORMATS = ("npz", "csv", "images", "python")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


def _rows(x: np.ndarray, y: np.ndarray, where: str) -> LocalData:
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"{where}: x has shape {x.shape} and y {y.shape}; need N > 0 rows of each and a 1-D y")
    return LocalData(x, y)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer class indices from `y` (ints, or floats that are whole numbers); ConfigError otherwise."""
    y = np.asarray(y)
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    sample = ", ".join(repr(v) for v in y.ravel()[:3].tolist())
    raise ConfigError(f"{where}: labels must be integer class indices 0..classes-1, got {y.dtype} values "
                      f"such as {sample}; map names to indices first")


def load_npz(path: str | os.PathLike[str], where: str | None = None) -> LocalData:
    """Local data from a `.npz` holding `x` (N, ...) and `y` (N,)."""
    where = where or f"--data {path}"
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file {path}") from None
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: need a .npz with arrays 'x' and 'y' ({exc})") from None
    if x.dtype.kind not in "iuf":
        raise ConfigError(f"{where}: x must be numeric, got {x.dtype}")
    return _rows(x.astype(np.float32), _labels(y, where), where)


def load_csv(path: str | os.PathLike[str], label: str = "label", where: str | None = None) -> LocalData:
    """Local data from a CSV with a header row: column `label` holds the class index, every other column
    is a numeric feature."""
    where = where or f"--data {path}"
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{where}: cannot read the CSV ({exc})") from None
    if len(rows) < 2:
        raise ConfigError(f"{where}: the CSV needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if label not in header:
        raise ConfigError(f"{where}: no label column {label!r} in the header {header[:8]}; name it with 'label'")
    li = header.index(label)
    body = [r for r in rows[1:] if r]
    if any(len(r) != len(header) for r in body):
        bad = next(i for i, r in enumerate(body, start=2) if len(r) != len(header))
        raise ConfigError(f"{where}: line {bad} has a different number of columns than the header ({len(header)})")
    try:
        table = np.array(body, dtype=np.float64)
    except ValueError as exc:
        raise ConfigError(f"{where}: every column must be numeric ({exc})") from None
    x = np.delete(table, li, axis=1).astype(np.float32)
    if x.shape[1] == 0:
        raise ConfigError(f"{where}: the CSV has only the label column; add feature columns")
    return _rows(x, _labels(table[:, li], where), where)


def _class_index(name: str, where: str) -> int:
    head = name.split("_", 1)[0]
    if not head.isdigit():
        raise ConfigError(f"{where}: class folder {name!r} must be named by its class index ('3' or '3_kettle')")
    return int(head)


def load_images(folder: str | os.PathLike[str], shape: Sequence[int] | None = None,
                where: str | None = None) -> LocalData:
    """Local data from an image folder with one subfolder per class (named by the class index), each image
    resized to `shape` ((C, H, W) with C 1 or 3, or (H, W) for greyscale; None: the first image's size,
    greyscale) and scaled to [0, 1]. x is (N, C, H, W) float32, or (N, H, W) for a 2-D shape."""
    where = where or f"--data {folder}"
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{where}: no such folder {folder}")
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(f"{where}: reading images needs Pillow; pip install pillow") from None
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"{where}: {folder} has no class subfolders ('0/', '1/', ...)")
    channels, size = (1, None) if shape is None else _image_layout(shape, where)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for d in classes:
        label = _class_index(d.name, where)
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if channels == 1 else "RGB")
                    if size is None:
                        size = (im.height, im.width)
                    if (im.height, im.width) != size:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read image {f} ({exc})") from None
            xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise ConfigError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) under {folder}")
    x = np.stack(xs)
    if shape is not None and len(shape) == 2:
        x = x[:, 0]
    return _rows(x, np.asarray(ys, np.int64), where)


def _image_layout(shape: Sequence[int], where: str) -> tuple[int, tuple[int, int]]:
    dims = [int(d) for d in shape]
    if len(dims) == 2:
        return 1, (dims[0], dims[1])
    if len(dims) == 3 and dims[0] in (1, 3):
        return dims[0], (dims[1], dims[2])
    raise ConfigError(f"{where}: an image model's input shape must be (C, H, W) with C 1 or 3, or (H, W); got {dims}")


def load_python(ref: str, base_dir: str | os.PathLike[str] = ".", where: str | None = None) -> LocalData:
    """Local data from `file.py:function` (relative to `base_dir`): the function, called without arguments,
    returns (x, y)."""
    where = where or f"--data {ref}"
    file, sep, func = ref.rpartition(":")
    if not sep or not file.endswith(".py") or not func.isidentifier():
        raise ConfigError(f"{where}: a Python loader is written 'loader.py:function', got {ref!r}")
    path = Path(base_dir, file)
    if not path.is_file():
        raise ConfigError(f"{where}: no such file {path}")
    fn = import_function(path, func, where)
    try:
        out = fn()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: say where it failed
        raise ConfigError(f"{where}: {ref} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(out, tuple) or len(out) != 2:
        raise ConfigError(f"{where}: {ref} must return a tuple (x, y), got {type(out).__name__}")
    x, y = np.asarray(out[0]), np.asarray(out[1])
    if x.dtype.kind not in "iuf":
        raise ConfigError(f"{where}: {ref} returned x of dtype {x.dtype}; it must be numeric")
    return _rows(x.astype(np.float32), _labels(y, where), where)


def import_function(path: Path, name: str, where: str) -> Any:
    """Function `name` of the Python file `path`, imported under a private module name."""
    mod_name = f"_fedfleet_user_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(mod_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{where}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # the file may import its neighbours
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code
            raise ConfigError(f"{where}: importing {path.name} failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(str(path.parent))
        sys.modules[mod_name] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {path.name} has no function {name!r}")
    return fn


def load_path(path: str | os.PathLike[str], *, fmt: str | None = None, label: str = "label",
              shape: Sequence[int] | None = None, base_dir: str | os.PathLike[str] = ".",
              where: str | None = None) -> LocalData:
    """One of the loaders, chosen by `fmt` or else by the path: `x.py:f` python, `.csv` csv, a folder
    images, anything else npz."""
    p = str(path)
    where = where or f"--data {p}"
    if fmt is None:
        if ".py:" in p:
            fmt = "python"
        elif p.lower().endswith(".csv"):
            fmt = "csv"
        elif Path(base_dir, p).is_dir():
            fmt = "images"
        else:
            fmt = "npz"
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    if fmt == "python":
        return load_python(p, base_dir, where)
    full = Path(base_dir, p)
    if fmt == "csv":
        return load_csv(full, label, where)
    if fmt == "images":
        return load_images(full, shape, where)
    return load_npz(full, where)


SOURCE_KEYS = ("path", "loader", "format", "label")


def load_source(table: Mapping[str, Any], base_dir: str | os.PathLike[str], where: str,
                shape: Sequence[int] | None = None) -> LocalData:
    """The data a job table names: `path` (npz, csv, image folder; `format` to say which, `label` the CSV's
    label column) or `loader` ("loader.py:load"). `where` is the table's name, e.g. "[data]"."""
    has_path, has_loader = "path" in table, "loader" in table
    if has_path == has_loader:
        raise ConfigError(f"{where}: give exactly one of 'path' (npz, csv or image folder) or "
                          "'loader' ('loader.py:load')")
    key = "path" if has_path else "loader"
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: field '{key}' must be a non-empty string, got {value!r}")
    fmt = table.get("format", "python" if has_loader else None)
    label = table.get("label", "label")
    if fmt is not None and not isinstance(fmt, str):
        raise ConfigError(f"{where}: field 'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not isinstance(label, str):
        raise ConfigError(f"{where}: field 'label' (the CSV's label column) must be a string, got {label!r}")
    return load_path(value, fmt=fmt, label=label, shape=shape, base_dir=base_dir, where=f"{where} {key}")


def check(data: LocalData, where: str, input_shape: Sequence[int] | None = None,
          classes: int | None = None) -> LocalData:
    """`data` made to fit a model: x reshaped to (N, *input_shape) when its per-row size matches (a CSV row
    of 256 numbers for a (1, 256) input), finite values, labels in 0..classes-1."""
    x, y = data.x, data.y
    if input_shape is not None:
        want = tuple(int(d) for d in input_shape)
        if tuple(x.shape[1:]) != want:
            if int(np.prod(x.shape[1:])) != int(np.prod(want)):
                raise ConfigError(f"{where}: samples have shape {tuple(x.shape[1:])}, the model's input_shape "
                                  f"is {list(want)}; reshape or resample the data")
            x = x.reshape(len(x), *want)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=tuple(range(1, x.ndim))).sum()) if x.ndim > 1 else -1
        raise ConfigError(f"{where}: {bad} sample(s) hold NaN or infinite values; clean or drop them")
    if classes is not None and (y.min() < 0 or y.max() >= classes):
        raise ConfigError(f"{where}: labels span {int(y.min())}..{int(y.max())}, outside 0..{classes - 1} of "
                          f"[model] classes = {classes}")
    return LocalData(np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64))


def parse_shape(text: str, where: str) -> list[int]:
    """"1,28,28" or "28x28" -> [1, 28, 28] / [28, 28]."""
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"{where}: a shape is written like 1,28,28 (positive integers), got {text!r}")
    return dims
