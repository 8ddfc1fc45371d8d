"""The coordinator-side strategy interface: round state in, one task per selected agent out; results in,
new state out. Shaped after Flower's Strategy (configure_train / aggregate_train).

A strategy owns the method's own state (global tensors, FedAMD's gradient table, FZooS's RFF weights).
A round may have several exchanges ("phases", e.g. FZooS's two); the engine calls `configure` and
`aggregate` once per phase.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fedfleet.coordinator.strategies import _config

Layout = list[tuple[str, tuple[int, ...]]]


@dataclass
class TaskSpec:
    """The task for one agent: hyper-parameters, tensors to send down, and the tensors expected back."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    expect: Layout  # layout of the tensors the agent must upload; used to validate results
    uplink_codec: dict[str, Any] = field(default_factory=lambda: {"name": "none"})


@dataclass
class ClientResult:
    """A validated result from one agent (every value finite, shapes as `expect`)."""

    agent: str
    tensors: dict[str, np.ndarray]
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NoConfig:
    """A method without [method] fields."""


class Strategy(ABC):
    """One coordinator-side method. `state` is the global trainable state as torch tensors.

    A strategy is built with its method configuration as keywords (`fedfleet.coordinator.strategies.build`):
    the fields of its `Config` (defaults, a task's defaults and the job's [method] table), `seed` and `uplink`.
    `self.config` keeps that dict as given (checkpoints store it, resume compares it); `self.settings` is the
    same as a typed `Config`, defaults filled in.
    """

    name: str = ""
    phases: int = 1
    # the method's [method] fields: a frozen dataclass (fedfleet.coordinator.strategies._config)
    Config: ClassVar[type] = NoConfig
    # the edge learner its tasks run (fedfleet.edge_agent.learners; "": the method's name, set by `register`);
    # a task whose learner differs from the method's name says so in its config ("learner")
    learner: ClassVar[str] = ""
    # the model package it trains: None for any (the job's mode), "lora" for the LoRA methods
    package_mode: ClassVar[str | None] = None
    # True when its default head (the job's hidden = 0) has no hidden layer
    linear_head: ClassVar[bool] = False
    # the uplink codec agents upload with when the job sets none
    default_uplink: ClassVar[dict[str, Any]] = _config.NO_UPLINK
    # whether it can run a continual job's task schedule: False, True, or "required"
    continual: ClassVar[bool | Literal["required"]] = False
    # True when every task's tensors are the global state (`self.state`), the same for every agent: the
    # engine may then send them as a compressed sync against each agent's replica (fedfleet.coordinator.engine.downlink)
    tasks_carry_state: bool = False

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        self.state = {k: v.detach().clone().float() for k, v in state.items()}
        self.config = config
        self.settings: Any = _config.settings(self.Config, config)

    @abstractmethod
    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        """One task per selected agent for this round and phase."""

    @abstractmethod
    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        """Fold validated results into `self.state` (and any method state). May receive no results."""

    def check(self, round: int, phase: int, result: ClientResult) -> None:
        """Method-specific checks on a result that passed the engine's (signature, round, layout, finite
        values). Raise `ProtocolError(reason, detail)` to refuse it: the engine records
        `rejected:<reason>` and the phase goes on without it. The default accepts everything."""
        return None

    def screen(self, round: int, phase: int, results: list[ClientResult]) -> list[tuple[ClientResult, str, str]]:
        """Method bounds that need the whole phase (a robust reference over every sender, so no single sender
        sets it): the results to refuse as (result, reason, detail); the engine books `rejected:<reason>` and
        aggregates the rest. Runs when the phase closes, after every result passed `check`. Default: none."""
        return []

    def global_state(self) -> dict[str, torch.Tensor]:
        """The tensors that define the model to evaluate and checkpoint."""
        return self.state

    def node_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-node models for methods without one global model (MoNNA): the engine scores each and records
        their mean and minimum. Empty (the default) means: score `global_state()`."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Method state to include in checkpoints (momentum buffers, tables): tensors and plain containers of
        str, int, float, bool and None only, so checkpoints load with `torch.load(weights_only=True)`."""
        return {}

    def update_kind(self, phase: int) -> str:
        """How this phase's results relate to an update, for the shared update-norm bound
        (coordinator/engine/update_guard.py): "delta" (the result is the update), "model" (the update is the result
        minus the tensors its task sent), or "none" (not an update; not bounded)."""
        return "delta"

    def update_names(self, phase: int) -> set[str] | None:
        """The result tensors that make up the update for the norm bound (None: all of them). A method that
        uploads more than its update with it (FOT's task-end sketches) names the update's tensors."""
        return None

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what `extra_state()` returned, on resume; `self.state` has been restored already.
        A strategy that saves extra state must load it: the default accepts only none (the engine's resume
        turns the error into a one-line refusal naming the method)."""
        if extra:
            raise NotImplementedError(f"{type(self).__name__} saved extra state {sorted(extra)} but cannot load it")

    def round_note(self) -> str:
        """A few words on the method's own state after the last round, for the progress line ("" = none)."""
        return ""


class WrappedStrategy(Strategy):
    """A strategy around another (a task's: a continual schedule, a moving average of the model): every call
    goes to `inner`, which owns the state; a wrapper overrides only what it adds."""

    def __init__(self, inner: Strategy) -> None:
        # no Strategy.__init__: the inner strategy owns the state, the wrapper holds no copy of it
        self.inner = inner
        self.name = inner.name
        self.phases = inner.phases
        self.config = inner.config
        self.settings = inner.settings

    @property  # type: ignore[override]
    def state(self) -> dict[str, torch.Tensor]:
        return self.inner.state

    @state.setter
    def state(self, value: dict[str, torch.Tensor]) -> None:  # a resume restores the inner strategy's state
        self.inner.state = value

    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        return self.inner.configure(round, phase, agents)

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        self.inner.aggregate(round, phase, results)

    def check(self, round: int, phase: int, result: ClientResult) -> None:
        self.inner.check(round, phase, result)

    def screen(self, round: int, phase: int, results: list[ClientResult]) -> list[tuple[ClientResult, str, str]]:
        return self.inner.screen(round, phase, results)

    def update_kind(self, phase: int) -> str:
        return self.inner.update_kind(phase)

    def update_names(self, phase: int) -> set[str] | None:
        return self.inner.update_names(phase)

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.inner.global_state()

    def node_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.inner.node_states()

    def extra_state(self) -> dict[str, Any]:
        return self.inner.extra_state()

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.inner.load_extra_state(extra)

    def round_note(self) -> str:
        return self.inner.round_note()


def orthonormal_columns(m: torch.Tensor, tol: float = 1e-3) -> bool:
    """Whether the columns of the finite matrix `m` are orthonormal to within `tol` (a basis read back from a
    checkpoint: FOT's protected subspaces, GGEUR's class geometry)."""
    m = m.to(torch.float64)
    if not bool(torch.isfinite(m).all()):
        return False
    k = m.shape[1]
    return k == 0 or float((m.T @ m - torch.eye(k, dtype=torch.float64)).abs().max()) <= tol


def task_seed(base: int, round: int, phase: int, agent: str) -> int:
    """A per-(round, phase, agent) seed for the agent's own randomness (batches, directions, exploration):
    reproducible across processes and runs for a given job seed."""
    ss = np.random.SeedSequence([int(base), int(round), int(phase), zlib.crc32(agent.encode())])
    return int(ss.generate_state(1, np.uint32)[0])


def agent_seed(seed: int, agent: str) -> int:
    """A per-agent seed that is the same in every process (no Python hash randomisation)."""
    return (int(seed) * 1_000_003 + zlib.crc32(agent.encode())) % (1 << 32)


def to_wire(vec: torch.Tensor, layout: Layout, prefix: str = "") -> dict[str, np.ndarray]:
    """A flat float32 vector as the named float32 arrays of `layout` (names prefixed by `prefix`)."""
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape in layout:
        size = int(np.prod(shape)) if shape else 1
        out[prefix + name] = vec[pos : pos + size].reshape(shape).detach().cpu().numpy().astype(np.float32)
        pos += size
    if pos != vec.numel():
        raise ValueError(f"vector has {vec.numel()} values, layout needs {pos}")
    return out


def to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in tensors.items()}


def layout_of(tensors: dict[str, torch.Tensor] | dict[str, np.ndarray]) -> Layout:
    return [(k, tuple(int(s) for s in v.shape)) for k, v in tensors.items()]


_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty `name`")
    if not cls.learner:
        cls.learner = cls.name  # its tasks run the learner of its own name
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Strategy]]:
    return dict(_REGISTRY)
