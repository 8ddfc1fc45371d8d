"""Fleet files for `fedfleet emulate`: parse and validate a TOML fleet description, with errors that name
the file and the field.

    [job]                      # as in a job file (fedfleet.coordinator.job.config) minus agents/roster/alpha, set per group
    method = "fedavg"
    rounds = 5
    mode = "full"
    deadline_s = 20
    shard_mode = "sampled"     # optional: each agent draws its own shard (with replacement across agents), for
                               # fleets larger than the digits split can partition; shard_size = samples per agent
    [method]                   # strategy config, as in a job file
    [uplink]                   # uplink codec, as in a job file
    [continual]                # optional: a task schedule, as in a job file (coordinator/tasks/schedule.py)
    [aggregation]              # optional: mode = "async" and its settings, as in a job file (docs/async.md)
    [calibration]              # optional: the calibration workload's time on a Pi 4B (python -m fedfleet.tools.emulate.calibrate)
    reference_s = 0.144
    source = "measured: ..."
    [emulator]                 # optional
    processes = 2              # agent worker processes
    connect_timeout_s = 120

    [[group]]
    name = "pi4"               # agent ids are <name>-000, <name>-001, ...
    profile = "rpi4b"          # a firmware_profiles name or a .toml path
    count = 8
    partition = "iid"          # or "dirichlet" with alpha = 0.5
    dropout = 0.1              # per task: takes it and never answers
    availability = { mean_online_s = 60, mean_offline_s = 10 }   # random offline windows, or
    offline = [[10, 25]]       # fixed offline windows, seconds from start
    byzantine = "nan"          # "nan" | "noise" (agent-side corruption) or an attack for robust_fedavg/monna:
                               # alie, foe, sign_flip, mimic, label_flip
    noise_scale = 100          # with byzantine = "noise": noise norm / update norm
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.coordinator.job.config import (
    JobConfig,
    apply,
    apply_continual,
    check_aggregation,
    check_codec,
    read_toml,
)
from fedfleet.coordinator.strategies import check_method
from fedfleet.edge_agent.errors import ConfigError

AGENT_SIDE = ("nan", "noise")
ATTACKS = ("alie", "foe", "sign_flip", "mimic", "label_flip")
ROBUST_METHODS = ("robust_fedavg", "monna")
HORIZON_S = 24 * 3600.0  # random availability windows are drawn this far ahead
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,55}")
_GROUP_KEYS = {"name", "profile", "count", "partition", "alpha", "dropout", "availability", "offline", "byzantine",
               "noise_scale"}


@dataclass
class Group:
    name: str
    profile: str
    count: int
    partition: str = "iid"
    alpha: float = 0.0
    dropout: float = 0.0
    mean_online_s: float | None = None
    mean_offline_s: float | None = None
    offline: list[tuple[float, float]] = field(default_factory=list)
    byzantine: str | None = None
    noise_scale: float = 100.0

    def ids(self) -> list[str]:
        return [f"{self.name}-{i:03d}" for i in range(self.count)]

    def windows(self, index: int, seed: int) -> list[tuple[float, float]]:
        """Offline windows of agent `index` in this group: the fixed ones, or exponential on/off periods."""
        if self.mean_online_s is None or self.mean_offline_s is None:
            return list(self.offline)
        rng = np.random.Generator(np.random.PCG64([seed, index, sum(map(ord, self.name))]))
        out, t = [], 0.0
        while t < HORIZON_S and len(out) < 10_000:
            off = t + float(rng.exponential(self.mean_online_s))
            on = off + float(rng.exponential(self.mean_offline_s))
            out.append((off, on))
            t = on
        return out


@dataclass
class FleetConfig:
    job: JobConfig
    groups: list[Group]
    source: str = "<fleet>"
    reference_s: float | None = None
    reference_source: str | None = None
    processes: int = 2
    connect_timeout_s: float = 120.0

    def roster(self) -> list[str]:
        return [a for g in self.groups for a in g.ids()]

    def group_of(self) -> dict[str, Group]:
        return {a: g for g in self.groups for a in g.ids()}

    def byzantine_attacks(self) -> dict[str, str]:
        """Agents whose misbehaviour the coordinator's strategy tasks (attack name per agent)."""
        return {a: g.byzantine for g in self.groups if g.byzantine in ATTACKS for a in g.ids()}  # type: ignore[misc]


def _err(source: str, where: str, what: str) -> ConfigError:
    return ConfigError(f"{source}: field '{where}' {what}")


def _num(source: str, where: str, value: Any, *, lo: float, lo_incl: bool = True, hi: float | None = None,
         integer: bool = False) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value != value:
        raise _err(source, where, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < lo or (value == lo and not lo_incl) or (hi is not None and value > hi):
        rng = f"{'>=' if lo_incl else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise _err(source, where, f"must be {rng}, got {value!r}")
    return value


def _group(raw: Any, i: int, source: str, method: str) -> Group:
    w = f"group[{i}]"
    if not isinstance(raw, dict):
        raise _err(source, w, "must be a table ([[group]])")
    unknown = set(raw) - _GROUP_KEYS
    if unknown:
        raise _err(source, f"{w}.{sorted(unknown)[0]}", f"is unknown; known: {', '.join(sorted(_GROUP_KEYS))}")
    for key in ("name", "profile", "count"):
        if key not in raw:
            raise _err(source, f"{w}.{key}", "is required")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _err(source, f"{w}.name", f"must be 1-56 letters, digits, '-', '_' or '.', got {name!r}")
    profile = raw["profile"]
    if not isinstance(profile, str) or not profile:
        raise _err(source, f"{w}.profile", f"must be a profile name or .toml path, got {profile!r}")
    try:
        from fedfleet.edge_agent.profiles import load_profile

        load_profile(profile)
    except ConfigError as exc:
        raise _err(source, f"{w}.profile", f"cannot be loaded: {exc}") from None
    g = Group(name, profile, _num(source, f"{w}.count", raw["count"], lo=1, hi=100_000, integer=True))
    g.partition = raw.get("partition", "iid")
    if g.partition not in ("iid", "dirichlet"):
        raise _err(source, f"{w}.partition", f"must be 'iid' or 'dirichlet', got {g.partition!r}")
    if g.partition == "dirichlet":
        if "alpha" not in raw:
            raise _err(source, f"{w}.alpha", "is required with partition = 'dirichlet' (e.g. 0.5)")
        g.alpha = float(_num(source, f"{w}.alpha", raw["alpha"], lo=0, lo_incl=False))
    elif "alpha" in raw:
        raise _err(source, f"{w}.alpha", "applies only to partition = 'dirichlet'")
    g.dropout = float(_num(source, f"{w}.dropout", raw.get("dropout", 0.0), lo=0, hi=1))
    if "availability" in raw and "offline" in raw:
        raise _err(source, f"{w}.availability", "and 'offline' exclude each other; give one")
    if "availability" in raw:
        av = raw["availability"]
        keys = {"mean_online_s", "mean_offline_s"}
        if not isinstance(av, dict) or set(av) != keys:
            raise _err(source, f"{w}.availability", "must be { mean_online_s = S, mean_offline_s = S }")
        g.mean_online_s = float(_num(source, f"{w}.availability.mean_online_s", av["mean_online_s"], lo=0, lo_incl=False))
        g.mean_offline_s = float(_num(source, f"{w}.availability.mean_offline_s", av["mean_offline_s"], lo=0,
                                      lo_incl=False))
    if "offline" in raw:
        off = raw["offline"]
        if not isinstance(off, list):
            raise _err(source, f"{w}.offline", "must be a list of [from_s, to_s] windows")
        last = -1.0
        for j, win in enumerate(off):
            wj = f"{w}.offline[{j}]"
            if not isinstance(win, list) or len(win) != 2:
                raise _err(source, wj, f"must be [from_s, to_s], got {win!r}")
            a = float(_num(source, wj, win[0], lo=0))
            b = float(_num(source, wj, win[1], lo=a, lo_incl=False))
            if a < last:
                raise _err(source, wj, "must start after the previous window ends")
            g.offline.append((a, b))
            last = b
    if "byzantine" in raw:
        b = raw["byzantine"]
        if b not in AGENT_SIDE + ATTACKS:
            raise _err(source, f"{w}.byzantine", f"must be one of {', '.join(AGENT_SIDE + ATTACKS)}, got {b!r}")
        if b in ATTACKS and method not in ROBUST_METHODS:
            raise _err(source, f"{w}.byzantine", f"{b!r} is tasked by the strategy: needs job.method in "
                       f"{ROBUST_METHODS}, not {method!r}; or use 'nan' / 'noise'")
        g.byzantine = b
    g.noise_scale = float(_num(source, f"{w}.noise_scale", raw.get("noise_scale", 100.0), lo=0, lo_incl=False))
    return g


def parse(data: dict[str, Any], source: str) -> FleetConfig:
    known = {"job", "method", "uplink", "calibration", "emulator", "group", "continual", "aggregation"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; use {', '.join(sorted(known))}")
    for section in ("job", "method", "uplink", "calibration", "emulator"):
        if section in data and not isinstance(data[section], dict):
            raise _err(source, section, f"must be a table ([{section}])")
    job_values = dict(data.get("job", {}))
    for key in ("agents", "roster", "alpha"):
        if key in job_values:
            raise _err(source, f"job.{key}", "is set by the [[group]] tables in a fleet file; remove it")
    job = apply(JobConfig(mode="full"), job_values, source)
    if "method" in data:
        check_method(job.method, data["method"], f"{source}: [method]")
        job.method_config = {**job.method_config, **data["method"]}
    if "uplink" in data:
        job.uplink = check_codec(data["uplink"], f"{source}: [uplink]")
    if "continual" in data:
        apply_continual(job, data["continual"], source, rounds_set="rounds" in job_values)
    if "aggregation" in data:
        table = check_aggregation(data["aggregation"], source)
        job.aggregation = table if table["mode"] == "async" else None
    raw_groups = data.get("group")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise _err(source, "group", "must list at least one [[group]] of agents")
    groups = [_group(g, i, source, job.method) for i, g in enumerate(raw_groups)]
    names = [g.name for g in groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err(source, f"group[{names.index(dup[0], names.index(dup[0]) + 1)}].name", f"repeats {dup[0]!r}")
    cfg = FleetConfig(job, groups, source)
    job.agents = sum(g.count for g in groups)
    job.roster = cfg.roster()
    cal = data.get("calibration", {})
    if set(cal) - {"reference_s", "source"}:
        raise _err(source, f"calibration.{sorted(set(cal) - {'reference_s', 'source'})[0]}", "is unknown")
    if "reference_s" in cal:
        cfg.reference_s = float(_num(source, "calibration.reference_s", cal["reference_s"], lo=0, lo_incl=False))
        src = cal.get("source")
        if not isinstance(src, str) or len(src.strip()) < 8:
            raise _err(source, "calibration.source", "must say where reference_s comes from (e.g. 'measured: ...')")
        cfg.reference_source = src
    emu = data.get("emulator", {})
    if set(emu) - {"processes", "connect_timeout_s"}:
        raise _err(source, f"emulator.{sorted(set(emu) - {'processes', 'connect_timeout_s'})[0]}", "is unknown")
    cfg.processes = int(_num(source, "emulator.processes", emu.get("processes", 2), lo=1, hi=256, integer=True))
    cfg.connect_timeout_s = float(_num(source, "emulator.connect_timeout_s", emu.get("connect_timeout_s", 120.0),
                                       lo=0, lo_incl=False))
    attacks = cfg.byzantine_attacks()
    if attacks:
        job.method_config = {**job.method_config, "byzantine": attacks}
    return cfg


def load(path: str | Path) -> FleetConfig:
    return parse(read_toml(path, "fleet file"), str(path))
