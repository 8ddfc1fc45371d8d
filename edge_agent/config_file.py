"""`agent.toml`: the file `fedfleet provision` writes and `fedfleet-agent --config` reads.

Every key is optional except `broker`, `id` and `data` (they may also come from the command line, which
wins). Paths are relative to the file's directory. Secrets live in files named here, never in the TOML
itself and never on a command line:

    broker = "mqtts://coordinator.lan:8883"
    fleet = "lab"
    id = "pi-07"
    key_file = "agent.key"                 # the agent's own 32-byte key, 64 hex digits
    coordinator_key_file = "coordinator.pub"  # the coordinator's Ed25519 public key, 64 hex digits
    data = "/var/lib/fedfleet-agent/data.npz"
    runtime = "onnxruntime"                # or "litert"
    profile = "rpi4b"
    threads = 1
    meter = "auto"
    ca_certs = "ca.pem"                    # CA of an mqtts:// broker
    username = "pi-07"                     # broker user, with the ACL
    password_file = "broker.password"
    state_dir = "/var/lib/fedfleet-agent"  # what the agent keeps across restarts (fedfleet.edge_agent.state)
    log_file = "/var/log/fedfleet-agent/agent.log"
    log_max_bytes = 1048576                # the log rotates at this size ...
    log_backups = 3                        # ... keeping this many old files

`load(path)` returns a dict of these keys with paths made absolute; a malformed file or field is a
ConfigError naming it. This module never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fedfleet.edge_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

STRINGS = ("broker", "fleet", "id", "runtime", "profile", "meter", "username")
PATHS = ("key_file", "coordinator_key_file", "data", "ca_certs", "password_file", "state_dir", "log_file")
# key -> (smallest, largest) allowed value; threads: four per core (fedfleet.edge_agent.agent_config.max_threads)
INTS = {"threads": (1, None), "log_max_bytes": (4096, 1 << 30), "log_backups": (0, 100)}
SECRET_KEYS = ("key", "password", "coordinator_key")  # refused: secrets go in files


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})") from None
    base = path.resolve().parent
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}: field {key!r}"
        if key in SECRET_KEYS:
            raise ConfigError(f"{where}: put secrets in a file and name it with {key}_file")
        if key in STRINGS or key in PATHS:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
            out[key] = str((base / value).resolve()) if key in PATHS else value
        elif key in INTS:
            lo, hi = INTS[key]
            if hi is None:
                from fedfleet.edge_agent.agent_config import max_threads

                hi = max_threads()
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ConfigError(f"{where} must be an integer from {lo} to {hi}, got {value!r}")
            out[key] = value
        else:
            known = sorted((*STRINGS, *PATHS, *INTS))
            raise ConfigError(f"{where} is unknown; the known fields are {', '.join(known)}")
    return out


def read_secret_file(path: str, field: str) -> str:
    """The stripped text of a secret file; ConfigError naming the field and file when unreadable or empty."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{field} {path}: {exc.strerror or exc}") from None
    if not text:
        raise ConfigError(f"{field} {path}: the file is empty")
    return text


def read_public_key(path: str) -> bytes:
    """A 32-byte public key from a file of 64 hex digits (the contract's `coordinator.pub`)."""
    from fedfleet.edge_agent.wire.signing import read_key_file

    return read_key_file(path, "--coordinator-key-file (coordinator_key_file)")

