"""Gaussian-process posterior over an agent's query history, in numpy.

Owns the two isotropic kernels FZooS uses (squared exponential "se" and Matérn-5/2 "matern52"), the
lengthscale fit by marginal likelihood (random restarts of a golden-section search over log l), the
analytic gradient of the posterior mean and the trace of the gradient-posterior covariance used as the
exploration score.

Conventions: targets are min-max scaled (guarded when every y is equal) and centred before the fit, and
`grad_mean` rescales by the y-range so gradients are in the objective's own units. The noise is a ratio
to the signal variance (default 1e-6); the signal variance is profiled out of the likelihood, so one
kernel with one set of hyper-parameters serves both the mean and the variance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedfleet.edge_agent.errors import ConfigError

KINDS = ("se", "matern52")
_SQRT5 = float(np.sqrt(5.0))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown GP kernel {kind!r}; use one of {', '.join(KINDS)}")


def sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows of a (n, d) and b (m, d), clipped at 0."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


def kernel_from_sqdist(d2: np.ndarray, kind: str, lengthscale: float) -> np.ndarray:
    """Unit-variance kernel values from squared distances."""
    if kind == "se":
        return np.exp(-0.5 * d2 / lengthscale**2)
    ar = _SQRT5 * np.sqrt(d2) / lengthscale
    return (1.0 + ar + ar * ar / 3.0) * np.exp(-ar)


def kernel(a: np.ndarray, b: np.ndarray, kind: str, lengthscale: float) -> np.ndarray:
    _check_kind(kind)
    return kernel_from_sqdist(sqdist(a, b), kind, lengthscale)


def grad_coeff(d2: np.ndarray, kind: str, lengthscale: float) -> np.ndarray:
    """c(r) with ∇_x k(x, x') = -c(r) (x - x') for the unit-variance kernel.

    SE: c = k / l². Matérn-5/2 with a = √5/l: c = (a²/3)(1 + a r) e^(-a r).
    """
    if kind == "se":
        return np.exp(-0.5 * d2 / lengthscale**2) / lengthscale**2
    a = _SQRT5 / lengthscale
    ar = a * np.sqrt(d2)
    return (a * a / 3.0) * (1.0 + ar) * np.exp(-ar)


def prior_grad_var(kind: str, lengthscale: float) -> float:
    """The diagonal of ∇_x∇_x' k at x = x' (unit variance): 1/l² for SE, 5/(3 l²) for Matérn-5/2."""
    return 1.0 / lengthscale**2 if kind == "se" else 5.0 / (3.0 * lengthscale**2)


def scale_targets(y: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Min-max scale y to [0, 1] and centre it. Returns (ỹ, y_min, y_range); a flat y gets range 1."""
    y = np.asarray(y, np.float64)
    lo, hi = float(y.min()), float(y.max())
    rng = hi - lo
    if not np.isfinite(rng) or rng <= 1e-12 * max(1.0, abs(hi)):
        rng = 1.0  # all values equal: nothing to scale, avoid dividing by zero
    ys = (y - lo) / rng
    return ys - ys.mean(), lo, rng


try:  # SciPy's triangular solve is much cheaper; the edge does not require SciPy
    from scipy.linalg import solve_triangular as _solve_triangular
except ImportError:  # pragma: no cover - exercised on devices without SciPy
    _solve_triangular = None


def tri_solve(chol: np.ndarray, b: np.ndarray, *, trans: bool = False) -> np.ndarray:
    """Solve L z = b (or Lᵀ z = b with trans) for a lower-triangular L."""
    if _solve_triangular is not None:
        return _solve_triangular(chol, b, lower=True, trans=1 if trans else 0, check_finite=False)
    return np.linalg.solve(chol.T if trans else chol, b)


def _chol(r: np.ndarray, noise: float) -> tuple[np.ndarray, float]:
    """Cholesky of r + noise·I, raising the noise tenfold (up to 1e-2) if r is not numerically PD."""
    eye = np.eye(r.shape[0])
    eps = noise
    while True:
        try:
            return np.linalg.cholesky(r + eps * eye), eps
        except np.linalg.LinAlgError:
            if eps >= 1e-2:
                raise
            eps = max(eps * 10.0, 1e-10)


def _profile_lml(d2: np.ndarray, ys: np.ndarray, kind: str, lengthscale: float, noise: float) -> float:
    """Log marginal likelihood with the signal variance profiled out (constants dropped)."""
    try:
        chol, _ = _chol(kernel_from_sqdist(d2, kind, lengthscale), noise)
    except np.linalg.LinAlgError:
        return -np.inf
    z = tri_solve(chol, ys)
    n = ys.shape[0]
    s2 = max(float(z @ z) / n, 1e-300)
    return -0.5 * n * np.log(s2) - float(np.log(np.diag(chol)).sum())


def fit_lengthscale(
    x: np.ndarray,
    y: np.ndarray,
    *,
    kind: str = "matern52",
    restarts: int = 2,
    noise: float = 1e-6,
    bounds: tuple[float, float] = (1e-3, 1e3),
    rng: np.random.Generator | None = None,
    iters: int = 16,
) -> float:
    """Isotropic lengthscale maximising the marginal likelihood.

    Each restart draws a start uniformly in log-space within `bounds` and runs a golden-section search over
    log l on a bracket of ±2 around it (clipped to the bounds), moving the bracket along the slope while the
    maximum lands on its edge; the best value over the restarts wins.
    """
    _check_kind(kind)
    if restarts < 1:
        raise ConfigError(f"GP restarts must be >= 1, got {restarts}")
    rng = rng if rng is not None else np.random.default_rng(0)
    ys, _, _ = scale_targets(y)
    d2 = sqdist(x, x)
    lo_b, hi_b = np.log(bounds[0]), np.log(bounds[1])
    gr = (np.sqrt(5.0) - 1.0) / 2.0

    def f(t: float) -> float:
        return _profile_lml(d2, ys, kind, float(np.exp(t)), noise)

    def golden(a: float, b: float) -> tuple[float, float]:
        c, e = b - gr * (b - a), a + gr * (b - a)
        fc, fe = f(c), f(e)
        for _ in range(iters):
            if fc >= fe:
                b, e, fe = e, c, fc
                c = b - gr * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, e, fe
                e = a + gr * (b - a)
                fe = f(e)
        return (c, fc) if fc >= fe else (e, fe)

    best_t, best_v = 0.0, -np.inf
    for _ in range(restarts):
        t0 = rng.uniform(lo_b, hi_b)
        a, b = max(lo_b, t0 - 2.0), min(hi_b, t0 + 2.0)
        for _ in range(6):  # follow the slope when the maximum sits on an edge of the bracket
            t, v = golden(a, b)
            tol = 0.02 * (b - a)
            if t - a < tol and a > lo_b:
                a, b = max(lo_b, a - 3.5), a + 0.5
            elif b - t < tol and b < hi_b:
                a, b = b - 0.5, min(hi_b, b + 3.5)
            else:
                break
        if v > best_v:
            best_t, best_v = t, v
    if not np.isfinite(best_v):
        raise np.linalg.LinAlgError("GP lengthscale fit failed: kernel matrix not positive definite anywhere")
    return float(np.exp(best_t))


@dataclass
class GPPosterior:
    """A GP conditioned on (x, y) with fixed hyper-parameters.

    `alpha` = (R + εI)^(-1) ỹ and `sigma2` is the profiled signal variance, so the mean is
    μ(x) = y_min + s (mean(ỹ_raw) + Σ_j α_j k(x, x_j)) with s the y-range.
    """

    x: np.ndarray
    kind: str
    lengthscale: float
    noise: float
    chol: np.ndarray
    alpha: np.ndarray
    sigma2: float
    y_min: float
    y_range: float
    y_offset: float
    _a: np.ndarray | None = field(default=None, repr=False)  # (K + σ²I)^(-1), built on first use

    @classmethod
    def condition(
        cls, x: np.ndarray, y: np.ndarray, *, kind: str, lengthscale: float, noise: float = 1e-6
    ) -> GPPosterior:
        _check_kind(kind)
        x = np.asarray(x, np.float64)
        raw = np.asarray(y, np.float64)
        ys, lo, rng = scale_targets(raw)
        chol, eps = _chol(kernel(x, x, kind, lengthscale), noise)
        z = tri_solve(chol, ys)
        alpha = tri_solve(chol, z, trans=True)
        sigma2 = max(float(z @ z) / len(ys), 1e-12)
        offset = float(((raw - lo) / rng).mean())
        return cls(x, kind, lengthscale, eps, chol, alpha, sigma2, lo, rng, offset)

    def mean(self, xq: np.ndarray) -> np.ndarray:
        """Posterior mean at rows of xq (m, d), in the objective's units."""
        k = kernel(np.atleast_2d(xq), self.x, self.kind, self.lengthscale)
        return self.y_min + self.y_range * (self.y_offset + k @ self.alpha)

    def grad_mean(self, xq: np.ndarray) -> np.ndarray:
        """Analytic ∇μ at one point xq (d,): s Σ_j α_j ∇_x k(xq, x_j), in the objective's units."""
        xq = np.asarray(xq, np.float64)
        diff = xq[None, :] - self.x
        c = grad_coeff((diff * diff).sum(1), self.kind, self.lengthscale)
        return -self.y_range * ((self.alpha * c) @ diff)

    def grad_var_trace(self, xq: np.ndarray) -> np.ndarray:
        """trace(Σ_∇(x)) for each row of xq (m, d), in scaled units (σ² times the unit-kernel value).

        Σ_∇(x) = ∇∇'k(x, x) - Gᵀ(K + σ²I)^(-1)G with G (n, d) rows ∇_x k(x, x_j) = -c_j (x - x_j); one
        kernel throughout. With A = (K + σ²I)^(-1) and D the rows x - x_j, trace(GᵀAG) = cᵀ(A ∘ DDᵀ)c, and
        DDᵀ expands into inner products of coordinates centred on the data, so m candidates cost O(m n²)
        rather than O(m n² d).
        """
        xq = np.atleast_2d(np.asarray(xq, np.float64))
        d = xq.shape[1]
        a = self._inverse()
        ref = self.x.mean(axis=0)
        xc = self.x - ref
        u = xq - ref
        c = grad_coeff(sqdist(xq, self.x), self.kind, self.lengthscale)  # (m, n)
        q = u @ xc.T  # (m, n)
        ca = c @ a
        explained = ((u * u).sum(1) * (ca * c).sum(1) - 2.0 * (ca * c * q).sum(1)
                     + ((c @ (a * (xc @ xc.T))) * c).sum(1))
        prior = d * prior_grad_var(self.kind, self.lengthscale)
        return self.sigma2 * np.maximum(prior - explained, 0.0)

    def _inverse(self) -> np.ndarray:
        if self._a is None:
            li = tri_solve(self.chol, np.eye(self.chol.shape[0]))
            self._a = li.T @ li
        return self._a


def nearest(x_hist: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k rows of x_hist nearest to target (all of them if there are fewer)."""
    d2 = ((x_hist - target[None, :]) ** 2).sum(1)
    if k >= len(d2):
        return np.arange(len(d2))
    return np.argpartition(d2, k - 1)[:k]


def fit_local(
    x_hist: np.ndarray,
    y_hist: np.ndarray,
    target: np.ndarray,
    *,
    kind: str = "matern52",
    max_points: int = 150,
    restarts: int = 2,
    noise: float = 1e-6,
    rng: np.random.Generator | None = None,
) -> GPPosterior:
    """Fit the lengthscale on the `max_points` stored queries nearest `target` and condition on them."""
    idx = nearest(x_hist, target, max_points)
    xs, ys = x_hist[idx], y_hist[idx]
    ls = fit_lengthscale(xs, ys, kind=kind, restarts=restarts, noise=noise, rng=rng)
    return GPPosterior.condition(xs, ys, kind=kind, lengthscale=ls, noise=noise)
