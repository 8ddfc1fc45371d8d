"""Feature-shift domains for federated fine-tuning, and the data pools of the LoRA jobs.

`SHIFTS` are the six domains of the LoRA-FAIR digits check, one per agent (cycled when there are more agents):
identity, flip (mirror left-right), inversion (1 − x), a 1-pixel shift right (3 pixels on 28x28), Gaussian
noise (σ = 0.3, clipped to [0, 1], seeded), and a box blur (3x3 on 8x8, 5x5 on 28x28). Each works on flat
square images in [0, 1].

`lora_pool(dataset, part)`: sklearn digits are fine-tuned on whole (their base was pre-trained on MNIST); the
MNIST 5k file is cut once, with PCG64(0), into a pre-training half for the frozen base and a fine-tuning half
for the federated jobs, so no job's test image was seen in pre-training.
`shifted_shards(...)`: each agent's part of the train split under its domain, and the test split under every
domain (mean accuracy over domains, as the paper reports).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedfleet.models import data as datasets

SHIFT_NAMES = ("identity", "flip", "inversion", "shift", "noise", "blur")


def _images(x: np.ndarray) -> tuple[np.ndarray, int]:
    side = int(round(np.sqrt(x.shape[1])))
    if side * side != x.shape[1]:
        raise ValueError(f"feature shifts need square images, got {x.shape[1]} values per sample")
    return x.reshape(-1, side, side), side


def _flat(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img.reshape(len(img), -1), dtype=np.float32)


def identity(x: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.array(x, np.float32)


def flip(x: np.ndarray, seed: int = 0) -> np.ndarray:
    img, _ = _images(x)
    return _flat(img[:, :, ::-1])


def inversion(x: np.ndarray, seed: int = 0) -> np.ndarray:
    return (1.0 - np.asarray(x, np.float32)).astype(np.float32)


def shift(x: np.ndarray, seed: int = 0) -> np.ndarray:
    img, side = _images(x)
    k = max(1, side // 8)
    out = np.zeros_like(img)
    out[:, :, k:] = img[:, :, :-k]
    return _flat(out)


def noise(x: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.clip(x + rng.normal(0.0, 0.3, x.shape), 0.0, 1.0).astype(np.float32)


def blur(x: np.ndarray, seed: int = 0) -> np.ndarray:
    img, side = _images(x)
    r = 1 if side <= 8 else 2
    padded = np.pad(img, ((0, 0), (r, r), (r, r)), mode="edge")
    acc = np.zeros_like(img)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            acc += padded[:, dy : dy + side, dx : dx + side]
    return _flat(acc / (2 * r + 1) ** 2)


SHIFTS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "identity": identity, "flip": flip, "inversion": inversion, "shift": shift, "noise": noise, "blur": blur,
}


def domain_of(agent_index: int) -> str:
    return SHIFT_NAMES[agent_index % len(SHIFT_NAMES)]


def lora_pool(dataset: str, part: str) -> datasets.Dataset:
    """The data a LoRA job may use: `part` "finetune" (federated train and test) or "pretrain" (the base's)."""
    if dataset == "digits":
        if part != "finetune":
            raise ValueError("the digits base is pre-trained on MNIST, not on digits")
        return datasets.digits()
    full = datasets.mnist5k()
    order = np.random.Generator(np.random.PCG64(0)).permutation(len(full))
    half = len(full) // 2
    idx = np.sort(order[:half] if part == "pretrain" else order[half:])
    return full.take(idx)


def shifted_shards(dataset: str, agents: int, alpha: float, seed: int
                   ) -> tuple[list[datasets.Dataset], datasets.Dataset, list[str]]:
    """(per-agent shards, each under its domain; the test split under every domain; the domains)."""
    train, test = datasets.split(lora_pool(dataset, "finetune"), 0.2, seed=seed)
    parts = datasets.partition(train.y, agents, alpha, seed)
    domains = [domain_of(i) for i in range(agents)]
    shards = [datasets.Dataset(SHIFTS[d](train.x[p], seed * 1000 + i), train.y[p])
              for i, (d, p) in enumerate(zip(domains, parts, strict=True))]
    test_x = np.concatenate([SHIFTS[d](test.x, seed * 1000 + 999) for d in SHIFT_NAMES])
    test_y = np.concatenate([test.y] * len(SHIFT_NAMES))
    return shards, datasets.Dataset(test_x, test_y), domains
