"""The firmware-profile schema: load a device TOML, check every field, and return a typed `Profile`.

Edge-safe: standard library only (tomllib on 3.11+, the `tomli` backport on 3.10 when installed).

File format (one TOML per board, ``firmware_profiles/<name>.toml``)::

    schema = 1
    name = "rpi4b"                       # must equal the file stem
    title = "Raspberry Pi 4 Model B (4 GB)"

    [platform]
    arch = { value = "aarch64", source = "..." }
    python = { value = "3.11", source = "..." }

    [cpu]
    cores = { value = 4, source = "..." }
    clock_ghz = { value = 1.8, source = "..." }
    ram_mb = { value = 4096, source = "..." }

    [runtime]
    preferred = "onnxruntime"            # or "litert": a project choice, so a plain string
    threads = { value = 4, source = "..." }

    [compute]
    speed = { value = 1.0, source = "..." }        # fp32 throughput relative to REFERENCE (Pi 4B = 1.0)
    int8_factor = { value = 1.6, source = "..." }  # int8 speed-up over fp32 on this CPU

    [power]                              # whole board, watts at the 5 V input, headless
    idle_w = { value = 2.7, source = "..." }
    cpu_active_w = { value = 6.4, source = "..." } # all cores busy
    gpu_active_w = { value = 10.0, source = "..." } # optional: boards with a usable GPU

    [radio]                              # marginal energy above idle per megabyte (1e6 bytes)
    tx_j_per_mb = { value = 0.08, source = "..." }
    rx_j_per_mb = { value = 0.06, source = "..." }

    [link]
    uplink_mbps = { value = 60, source = "..." }
    downlink_mbps = { value = 80, source = "..." }
    rtt_ms = { value = 3, source = "..." }
    loss = { value = 0.001, source = "..." }       # packet-loss fraction in [0, 1)

Rule: every number is an inline table ``{ value = ..., source = "..." }``. The source names a public
datasheet or benchmark, or says "measured" and how, or says "estimate" and from what. Strings that are
facts about the device (arch, python) carry a source too; `runtime.preferred` is a project choice.
Unknown sections or keys are refused so typos do not pass silently.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ProfileError(ValueError):
    """A profile file is missing, not TOML, or has a field out of range; the message names the file and field.
    (The edge agent turns it into its ConfigError: `fedfleet.edge_agent.profiles`.)"""


if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - exercised on Python 3.10 devices only
    try:
        import tomli as _toml
    except ImportError:  # pragma: no cover
        _toml = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
REFERENCE = "rpi4b"  # compute.speed == 1.0 is a Raspberry Pi 4 Model B at 1.8 GHz
RUNTIMES = ("onnxruntime", "litert")
ARCHES = ("aarch64", "armv7l", "x86_64")
_MIN_SOURCE_CHARS = 8

# section -> key -> (kind, required, lower bound, upper bound, lower bound inclusive)
_Spec = tuple[str, bool, float | None, float | None, bool]
FIELDS: dict[str, dict[str, _Spec]] = {
    "platform": {
        "arch": ("str", True, None, None, True),
        "python": ("str", True, None, None, True),
    },
    "cpu": {
        "cores": ("int", True, 1, 256, True),
        "clock_ghz": ("float", True, 0, 10, False),
        "ram_mb": ("int", True, 64, 1 << 22, True),
    },
    "runtime": {
        "preferred": ("choice", True, None, None, True),
        "threads": ("int", True, 1, 256, True),
    },
    "compute": {
        "speed": ("float", True, 0, 1000, False),
        "int8_factor": ("float", True, 0, 100, False),
    },
    "power": {
        "idle_w": ("float", True, 0, 1000, False),
        "cpu_active_w": ("float", True, 0, 1000, False),
        "gpu_active_w": ("float", False, 0, 1000, False),
    },
    "radio": {
        "tx_j_per_mb": ("float", True, 0, 1000, True),
        "rx_j_per_mb": ("float", True, 0, 1000, True),
    },
    # optional: independent published measurements of the whole board (not the figures above), to check the
    # power model against (`fedfleet bench energy`)
    "published": {
        "idle_w": ("float", False, 0, 1000, False),
        "load_w": ("float", False, 0, 1000, False),
    },
    "link": {
        "uplink_mbps": ("float", True, 0, 1e6, False),
        "downlink_mbps": ("float", True, 0, 1e6, False),
        "rtt_ms": ("float", True, 0, 1e5, True),
        "loss": ("float", True, 0, 1, True),
    },
}
_TOP = {"schema", "name", "title", *FIELDS}
OPTIONAL_SECTIONS = ("published",)


@dataclass(frozen=True)
class Profile:
    """One device, every number in SI-ish units named by the field. `sources` maps "section.key" -> text."""

    name: str
    title: str
    path: Path | None
    arch: str
    python: str
    cpu_cores: int
    cpu_clock_ghz: float
    ram_mb: int
    runtime: str
    threads: int
    speed: float
    int8_factor: float
    idle_w: float
    cpu_active_w: float
    gpu_active_w: float | None
    radio_tx_j_per_mb: float
    radio_rx_j_per_mb: float
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    loss: float
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    published_idle_w: float | None = None  # [published]: an independent measurement to check the model against
    published_load_w: float | None = None

    def compute_seconds(self, reference_seconds: float, *, int8: bool = False) -> float:
        """Time this device needs for work that takes `reference_seconds` on the reference board."""
        rate = self.speed * (self.int8_factor if int8 else 1.0)
        return reference_seconds / rate

    def transfer_seconds(self, nbytes: int, *, up: bool) -> float:
        """Serialisation time of `nbytes` on this link plus one round trip (no loss)."""
        mbps = self.uplink_mbps if up else self.downlink_mbps
        return nbytes * 8 / (mbps * 1e6) + self.rtt_ms / 1000.0

    def radio_joules(self, bytes_up: int, bytes_down: int) -> float:
        """Marginal radio energy above idle for the given traffic."""
        return bytes_up / 1e6 * self.radio_tx_j_per_mb + bytes_down / 1e6 * self.radio_rx_j_per_mb


def _where(source: str, dotted: str) -> str:
    return f"{source}: field '{dotted}'"


def _number(raw: Any, kind: str, lo: float | None, hi: float | None, lo_incl: bool, where: str) -> float | int:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ProfileError(f"{where}: value must be a number, got {raw!r}")
    if kind == "int" and not isinstance(raw, int):
        raise ProfileError(f"{where}: value must be a whole number, got {raw!r}")
    if raw != raw or raw in (float("inf"), float("-inf")):
        raise ProfileError(f"{where}: value must be finite, got {raw!r}")
    if lo is not None and (raw < lo or (raw == lo and not lo_incl)):
        rel = ">=" if lo_incl else ">"
        raise ProfileError(f"{where}: value must be {rel} {lo}, got {raw!r}")
    if hi is not None and raw > hi:
        raise ProfileError(f"{where}: value must be <= {hi}, got {raw!r}")
    return raw


def _field(raw: Any, spec: _Spec, where: str) -> tuple[Any, str]:
    kind, _, lo, hi, lo_incl = spec
    if kind == "choice":
        if not isinstance(raw, str) or raw not in RUNTIMES:
            raise ProfileError(f"{where}: must be one of {list(RUNTIMES)}, got {raw!r}")
        return raw, ""
    hint = 'write it as { value = ..., source = "datasheet/benchmark name, or measured: how" }'
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: missing source; {hint}")
    extra = set(raw) - {"value", "source"}
    if extra:
        raise ProfileError(f"{where}: unknown keys {sorted(extra)}; only 'value' and 'source' are allowed")
    if "value" not in raw:
        raise ProfileError(f"{where}: missing 'value'; {hint}")
    src = raw.get("source")
    if not isinstance(src, str) or len(src.strip()) < _MIN_SOURCE_CHARS:
        raise ProfileError(f"{where}: missing or empty 'source'; {hint}")
    value = raw["value"]
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ProfileError(f"{where}: value must be a non-empty string, got {value!r}")
    else:
        value = _number(value, kind, lo, hi, lo_incl, where)
        if kind == "float":
            value = float(value)
    return value, src.strip()


def validate(data: dict[str, Any], source: str) -> Profile:
    """Check a parsed profile and build a `Profile`. `source` names the file in every error message."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a TOML table, got {type(data).__name__}")
    unknown = set(data) - _TOP
    if unknown:
        raise ProfileError(f"{source}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(_TOP)}")
    if data.get("schema") != SCHEMA_VERSION:
        raise ProfileError(f"{_where(source, 'schema')}: must be {SCHEMA_VERSION}, got {data.get('schema')!r}")
    for key in ("name", "title"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ProfileError(f"{_where(source, key)}: required non-empty string")
    name = data["name"]
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ProfileError(f"{_where(source, 'name')}: use lower-case letters, digits, '-' or '_', got {name!r}")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for section, keys in FIELDS.items():
        table = data.get(section, {} if section in OPTIONAL_SECTIONS else None)
        if not isinstance(table, dict):
            raise ProfileError(f"{_where(source, section)}: missing section [{section}]")
        extra = set(table) - set(keys)
        if extra:
            raise ProfileError(
                f"{_where(source, f'{section}.{sorted(extra)[0]}')}: unknown key; allowed in [{section}]: {sorted(keys)}"
            )
        for key, spec in keys.items():
            dotted = f"{section}.{key}"
            if key not in table:
                if spec[1]:
                    raise ProfileError(f"{_where(source, dotted)}: required field is missing")
                values[dotted] = None
                continue
            values[dotted], src = _field(table[key], spec, _where(source, dotted))
            if src:
                sources[dotted] = src

    if values["platform.arch"] not in ARCHES:
        raise ProfileError(f"{_where(source, 'platform.arch')}: must be one of {list(ARCHES)}")
    if not re.fullmatch(r"3\.\d{1,2}", values["platform.python"]):
        raise ProfileError(f"{_where(source, 'platform.python')}: write a version like \"3.11\"")
    if values["runtime.threads"] > values["cpu.cores"]:
        raise ProfileError(
            f"{_where(source, 'runtime.threads')}: {values['runtime.threads']} threads exceed "
            f"{values['cpu.cores']} cores; oversubscribing a small board slows it down"
        )
    if values["power.cpu_active_w"] < values["power.idle_w"]:
        raise ProfileError(f"{_where(source, 'power.cpu_active_w')}: must be >= power.idle_w (whole-board power)")
    if values["link.loss"] >= 1:
        raise ProfileError(f"{_where(source, 'link.loss')}: a fraction in [0, 1), got {values['link.loss']}")

    path = Path(source) if source.endswith(".toml") else None
    if path is not None and path.stem != name:
        raise ProfileError(f"{_where(source, 'name')}: {name!r} must equal the file name {path.stem!r}")
    return Profile(
        name=name, title=data["title"].strip(), path=path,
        arch=values["platform.arch"], python=values["platform.python"],
        cpu_cores=values["cpu.cores"], cpu_clock_ghz=values["cpu.clock_ghz"], ram_mb=values["cpu.ram_mb"],
        runtime=values["runtime.preferred"], threads=values["runtime.threads"],
        speed=values["compute.speed"], int8_factor=values["compute.int8_factor"],
        idle_w=values["power.idle_w"], cpu_active_w=values["power.cpu_active_w"],
        gpu_active_w=values["power.gpu_active_w"],
        radio_tx_j_per_mb=values["radio.tx_j_per_mb"], radio_rx_j_per_mb=values["radio.rx_j_per_mb"],
        uplink_mbps=values["link.uplink_mbps"], downlink_mbps=values["link.downlink_mbps"],
        rtt_ms=values["link.rtt_ms"], loss=values["link.loss"],
        sources=sources, published_idle_w=values["published.idle_w"], published_load_w=values["published.load_w"],
    )


def _shipped_dir() -> Path:
    return Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in _shipped_dir().glob("*.toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name ("rpi4b") or any profile file by path, and validate it."""
    if _toml is None:  # pragma: no cover
        raise ProfileError("reading profiles on Python 3.10 needs the 'tomli' package: pip install tomli")
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(name_or_path)
    else:
        path = _shipped_dir() / f"{text}.toml"
        if not path.is_file():
            raise ProfileError(f"unknown profile {text!r}; shipped profiles: {available()}, or pass a .toml path")
    if not path.is_file():
        raise ProfileError(f"{path}: profile file not found")
    try:
        data = _toml.loads(path.read_text(encoding="utf-8"))
    except (_toml.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc}); fix the syntax") from exc
    return validate(data, str(path))
