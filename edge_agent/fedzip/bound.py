"""The information bound of a quantised update, the yardstick for the encoded size.

Per tensor with n entries of which m are nonzero, taking k' distinct nonzero values:
    log2 C(n, m) + m H(values of the nonzero entries) + 32 k'
i.e. the positions as a subset, the cluster ids at their empirical entropy, and the float32 centroids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def log2_binomial(n: int, m: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1)) / math.log(2)


def bound_bits(quantized: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for x in quantized.values():
        flat = np.asarray(x).ravel()
        vals = flat[flat != 0]
        m = vals.size
        if m == 0:
            continue
        _, counts = np.unique(vals, return_counts=True)
        p = counts / m
        total += log2_binomial(flat.size, m) + float(-(counts * np.log2(p)).sum()) + 32.0 * counts.size
    return total
