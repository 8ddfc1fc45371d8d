"""Coordinator strategies, one module per method, and what a job asks of its method.

A method is one public module here (no leading "_") with one registered `Strategy` subclass; the class declares
its typed `Config` and how it runs (`learner`, `package_mode`, `linear_head`, `default_uplink`,
`continual`), so adding a method means adding one module: no list to edit.

- `available()`: the public method names, found without importing any strategy (or torch);
- `spec(name)`: the strategy class; `check_method(name, table, source)`: a [method] table against its Config;
- `method_config(job)`: the strategy's configuration for a job (what agents receive in their task configs);
- `build(job, state)`: the job's strategy; `package_mode(job)`, `head_hidden(job)`: the model it trains.

Importing this package does not import torch; `Strategy`, `ClientResult`, `TaskSpec`, `register`,
`registered` and `create` load the strategy base on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedfleet.coordinator.strategies import _config
from fedfleet.coordinator.tasks.names import CUSTOM as CUSTOM_TASK
from fedfleet.coordinator.tasks.names import DIFFUSION as DIFFUSION_TASK
from fedfleet.coordinator.tasks.names import METHOD_DEFAULTS as TASK_METHOD_DEFAULTS
from fedfleet.edge_agent.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fedfleet.coordinator.strategies.base import Strategy

__all__ = ["ClientResult", "Strategy", "TaskSpec", "register", "registered", "create", "available", "spec", "build",
           "check_method", "method_config", "package_mode", "head_hidden"]

_BASE_NAMES = ("ClientResult", "Strategy", "TaskSpec", "register", "registered")


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        from fedfleet.coordinator.strategies import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> list[str]:
    """The public methods: the modules of this package without a leading "_" (listed, not imported)."""
    import pkgutil

    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_"))


def _registered() -> dict[str, type[Strategy]]:
    from fedfleet.coordinator.strategies.base import registered

    return registered()


def known(name: str) -> bool:
    """A public method: a module here, or a strategy registered at run time by code that imported the base."""
    if not isinstance(name, str) or not name or name.startswith("_"):
        return False
    if name in available():
        return True
    import sys

    return "fedfleet.coordinator.strategies.base" in sys.modules and name in _registered()


def spec(name: str) -> type[Strategy]:
    """The strategy class of a public method; ConfigError naming the field 'method' otherwise."""
    if not known(name):
        raise ConfigError(f"field 'method' must be one of {', '.join(available())}, got {name!r}")
    if name not in _registered():
        importlib.import_module(f"fedfleet.coordinator.strategies.{name}")
    found = _registered().get(name)
    if found is None:
        raise ConfigError(f"field 'method': module {name!r} registers no strategy of that name; fix its `name`")
    return found


def create(name: str, state: dict[str, torch.Tensor], **config: Any) -> Strategy:
    """A strategy of method `name` built from `config` as given (no defaults added); KeyError for an unknown
    method. Jobs build theirs with `build`."""
    try:
        cls = spec(name)
    except ConfigError as exc:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(available())}") from exc
    return cls(state, **config)


def check_method(name: str, table: dict[str, Any], source: str) -> dict[str, Any]:
    """Check a [method] table against method `name`'s Config: a one-line ConfigError naming the unknown key
    (and the method's fields) or the field whose value is of the wrong type or out of range."""
    return _config.check_table(name, spec(name).Config, table, source)


def uplink(job: Any) -> dict[str, Any]:
    """The uplink codec spec of a job: its [uplink] table, else its method's default."""
    if job.uplink is not None:
        return dict(job.uplink)
    return dict(spec(job.method).default_uplink)


def method_config(job: Any, task_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The strategy's configuration for a job: the method's Config defaults, overridden by the task's
    defaults (`task_defaults`, else the job's task's: `fedfleet.coordinator.tasks.names.METHOD_DEFAULTS`) and
    by the job's [method] table (checked against the Config), and the uplink codec. Agents receive its keys
    in their task configs; checkpoints store it."""
    cls = spec(job.method)
    check_method(job.method, dict(job.method_config), "[method]")
    if task_defaults is None:
        task_defaults = TASK_METHOD_DEFAULTS.get(job.task, {})
    return {**_config.carried_defaults(cls.Config), **task_defaults, **job.method_config, "uplink": uplink(job)}


def build(job: Any, state: dict[str, torch.Tensor]) -> Strategy:
    """The job's strategy, started from `state` (the model's initial trainable tensors)."""
    return spec(job.method)(state, **method_config(job), seed=job.seed)


def package_mode(job: Any) -> str:
    """The package a job's method trains: "custom" / "diffusion" for those tasks, "lora" for the LoRA methods
    (and only for them), else the job's mode; ConfigError naming the field when they do not fit. The task's
    own cross-field checks are the job config's (`fedfleet.coordinator.job.config.check_task`)."""
    if job.task == CUSTOM_TASK:
        return CUSTOM_TASK
    if job.task == DIFFUSION_TASK or job.mode == "diffusion":
        return "diffusion"
    wanted = spec(job.method).package_mode
    if wanted is not None:
        if job.mode not in ("transfer", wanted):  # "transfer" is the default: the field was left unset
            raise ConfigError(f"field 'mode': method {job.method!r} fine-tunes LoRA adapters on a frozen "
                              f"pre-trained MLP; use mode {wanted!r} (or leave the default)")
        return wanted
    if job.mode == "lora":
        lora = [m for m in available() if spec(m).package_mode == "lora"]
        raise ConfigError(f"field 'mode': 'lora' packages train with {', '.join(lora)}, not {job.method!r}")
    return str(job.mode)


def head_hidden(job: Any) -> int:
    """The hidden width of the head the job's method trains when the job leaves `hidden` at 0 (0: a linear
    head): 32 for digits, 128 for mnist, none for a method with `linear_head`."""
    if job.hidden:
        return int(job.hidden)
    if spec(job.method).linear_head:
        return 0
    return 32 if job.dataset == "digits" else 128
