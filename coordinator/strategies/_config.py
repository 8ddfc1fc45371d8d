"""The typed [method] configuration of the strategies: the field constructors, the checks of a job's [method] table
against a strategy's `Config` dataclass, and the defaults a job's method configuration carries.

Every strategy module defines a frozen `Config` dataclass: one documented field per setting the strategy or its
learner reads. A field made with `own(...)` keeps its default out of the job's method configuration (the dict
the strategy is built with, stores in checkpoints and sends on to agents): the strategy or the learner applies
that default itself, and the field travels only when the job sets it. The other fields' defaults always travel.

No torch here: the job config checks [method] tables with it. The module name starts with "_" so it is not
taken for a method.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from fedfleet.edge_agent.errors import ConfigError

# FedZip is the default uplink of methods that upload updates (deltas): at z = 0.03 with error feedback it
# kept MNIST accuracy within 1 point of dense float32 (0.916 against 0.921) at 130x less uplink
# (`fedfleet bench fedzip`, 40 rounds).
# Methods that upload models, iterates or surrogate weights (MoNNA, FZooS, FedAMD) and the robust
# aggregators (which compare raw updates) send dense. FedZO sends its d floats dense too, as the spec's
# FedZO does (and as `fedfleet bench zo` measures it); FedZO with a FedZip uplink is `[uplink] name = "fedzip"`.
FEDZIP_UPLINK: dict[str, Any] = {"name": "fedzip", "z": 0.03, "k": 3, "encoding": "e4", "error_feedback": True}
NO_UPLINK: dict[str, Any] = {"name": "none"}

# keys a strategy is built with that are not [method] fields: the job's seed and uplink codec
BUILD_KEYS = ("seed", "uplink")

_OWN = "own"
_CHECK = "check"
_MISSING: Any = dataclasses.MISSING


def own(default: Any = _MISSING, *, factory: Any = _MISSING, check: tuple[Any, str] | None = None) -> Any:
    """A field whose default the strategy (or its learner) applies itself: the job's method configuration
    carries it only when the job sets it. `check` is (test, hint) for the value's range."""
    meta: dict[str, Any] = {_OWN: True}
    if check is not None:
        meta[_CHECK] = check
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def ranged(default: Any = _MISSING, *, factory: Any = _MISSING, check: tuple[Any, str]) -> Any:
    """A field whose default travels in the job's method configuration, with a range check (test, hint)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={_CHECK: check})


def _finite(v: Any) -> bool:
    return math.isfinite(float(v))


POSITIVE = (lambda v: _finite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
FRACTION = (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
AT_LEAST_0 = (lambda v: v >= 0, "an integer >= 0")

# the ranges of the fields several methods share (what the job config checked for every method before the
# strategies declared their fields); a field's own `check` replaces its name's entry
SHARED: dict[str, tuple[Any, str]] = {
    "lr": POSITIVE,
    "server_lr": POSITIVE,
    "mu": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "beta": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "lr_decay": POSITIVE,
    "explore_radius": POSITIVE,
    "init_radius": POSITIVE,
    "epochs": AT_LEAST_1,
    "batch": AT_LEAST_1,
    "local_steps": AT_LEAST_1,
    "directions": AT_LEAST_1,
    "participants": AT_LEAST_1,
    "large_batch": (lambda v: v >= 0, "an integer >= 0 (0: the whole local set)"),
    "chunk": AT_LEAST_1,
    "rff_features": AT_LEAST_1,
    "gp_restarts": AT_LEAST_0,
    "f": AT_LEAST_0,
}


def fields(config: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of a strategy's Config dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(config)}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    raise TypeError(f"Config field {f.name!r} needs a default")


def carried_defaults(config: type) -> dict[str, Any]:
    """The defaults a job's method configuration carries: every field not made with `own`, in field order."""
    return {f.name: _default(f) for f in dataclasses.fields(config) if not f.metadata.get(_OWN)}


def settings(config: type, values: dict[str, Any]) -> Any:
    """A Config instance from a strategy's method configuration (keys that are not fields are left out)."""
    known = fields(config)
    return config(**{k: v for k, v in values.items() if k in known})


def _kind_ok(kind: Any, value: Any) -> bool:
    """Whether `value` is of the annotated `kind` (int, float, str, bool, Any, list[...], dict[...],
    Literal[...] and unions of them)."""
    if kind is Any:
        return True
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return any(_kind_ok(k, value) for k in typing.get_args(kind))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        return isinstance(value, list) and all(_kind_ok(item, v) for v in value)
    if origin is dict:
        key, item = typing.get_args(kind) or (Any, Any)
        return isinstance(value, dict) and all(_kind_ok(key, k) and _kind_ok(item, v) for k, v in value.items())
    return isinstance(value, kind)


def describe(kind: Any) -> str:
    """A few words for an annotated kind, for error messages."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(k) for k in typing.get_args(kind) if k is not type(None))
    if origin is Literal:
        return " or ".join(repr(a).replace("True", "true").replace("False", "false") for a in typing.get_args(kind))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, "any value")


def check_table(method: str, config: type, table: dict[str, Any], source: str) -> dict[str, Any]:
    """Check a job's [method] table against the method's Config: each key a field, each value of the field's
    type and range; a one-line ConfigError naming the field otherwise. Returns the table unchanged."""
    known = fields(config)
    hints = typing.get_type_hints(config)
    for key, value in table.items():
        if key not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"{source}: unknown field '{key}' for method {method!r}; its fields: {listed}")
        test, hint = known[key].metadata.get(_CHECK) or SHARED.get(key, (None, ""))
        kind = hints[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not _kind_ok(kind, value) or (test is not None and number and not test(value)):
            raise ConfigError(f"{source}: field '{key}' must be {hint or describe(kind)}, got {value!r}")
    return table
