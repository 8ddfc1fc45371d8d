"""Coordinator strategies, one module per method, registered by name.

`create(name, state, **cfg)` imports `fedfleet.coordinator.strategies.<name>` on first use, so adding a method
means adding one module: no list to edit.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from fedfleet.coordinator.strategies.base import ClientResult, Strategy, TaskSpec, register, registered

__all__ = ["ClientResult", "Strategy", "TaskSpec", "register", "registered", "create", "available", "spec", "build",
           "method_config", "package_mode", "head_hidden"]

def available() -> list[str]:
    import pkgutil

    import fedfleet.coordinator.strategies as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "base" and not m.name.startswith("_"))


def create(name: str, state: dict[str, torch.Tensor], **config: Any) -> Strategy:
    if name not in registered():
        if not name.isidentifier() or name.startswith("_"):
            raise KeyError(f"unknown strategy {name!r}; known: {', '.join(available())}")
        try:
            importlib.import_module(f"fedfleet.coordinator.strategies.{name}")
        except ModuleNotFoundError as exc:
            raise KeyError(f"unknown strategy {name!r}; known: {', '.join(available())}") from exc
    if name not in registered():
        raise KeyError(f"module for {name!r} registered no strategy of that name")
    return registered()[name](state, **config)


def spec(name: str) -> type[Strategy]:
    """The strategy class of a public method; ConfigError naming the field 'method' otherwise."""
    from fedfleet.edge_agent.errors import ConfigError

    if name not in available():
        raise ConfigError(f"field 'method' must be one of {', '.join(available())}, got {name!r}")
    if name not in registered():
        importlib.import_module(f"fedfleet.coordinator.strategies.{name}")
    return registered()[name]


def method_config(job: Any) -> dict[str, Any]:
    """The strategy's configuration for a job: the method's defaults, the task's, the job's [method] table, and
    the uplink codec (what agents receive in their task configs)."""
    from fedfleet.coordinator.job.config import method_config as _method_config

    return _method_config(job)


def build(job: Any, state: dict[str, torch.Tensor]) -> Strategy:
    """The job's strategy, started from `state` (the model's initial trainable tensors)."""
    return create(job.method, state, **method_config(job), seed=job.seed)


def package_mode(job: Any) -> str:
    """The package a job's method trains: "lora" for the LoRA methods, "diffusion"/"custom" for those tasks,
    else the job's mode; ConfigError naming the field when they do not fit."""
    from fedfleet.coordinator.job.config import package_mode as _package_mode

    return _package_mode(job)


def head_hidden(job: Any) -> int:
    """The hidden width of the head the job's method trains (0: a linear head)."""
    from fedfleet.coordinator.job.config import METHOD_HEADS

    return job.hidden or METHOD_HEADS.get(job.method, 32 if job.dataset == "digits" else 128)
