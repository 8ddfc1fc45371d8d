"""Robust aggregators over a stack of flat vectors, in torch.

Every aggregator has the signature `agg(stack: Tensor[n, d], f: int, *, own=None, **kw) -> Tensor[d]`,
where `f` is the declared number of Byzantine vectors and `own` (pivoted rules only: NNA, centered
clipping) is the row of the stack that belongs to the node doing the mixing. `get(name)` returns one by
name, so a fleet or demo config can select it as a string.

- `nna`: nearest-neighbour averaging: the mean of the n - f vectors closest (plain Euclidean, stable
  ties, own vector first) to the pivot. `nna_subsets` mixes many pivots at once from ONE Gram-matrix
  product over the whole stack.
- `trimmed_mean`: coordinate-wise, drop the f largest and f smallest values.
- `median`: coordinate-wise; with an even count it interpolates the two middle values.
- `krum` / `multi_krum`: score = sum of the n - f - 1 smallest NON-squared distances to the others; ties
  go to the lowest index.
- `geometric_median`: smoothed Weiszfeld, z <- sum b_j x_j / sum b_j with b_j = 1 / max(|z - x_j|, nu).
- `centered_clipping`: v <- v + mean_j clip(x_j - v, tau), starting at the own vector.
- `mean`: the plain (non-robust) average, for baselines.

Helpers `flatten` / `unflatten` turn named tensor dicts into flat vectors and back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedfleet.edge_agent.errors import FedfleetError

Aggregator = Callable[..., torch.Tensor]
Layout = list[tuple[str, tuple[int, ...]]]

__all__ = [
    "AggregationError",
    "Aggregator",
    "centered_clipping",
    "flatten",
    "geometric_median",
    "get",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "names",
    "nna",
    "nna_subsets",
    "pairwise_sq_distances",
    "pivoted",
    "trimmed_mean",
    "unflatten",
]


class AggregationError(FedfleetError, ValueError):
    """A robust aggregator was called with too few vectors for the declared f, or a bad argument."""


# --------------------------------------------------------------------------- helpers


def low_median(values: Any) -> float:
    """The lower median of numbers (for an even count, the smaller middle value): no single sender can raise it
    past an honest value while at least half the values are honest. 0 for none."""
    v = sorted(float(x) for x in values)
    return v[(len(v) - 1) // 2] if v else 0.0


def flatten(tensors: dict[str, Any], layout: Layout) -> torch.Tensor:
    """Concatenate the tensors named in `layout` (numpy or torch) into one float32 vector."""
    parts = []
    for name, shape in layout:
        value = tensors[name]
        if isinstance(value, torch.Tensor):
            t = value.detach().float()
        else:
            t = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if tuple(t.shape) != tuple(shape):
            raise AggregationError(f"tensor {name!r} has shape {tuple(t.shape)}, layout says {shape}")
        parts.append(t.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0)


def unflatten(vec: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Split a flat vector back into named tensors (fresh storage, never a view of `vec`)."""
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in layout:
        size = int(np.prod(shape)) if shape else 1
        out[name] = vec[pos : pos + size].reshape(shape).clone()
        pos += size
    if pos != vec.numel():
        raise AggregationError(f"vector has {vec.numel()} values, layout needs {pos}")
    return out


def _check(stack: torch.Tensor, f: int, need: int, rule: str) -> int:
    if stack.dim() != 2:
        raise AggregationError(f"{rule}: expected a stack of shape (n, d), got {tuple(stack.shape)}")
    if f < 0:
        raise AggregationError(f"{rule}: f must be >= 0, got {f}")
    n = int(stack.shape[0])
    if n < need:
        raise AggregationError(
            f"{rule} needs at least {need} vectors to tolerate f={f} Byzantine ones, got n={n}; "
            f"lower f or collect more results"
        )
    return n


_GRAM_CHUNK = 1 << 16


def pairwise_sq_distances(stack: torch.Tensor) -> torch.Tensor:
    """All squared Euclidean distances from one Gram-matrix product.

    The stack is centred first (distances are translation invariant), which keeps float32 cancellation
    small when the vectors are close to each other but far from the origin.
    """
    n, d = stack.shape
    center = stack.mean(dim=0, keepdim=True)
    dtype = torch.float64 if stack.numel() <= 4_000_000 else stack.dtype
    gram = torch.zeros(n, n, dtype=dtype)
    for a in range(0, d, _GRAM_CHUNK):  # centre chunk by chunk: no second copy of a large stack
        xc = (stack[:, a : a + _GRAM_CHUNK] - center[:, a : a + _GRAM_CHUNK]).to(dtype)
        gram.addmm_(xc, xc.T)
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2


# --------------------------------------------------------------------------- rules


def mean(stack: torch.Tensor, f: int = 0, *, own: int | None = None) -> torch.Tensor:
    _check(stack, f, 1, "mean")
    return stack.mean(dim=0)


def nna(stack: torch.Tensor, f: int, *, own: int | None = 0) -> torch.Tensor:
    """Mean of the n - f vectors nearest to `stack[own]` (which is always among them)."""
    n = _check(stack, f, 2 * f + 1, "nna")
    own = 0 if own is None else own
    if not 0 <= own < n:
        raise AggregationError(f"nna: own index {own} outside a stack of {n}")
    dist = torch.linalg.vector_norm(stack - stack[own], dim=1)
    dist[own] = -1.0  # own vector first even against exact duplicates
    order = torch.sort(dist, stable=True).indices[: n - f]
    return stack[order].mean(dim=0)


def nna_subsets(
    stack: torch.Tensor, f: int, subsets: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """NNA for many pivots at once: row r of the result is NNA over `stack[subsets[r]]` with the pivot
    `subsets[r][0]`, averaging len(subset) - f vectors. `subsets=None` means every row is a pivot over
    the full stack. Distances come from one Gram-matrix product; the means from one matmul.
    """
    n = int(stack.shape[0])
    if subsets is None:
        subsets = [[i, *[j for j in range(n) if j != i]] for i in range(n)]
    sizes = {len(sub) for sub in subsets}
    if len(sizes) != 1:  # ragged subsets: mix group by group, still from the one distance matrix
        d2 = pairwise_sq_distances(stack)
        return torch.cat([_nna_rows(d2, stack, f, [sub]) for sub in subsets])
    return _nna_rows(pairwise_sq_distances(stack), stack, f, subsets)


def _nna_rows(d2: torch.Tensor, stack: torch.Tensor, f: int, subsets: Sequence[Sequence[int]]) -> torch.Tensor:
    n = int(stack.shape[0])
    idx = torch.as_tensor([list(sub) for sub in subsets], dtype=torch.long)  # (P, m), pivot first
    m = int(idx.shape[1])
    if m < 2 * f + 1:
        raise AggregationError(f"nna needs at least {2 * f + 1} vectors per node to tolerate f={f}, got {m}")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise AggregationError(f"nna: a subset index is outside the stack of {n}")
    if bool((torch.sort(idx, dim=1).values.diff(dim=1) == 0).any()):
        raise AggregationError("nna: a subset repeats an index")
    dist = d2[idx[:, :1], idx].clone()  # d2[pivot, j]
    dist[:, 0] = -1.0
    keep = torch.gather(idx, 1, torch.sort(dist, dim=1, stable=True).indices[:, : m - f])
    weights = torch.zeros(len(subsets), n, dtype=stack.dtype)
    weights.scatter_(1, keep, 1.0 / (m - f))
    return weights @ stack


def trimmed_mean(stack: torch.Tensor, f: int, *, own: int | None = None) -> torch.Tensor:
    n = _check(stack, f, 2 * f + 1, "trimmed_mean")
    if f == 0:
        return stack.mean(dim=0)
    return torch.sort(stack, dim=0).values[f : n - f].mean(dim=0)


def median(stack: torch.Tensor, f: int = 0, *, own: int | None = None) -> torch.Tensor:
    n = _check(stack, f, 2 * f + 1, "median")
    s = torch.sort(stack, dim=0).values
    if n % 2:
        return s[n // 2].clone()
    return 0.5 * (s[n // 2 - 1] + s[n // 2])


def _krum_scores(stack: torch.Tensor, f: int, rule: str) -> torch.Tensor:
    n = _check(stack, f, 2 * f + 3, rule)
    dist = pairwise_sq_distances(stack).sqrt()  # non-squared, as in the reference
    dist.fill_diagonal_(float("inf"))
    return torch.sort(dist, dim=1).values[:, : n - f - 1].sum(dim=1)


def krum(stack: torch.Tensor, f: int, *, own: int | None = None) -> torch.Tensor:
    scores = _krum_scores(stack, f, "krum")
    best = int(torch.sort(scores, stable=True).indices[0])
    return stack[best].clone()


def multi_krum(stack: torch.Tensor, f: int, *, own: int | None = None, m: int | None = None) -> torch.Tensor:
    """Average of the m best-scored vectors (default m = n - f)."""
    scores = _krum_scores(stack, f, "multi_krum")
    n = int(stack.shape[0])
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise AggregationError(f"multi_krum: m must be in [1, {n}], got {m}")
    return stack[torch.sort(scores, stable=True).indices[:m]].mean(dim=0)


def geometric_median(
    stack: torch.Tensor,
    f: int = 0,
    *,
    own: int | None = None,
    iters: int = 8,
    nu: float = 0.1,
    init: str = "median",
) -> torch.Tensor:
    """Smoothed Weiszfeld. The reference runs 3 iterations from z0 = 0; here `init` ('zeros', 'mean',
    'median') and `iters` are explicit, with a coordinate-median start by default."""
    n = _check(stack, f, 2 * f + 1, "geometric_median")
    if nu <= 0:
        raise AggregationError(f"geometric_median: nu must be > 0, got {nu}")
    if init == "zeros":
        z = torch.zeros_like(stack[0])
    elif init == "mean":
        z = stack.mean(dim=0)
    elif init == "median":
        z = median(stack, 0)
    else:
        raise AggregationError(f"geometric_median: init must be 'zeros', 'mean' or 'median', got {init!r}")
    for _ in range(iters):
        b = (1.0 / n) / torch.linalg.vector_norm(stack - z, dim=1).clamp_min(nu)
        z = (b[:, None] * stack).sum(dim=0) / b.sum()
    return z


def centered_clipping(
    stack: torch.Tensor,
    f: int = 0,
    *,
    own: int | None = None,
    center: torch.Tensor | None = None,
    tau: float = 2.0,
    iters: int = 3,
) -> torch.Tensor:
    """Start at `center` if given, else at the own vector, else at the coordinate-wise median."""
    _check(stack, f, 2 * f + 1, "centered_clipping")
    if tau <= 0:
        raise AggregationError(f"centered_clipping: tau must be > 0, got {tau}")
    if center is not None:
        v = center.detach().to(stack.dtype).clone()
    elif own is not None:
        v = stack[own].clone()
    else:
        v = median(stack, 0)
    for _ in range(iters):
        u = stack - v
        norms = torch.linalg.vector_norm(u, dim=1, keepdim=True)
        scale = torch.where(norms > tau, tau / norms.clamp_min(1e-30), torch.ones_like(norms))
        v = v + (u * scale).mean(dim=0)
    return v


# --------------------------------------------------------------------------- registry

_RULES: dict[str, Aggregator] = {
    "mean": mean,
    "nna": nna,
    "trimmed_mean": trimmed_mean,
    "median": median,
    "krum": krum,
    "multi_krum": multi_krum,
    "geometric_median": geometric_median,
    "centered_clipping": centered_clipping,
}
_ALIASES = {
    "average": "mean",
    "cwtm": "trimmed_mean",
    "trmean": "trimmed_mean",
    "multikrum": "multi_krum",
    "gm": "geometric_median",
    "rfa": "geometric_median",
    "cc": "centered_clipping",
    "scc": "centered_clipping",
}
_PIVOTED = {"nna", "centered_clipping"}


def names() -> list[str]:
    return sorted(_RULES)


def canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _RULES:
        raise AggregationError(
            f"unknown robust aggregator {name!r}; choose one of {', '.join(names())} "
            f"(aliases: {', '.join(sorted(_ALIASES))})"
        )
    return key


def get(name: str) -> Aggregator:
    """The aggregator called `name` (or an alias such as 'cwtm', 'gm', 'cc')."""
    return _RULES[canonical(name)]


def pivoted(name: str) -> bool:
    """Whether the rule depends on which vector is the mixing node's own (NNA, centered clipping)."""
    return canonical(name) in _PIVOTED
