"""Edge-side learners, one module per learner, named after it and registered by that name.

`create(name)` imports `fedfleet.edge_agent.learners.<name>` on first use and returns a fresh learner instance,
so adding a method means adding one module: no list to edit. The name is the task's `learner` (a coordinator
strategy sets it when its tasks run another method's learner, e.g. robust FedAvg's "fedavg"), else the
task's method. Modules with a leading "_" hold shared code, not learners.
"""

from __future__ import annotations

import importlib

from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, register, registered

__all__ = ["Learner", "LearnResult", "LocalData", "Task", "register", "registered", "create", "available"]


def available() -> list[str]:
    """Every learner with a module in this package."""
    import pkgutil

    import fedfleet.edge_agent.learners as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "base" and not m.name.startswith("_"))


def create(name: str) -> Learner:
    """A new learner `name`; raises KeyError naming the known learners."""
    if name not in registered():
        if not name.isidentifier() or name.startswith("_"):
            raise KeyError(f"unknown learning method {name!r}; known: {', '.join(available())}")
        try:
            importlib.import_module(f"fedfleet.edge_agent.learners.{name}")
        except ModuleNotFoundError as exc:
            raise KeyError(f"unknown learning method {name!r}; known: {', '.join(available())}") from exc
    if name not in registered():
        raise KeyError(f"module for {name!r} registered no learner of that name")
    return registered()[name]()
