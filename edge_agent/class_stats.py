"""Per-class embedding statistics, shared by GGEUR's edge learner and its coordinator strategy (numpy only).

- `class_stats(x, y, classes)`: n, the mean and the biased covariance (divided by n) of each class.
- `pack_upper` / `unpack_upper`: a symmetric d x d matrix as its d(d+1)/2 upper-triangle entries (row
  major), the form covariances travel in. `pack_upper` refuses a matrix that is not symmetric.
- `pool(ns, means, covs)`: the exact statistics of the concatenated data,
  N = sum n_i, mu = sum n_i mu_i / N, Sigma = sum n_i Sigma_i / N + sum n_i (mu_i - mu)(mu_i - mu)^T / N.
- `guide_clients(counts, threshold)`: the clients that hold the largest shares of a class, added in
  descending order of n until they hold at least `threshold` of the class's global count.
- `check_covariance(cov, tol)`: refuses a non-finite, non-square or non-symmetric matrix, and one whose
  most negative eigenvalue is beyond round-off (`tol` times the largest |eigenvalue|); noise within the
  tolerance is left for the eigenvalue clip.
- `shrink_spectrum(lam, shrinkage)`: the eigenvalues of a pooled covariance (the coordinator runs eigh in
  torch), negatives clipped to 0, then shrunk towards their mean: lambda' = (1 - s) lambda + s mean(lambda),
  which is (1 - s) Sigma + s (tr Sigma / d) I in the same eigenbasis.
- `perturb(base, xi, lam, rng)`: x' = x + Xi Lambda^(1/2) z with z ~ N(0, I), one draw per row of `base`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SYMMETRY_TOL = 1e-5  # relative: |S - S^T| <= tol * max(1, max |S|)
PSD_TOL = 1e-6  # relative to the largest |eigenvalue|


class StatsError(ValueError):
    """Statistics that cannot be used; `reason` is a short tag (the ledger's rejected:<reason>)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def tri_size(d: int) -> int:
    return d * (d + 1) // 2


def dim_of_tri(t: int) -> int:
    """d such that d(d+1)/2 == t; StatsError if there is none."""
    d = int((np.sqrt(8 * t + 1) - 1) // 2)
    if tri_size(d) != t:
        raise StatsError("shape", f"{t} entries are not the upper triangle of any square matrix")
    return d


def pack_upper(cov: np.ndarray) -> np.ndarray:
    cov = np.asarray(cov)
    check_symmetric(cov)
    return cov[np.triu_indices(cov.shape[0])].copy()


def unpack_upper(packed: np.ndarray, d: int | None = None) -> np.ndarray:
    packed = np.asarray(packed, np.float64).reshape(-1)
    d = dim_of_tri(packed.size) if d is None else d
    if packed.size != tri_size(d):
        raise StatsError("shape", f"{packed.size} entries, the upper triangle of a {d}x{d} matrix has {tri_size(d)}")
    out = np.zeros((d, d), np.float64)
    iu = np.triu_indices(d)
    out[iu] = packed
    out.T[iu] = packed
    return out


def class_stats(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n (k,), means (k, d), biased covariances (k, d, d)) in float64 for each class in `classes`."""
    x = np.asarray(x, np.float64)
    k, d = len(classes), x.shape[1]
    ns, means, covs = np.zeros(k), np.zeros((k, d)), np.zeros((k, d, d))
    for i, c in enumerate(classes):
        xc = x[np.asarray(y) == c]
        ns[i] = len(xc)
        if len(xc):
            means[i] = xc.mean(axis=0)
            centred = xc - means[i]
            covs[i] = centred.T @ centred / len(xc)
    return ns, means, covs


def pool(ns: Sequence[float], means: Sequence[np.ndarray], covs: Sequence[np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
    """Exact pooled (N, mean, biased covariance) of several groups' statistics."""
    n = np.asarray(ns, np.float64)
    if n.ndim != 1 or len(n) == 0 or (n < 0).any() or n.sum() <= 0:
        raise StatsError("negative_n", f"group sizes must be >= 0 with a positive total, got {n.tolist()}")
    mu_i = np.asarray(means, np.float64)
    cov_i = np.asarray(covs, np.float64)
    total = float(n.sum())
    w = n / total
    mu = w @ mu_i
    dev = mu_i - mu
    cov = np.tensordot(w, cov_i, axes=1) + (dev * w[:, None]).T @ dev
    return total, mu, cov


def guide_clients(counts: Mapping[str, float], threshold: float = 0.8) -> list[str]:
    """Clients sorted by n descending (ties by name), added until they hold >= threshold of the total.
    threshold >= 1 (or "all" upstream) keeps every client that holds the class."""
    held = sorted(((float(n), a) for a, n in counts.items() if n > 0), key=lambda t: (-t[0], t[1]))
    total = sum(n for n, _ in held)
    out: list[str] = []
    acc = 0.0
    for n, a in held:
        if out and acc >= threshold * total:
            break
        out.append(a)
        acc += n
    return out


def check_symmetric(cov: np.ndarray, tol: float = SYMMETRY_TOL) -> None:
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise StatsError("shape", f"a covariance must be square, got shape {cov.shape}")
    if not np.isfinite(cov).all():
        raise StatsError("nonfinite", "the covariance holds NaN or Inf")
    scale = max(1.0, float(np.abs(cov).max(initial=0.0)))
    asym = float(np.abs(cov - cov.T).max(initial=0.0))
    if asym > tol * scale:
        raise StatsError("not_symmetric", f"max |S - S^T| = {asym:.3g} (tolerance {tol * scale:.3g})")


def check_covariance(cov: np.ndarray, tol: float = PSD_TOL) -> np.ndarray:
    """The (symmetric, finite) covariance back, or StatsError if it is not one up to round-off."""
    cov = np.asarray(cov, np.float64)
    check_symmetric(cov)
    lam = np.linalg.eigvalsh(cov)
    scale = max(float(np.abs(lam).max(initial=0.0)), 1e-12)
    if lam[0] < -tol * scale and lam[0] < -1e-9:
        raise StatsError("not_psd", f"eigenvalue {lam[0]:.3g} is negative beyond round-off (largest |l| {scale:.3g})")
    return cov


def shrink_spectrum(lam: np.ndarray, shrinkage: float) -> np.ndarray:
    """Eigenvalues of a pooled covariance, negatives clipped to 0, then shrunk towards their mean."""
    if not 0.0 <= shrinkage <= 1.0:
        raise StatsError("config", f"shrinkage must be in [0, 1], got {shrinkage}")
    lam = np.clip(np.asarray(lam, np.float64), 0.0, None)
    return (1.0 - shrinkage) * lam + shrinkage * lam.mean()


def perturb(base: np.ndarray, xi: np.ndarray, lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw from N(x, Xi diag(lam) Xi^T) per row x of `base`: x + Xi Lambda^(1/2) z."""
    b = np.asarray(xi, np.float64) * np.sqrt(np.clip(np.asarray(lam, np.float64), 0.0, None))
    z = rng.standard_normal((len(base), b.shape[1]))
    return (np.asarray(base, np.float64) + z @ b.T).astype(np.float32)
