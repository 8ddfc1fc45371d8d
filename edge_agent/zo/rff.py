"""Random Fourier features for FZooS's shared surrogate, in numpy.

Owns the one function that draws the shared RFF matrix Ω (d, M) and phases b (M) from
`Generator(PCG64(seed))`: the coordinator imports this very function, so both sides hold identical draws.
Also owns the feature map φ(x) = √(2/M) cos(xΩ + b), the ridge fit as an n×n solve with jitter
(ν = Φᵀ(ΦΦᵀ + λI)^(-1) ỹ, λ ≈ 1e-6·n, since M ≫ n makes ridge 0 singular) and the surrogate gradient
∇(φ(x)ᵀν) = -√(2/M) Ω (ν ⊙ sin(Ωᵀx + b)).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.zo.gp import nearest, scale_targets


def draw(d: int, m: int, lengthscale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ω (d, M) with entries N(0, 1/l²) and b (M,) uniform on [0, 2π), float64, from PCG64(seed).

    Ω is drawn first (row-major), then b, so every caller with the same arguments gets the same arrays.
    """
    if d < 1 or m < 1:
        raise ConfigError(f"RFF needs d >= 1 and M >= 1, got d={d}, M={m}")
    if not lengthscale > 0:
        raise ConfigError(f"RFF lengthscale must be positive, got {lengthscale}")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    omega = rng.standard_normal((d, m)) / float(lengthscale)
    b = rng.uniform(0.0, 2.0 * np.pi, m)
    return omega, b


@lru_cache(maxsize=4)
def _draw_cached(d: int, m: int, lengthscale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    omega, b = draw(d, m, lengthscale, seed)
    omega.flags.writeable = False
    b.flags.writeable = False
    return omega, b


@dataclass(frozen=True)
class RFF:
    """A shared feature map. Build with `RFF.from_seed(d, M, lengthscale, seed)`."""

    omega: np.ndarray
    b: np.ndarray

    @classmethod
    def from_seed(cls, d: int, m: int, lengthscale: float, seed: int) -> RFF:
        return cls(*_draw_cached(int(d), int(m), float(lengthscale), int(seed)))

    @property
    def m(self) -> int:
        return int(self.b.shape[0])

    def features(self, x: np.ndarray) -> np.ndarray:
        """φ for each row of x (n, d) -> (n, M)."""
        return np.sqrt(2.0 / self.m) * np.cos(np.atleast_2d(x) @ self.omega + self.b)

    def predict(self, x: np.ndarray, nu: np.ndarray) -> np.ndarray:
        return self.features(x) @ nu

    def grad(self, x: np.ndarray, nu: np.ndarray) -> np.ndarray:
        """∇_x φ(x)ᵀν at one point x (d,)."""
        s = np.sin(np.asarray(x, np.float64) @ self.omega + self.b)
        return -np.sqrt(2.0 / self.m) * (self.omega @ (nu * s))

    def fit(self, x: np.ndarray, y: np.ndarray, *, jitter: float = 1e-6) -> tuple[np.ndarray, float]:
        """Ridge fit on min-max scaled, centred targets: returns (ν, s) with s the y-range.

        ν = Φᵀ(ΦΦᵀ + λI)^(-1) ỹ with λ = jitter·n; s·ν is the surrogate in the objective's units
        (up to an additive constant, which no gradient sees).
        """
        ys, _, rng = scale_targets(y)
        phi = self.features(x)
        n = phi.shape[0]
        gram = phi @ phi.T + (jitter * n) * np.eye(n)
        nu = phi.T @ np.linalg.solve(gram, ys)
        return nu, rng


def fit_local(
    rff: RFF, x_hist: np.ndarray, y_hist: np.ndarray, target: np.ndarray, *, max_points: int = 500,
    jitter: float = 1e-6,
) -> tuple[np.ndarray, float]:
    """Fit the RFF surrogate on the `max_points` stored queries nearest `target`."""
    idx = nearest(x_hist, target, max_points)
    return rff.fit(x_hist[idx], y_hist[idx], jitter=jitter)
