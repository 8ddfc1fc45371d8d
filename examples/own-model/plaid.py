"""PLAID (plug-load appliance current signatures, 11 appliance classes) read from sktime 1.2.0's wheel.

sktime ships the UCR/UEA copy of PLAID as `sktime/datasets/data/PLAID/PLAID_{TRAIN,TEST}.ts` (537 + 537
variable-length series of current samples). This file finds those files without importing sktime (which
would pull in pandas and more) and parses the `.ts` format itself with numpy: every series is resampled to
`LENGTH` points (linear interpolation) and scaled to unit peak, so each device sees the same shape of
input whatever its meter's sampling rate and the appliance's current. `load_train()` / `load_test()` are
`loader = "plaid.py:load_train"` functions: they return x float32 (N, 1, LENGTH) and y int64 (N,).

Install the data with `pip install sktime==1.2.0` (or `pip install 'fedfleet[examples]'`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

LENGTH = 256
CLASSES = 11


def ts_path(split: str) -> Path:
    """The installed PLAID_<split>.ts, found from sktime's package location without importing it."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("PLAID comes with sktime 1.2.0: pip install sktime==1.2.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "PLAID" / f"PLAID_{split}.ts"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install sktime 1.2.0 (pip install sktime==1.2.0)")
    return path


def parse_ts(text: str) -> tuple[list[np.ndarray], np.ndarray]:
    """A univariate `.ts` file with class labels: one series per data line, 'v1,v2,...:label'."""
    series: list[np.ndarray] = []
    labels: list[int] = []
    in_data = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        values, _, label = line.rpartition(":")
        series.append(np.array(values.split(","), dtype=np.float64))
        labels.append(int(label))
    return series, np.asarray(labels, np.int64)


def resample(s: np.ndarray, length: int = LENGTH) -> np.ndarray:
    """`s` linearly interpolated onto `length` evenly spaced points, scaled to unit peak |value|."""
    out = np.interp(np.linspace(0, len(s) - 1, length), np.arange(len(s)), s)
    return out / max(float(np.abs(out).max()), 1e-8)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    series, y = parse_ts(ts_path(split).read_text())
    x = np.stack([resample(s) for s in series]).astype(np.float32)[:, None, :]
    return x, y


def load_train() -> tuple[np.ndarray, np.ndarray]:
    return load("TRAIN")


def load_test() -> tuple[np.ndarray, np.ndarray]:
    return load("TEST")
