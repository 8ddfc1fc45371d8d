"""Coordinator strategies, one module per method, registered by name.

`create(name, state, **cfg)` imports `fedfleet.coordinator.strategies.<name>` on first use, so adding a method
means adding one module: no list to edit.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from fedfleet.coordinator.strategies.base import ClientResult, Strategy, TaskSpec, register, registered

__all__ = ["ClientResult", "Strategy", "TaskSpec", "register", "registered", "create", "available"]

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
