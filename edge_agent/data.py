"""A device's local data: the loaders that turn files into `LocalData` (x, y).

- `load_npz(path)`: a `.npz` holding `x` (N, ...) and `y` (N,).
"""

from __future__ import annotations

import numpy as np

from fedfleet.edge_agent.errors import FedfleetError
from fedfleet.edge_agent.learners.base import LocalData

__all__ = ["LocalData", "load_npz"]


def load_npz(path: str) -> LocalData:
    """Local data from a `.npz` holding `x` (N, ...) and `y` (N,). Raises FedfleetError with what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"].astype(np.float32), f["y"].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise FedfleetError(f"--data {path}: need a .npz with arrays 'x' and 'y' ({exc})") from None
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise FedfleetError(f"--data {path}: x has {x.shape[0]} rows and y {y.shape[0]}; they must match and be > 0")
    return LocalData(x, y)
