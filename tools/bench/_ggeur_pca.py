"""The MNIST arm of `fedfleet bench ggeur`: an unsupervised encoder (PCA to 64 dimensions, fitted on a split
that no agent holds) over the MNIST 5k file, a head trained on its embeddings under Dirichlet label skew, both
protocols x plain and GGEUR, and the central ceiling (see `fedfleet.tools.bench.ggeur` for the rules).

The agents get the PCA embeddings as their features (a full-mode package whose MLP is the head: linear 64-10
or 64-32-10); every run goes through the round engine (`fedfleet.tools.bench.runner.run_strategy`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.strategies import create as create_strategy
from fedfleet.coordinator.strategies.base import ClientResult, TaskSpec, to_numpy
from fedfleet.coordinator.strategies.ggeur import GGEURStrategy
from fedfleet.edge_agent.learners import LocalData
from fedfleet.edge_agent.nn import mlp
from fedfleet.models import data as datasets

ENCODER_DIM = 64
HIDDEN = 32  # the one-hidden-layer head's width
ENCODER_FRACTION = 0.2  # of MNIST 5k: the encoder's split, held by no agent
TEST_FRACTION = 0.2  # of the rest: the test split


class Unsynchronised(GGEURStrategy):
    """Diagnostic only, not a method to run: the reference scripts' scheme, in which every client keeps
    training its own head and never receives the global one; the heads are averaged (sample-weighted)
    only to evaluate. `augment=False` skips the exchange (plain local training under the same scheme).
    It shows how much of the published gain comes from that scheme (spec 4e, first pitfall)."""

    name = "ggeur_unsynchronised"

    def __init__(self, state: dict[str, Any], *, augment: bool = True, **config: Any) -> None:
        super().__init__(state, **config)
        self.initial = {k: v.clone() for k, v in self.state.items()}
        self.local: dict[str, dict[str, Any]] = {}
        self.weights: dict[str, float] = {}
        self.exchange_done = not augment

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        tasks = super().configure(round, phase, agents)
        for a, spec in tasks.items():
            spec.config["learner"] = "ggeur"
            if self.stage(phase) == "train":
                spec.tensors.update(to_numpy(self.local.get(a, self.initial)))
        return tasks

    def _fedavg(self, results: list[ClientResult]) -> None:
        for r in results:
            own = self.local.get(r.agent, self.initial)
            self.local[r.agent] = {k: own[k] + torch.from_numpy(r.tensors[k]) for k in own}
            self.weights[r.agent] = float(r.samples)
        if self.local:
            total = sum(self.weights.values())
            self.state = {k: sum(self.weights[a] / total * h[k] for a, h in self.local.items()) for k in self.initial}


def encoded(seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) PCA-64 embeddings of MNIST 5k; the PCA (centred, top 64 right singular vectors, scaled
    to unit variance over the encoder split) is fitted on a stratified 20% split no agent or test holds."""
    rest, enc = datasets.split(datasets.mnist5k(), ENCODER_FRACTION, seed=seed)
    train, test = datasets.split(rest, TEST_FRACTION, seed=seed + 1)
    x = enc.x.reshape(len(enc.x), -1).astype(np.float64)
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    proj = vt[:ENCODER_DIM].T / (sv[:ENCODER_DIM] / np.sqrt(len(x)))

    def enc_(d: datasets.Dataset) -> datasets.Dataset:
        return datasets.Dataset(((d.x.reshape(len(d.x), -1) - mean) @ proj).astype(np.float32), d.y)

    return enc_(train), enc_(test)


def head_sizes(head: str) -> list[int]:
    return [ENCODER_DIM, 10] if head == "linear" else [ENCODER_DIM, HIDDEN, 10]


def _accuracy(state: dict[str, Any], test: datasets.Dataset) -> float:
    params = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)).astype(np.float32) for k, v in state.items()}
    return float(mlp.accuracy(params, test.x, test.y))


def one_run(arm: str, cfg: dict[str, Any], shards: dict[str, LocalData], test: datasets.Dataset, *, head: str,
            rounds: int, seed: int, broker: str) -> dict[str, Any]:
    """arm: sync_plain (fedavg), sync_ggeur (ggeur), unsync_plain, unsync_ggeur (heads never synchronised)."""
    from fedfleet.tools.bench.runner import run_strategy

    init = {k: torch.from_numpy(v) for k, v in mlp.init(head_sizes(head), seed).items()}
    common = {"seed": seed, "uplink": {"name": "none"}}
    if arm.startswith("unsync"):
        strategy: Any = Unsynchronised(init, augment=arm.endswith("ggeur"), **common, **cfg)
    else:
        strategy = create_strategy("fedavg" if arm == "sync_plain" else "ggeur", init, **common, **cfg)
    curve: list[float] = []
    run_strategy(strategy, shards, rounds, broker=broker, deadline_s=120.0,
                 on_round=lambda r, s: curve.append(_accuracy(s.global_state(), test)))
    return {"accuracy": curve[-1], "curve": [round(a, 4) for a in curve]}


def central(train: datasets.Dataset, test: datasets.Dataset, *, head: str, epochs: int, seed: int) -> float:
    """The ceiling, not federated: the same head trained on the whole training split with the same local SGD
    (lr 0.1, batch 16) for the fleet's total epoch budget."""
    from fedfleet.edge_agent.learners.fedavg import local_sgd

    init = mlp.init(head_sizes(head), seed)
    params, _ = local_sgd(init, train.x, train.y, {"lr": 0.1, "epochs": epochs, "batch": 16},
                          np.random.default_rng(seed))
    return _accuracy(params, test)


def cell(*, seed: int, beta: float, head: str, guarantee: bool, agents: int, rounds: int, epochs: int,
         broker: str, ggeur_defaults: dict[str, Any], arms: tuple[str, ...]) -> dict[str, Any]:
    train, test = encoded(seed)
    parts = datasets.partition_dirichlet(train.y, agents, beta, seed=seed, per_class=1 if guarantee else 0)
    shards = {f"agent-{i:02d}": LocalData(train.x[p], train.y[p]) for i, p in enumerate(parts)}
    local = {"lr": 0.1, "epochs": epochs, "batch": 16}
    out: dict[str, Any] = {}
    for arm in arms:
        cfg = local if arm == "sync_plain" else {**ggeur_defaults, **local}
        out[arm] = one_run(arm, cfg, shards, test, head=head, rounds=rounds, seed=seed, broker=broker)["accuracy"]
    out["central"] = central(train, test, head=head, epochs=rounds * epochs, seed=seed)
    return out
