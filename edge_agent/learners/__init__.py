"""Edge-side learners, one module per method, registered by name.

`create(name)` imports `fedfleet.edge_agent.learners.<name>` (or an alias below) on first use and returns a
fresh learner instance, so adding a method means adding one module: no list to edit.
"""

from __future__ import annotations

import importlib

from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, register, registered

__all__ = ["Learner", "LearnResult", "LocalData", "Task", "register", "registered", "create", "available"]

# methods whose learner lives in a module of another name
_ALIASES = {"fedavg": "sgd", "fedit": "lora", "flora": "lora", "lora_fair": "lora"}


def available() -> list[str]:
    """Every method with a learner module in this package."""
    import pkgutil

    import fedfleet.edge_agent.learners as pkg

    names = {m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "base" and not m.name.startswith("_")}
    return sorted(names | set(_ALIASES))


def create(name: str) -> Learner:
    """A new learner for method `name`; raises KeyError naming the known methods."""
    if name not in registered():
        if not name.isidentifier() or name.startswith("_"):
            raise KeyError(f"unknown learning method {name!r}; known: {', '.join(available())}")
        try:
            importlib.import_module(f"fedfleet.edge_agent.learners.{_ALIASES.get(name, name)}")
        except ModuleNotFoundError as exc:
            raise KeyError(f"unknown learning method {name!r}; known: {', '.join(available())}") from exc
    if name not in registered():
        raise KeyError(f"module for {name!r} registered no learner of that name")
    return registered()[name]()
