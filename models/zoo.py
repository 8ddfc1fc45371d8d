"""The model zoo: small torch definitions registered by name, with seeded central training.

Every model is a flat `nn.Sequential` of Linear / Conv2d / ReLU / MaxPool2d / Flatten layers that ends in
raw logits (no softmax), so exporters (ONNX, the hand-written TFLite writer) map it layer by layer. Layer
names follow `fedfleet.edge_agent.nn.mlp`: fully-connected layers are `fc{i}`, convolutions `conv{i}`, pools `pool{i}`.

| name        | input       | layers                                                  | dataset  | head      |
|-------------|-------------|---------------------------------------------------------|----------|-----------|
| digits-mlp  | (64,)       | fc0 64->32, relu, fc1 32->10                            | digits   | fc1       |
| mnist-mlp   | (784,)      | fc0 784->128, relu, fc1 128->10 (101,770 parameters)    | mnist5k  | fc1       |
| mnist-cnn   | (1, 28, 28) | conv0 1->8 3x3, relu, pool, conv1 8->16 3x3, relu, pool, | mnist5k  | fc0       |
|             |             | flatten, fc0 784->10                                    |          |           |

The head is the last Linear layer: its `weight` and `bias` are what the head-as-inputs export turns into
graph inputs. `train(name, seed)` fits the model on the train part of `split(data, 0.2, seed=0)` of its
dataset; `datasets(name)` gives the same (train, test) split to exporters, tests and benchmarks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.models import data as fdata
from fedfleet.models.train import fit


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    dataset: str  # "digits" or "mnist5k"
    head: list[str]  # state_dict names of the trainable head (the last Linear's weight and bias)
    epochs: int = 10  # default epochs for `train`
    lr: float = 3e-3


_ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in _ZOO:
        raise ConfigError(f"zoo model {entry.name!r} is registered twice; give the new one another name")
    _ZOO[entry.name] = entry
    return entry


def names() -> list[str]:
    return list(_ZOO)


def get(name: str) -> ZooEntry:
    try:
        return _ZOO[name]
    except KeyError:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of {', '.join(_ZOO)}") from None


def _digits_mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(fc0=nn.Linear(64, 32), relu0=nn.ReLU(), fc1=nn.Linear(32, 10)))


def _mnist_mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(fc0=nn.Linear(784, 128), relu0=nn.ReLU(), fc1=nn.Linear(128, 10)))


def _mnist_cnn() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv0=nn.Conv2d(1, 8, 3, padding=1),
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(2),
            conv1=nn.Conv2d(8, 16, 3, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc0=nn.Linear(16 * 7 * 7, 10),
        )
    )


register(ZooEntry("digits-mlp", _digits_mlp, (64,), "digits", ["fc1.weight", "fc1.bias"], epochs=40, lr=1e-2))
register(ZooEntry("mnist-mlp", _mnist_mlp, (784,), "mnist5k", ["fc1.weight", "fc1.bias"], epochs=10))
register(ZooEntry("mnist-cnn", _mnist_cnn, (1, 28, 28), "mnist5k", ["fc0.weight", "fc0.bias"], epochs=10))


_SPLITS: dict[str, tuple[fdata.Dataset, fdata.Dataset]] = {}


def datasets(name: str) -> tuple[fdata.Dataset, fdata.Dataset]:
    """(train, test) for zoo model `name`, with `x` reshaped to (N, *input_shape) float32."""
    entry = get(name)
    if entry.dataset not in _SPLITS:
        raw = fdata.digits() if entry.dataset == "digits" else fdata.mnist5k()
        _SPLITS[entry.dataset] = fdata.split(raw, 0.2, seed=0)
    train_set, test_set = _SPLITS[entry.dataset]
    shape = (-1, *entry.input_shape)
    return (
        fdata.Dataset(train_set.x.reshape(shape), train_set.y),
        fdata.Dataset(test_set.x.reshape(shape), test_set.y),
    )


def train(name: str, seed: int = 0, epochs: int | None = None, batch_size: int = 64) -> nn.Module:
    """Central training of zoo model `name` on its dataset's train split. Seeded; returns the model in eval mode.

    Runs single-threaded: torch's intra-op threads make these tiny batches many times slower on small,
    busy machines.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(name, seed, epochs, batch_size)
    finally:
        torch.set_num_threads(threads)


def _train(name: str, seed: int, epochs: int | None, batch_size: int) -> nn.Module:
    entry = get(name)
    train_set, _ = datasets(name)
    torch.manual_seed(seed)
    model = entry.build()
    n_epochs = entry.epochs if epochs is None else epochs
    return fit(model, train_set.x, train_set.y, epochs=n_epochs, batch_size=batch_size, lr=entry.lr, seed=seed)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of a torch zoo model on numpy input, as float32 numpy."""
    return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(axis=1) == y).mean())
