"""Writing files that devices and the broker will trust: no symlink is ever followed, secrets are 0600 from
the moment they exist, and text that ends up in a config or a systemd unit carries no control characters.

`write_file(path, data, secret=..., replace=...)` creates a fresh file next to `path` with O_CREAT | O_EXCL |
O_NOFOLLOW (its mode set at creation), fsyncs it and renames it over `path`: a symlink planted at `path` is
replaced, never written through. Without `replace`, an existing `path` is an error. `make_dir` creates a
directory (mode 0700 by default) and refuses one that is a symlink. `check_text` refuses control characters
(newline, carriage return, tab, NUL, DEL, ...) in ids and paths with one line naming the option.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from fedfleet.edge_agent.errors import ConfigError


def check_text(value: str, what: str) -> str:
    """`value` unless it holds a control character (it would inject lines into a config or a unit)."""
    bad = next((c for c in str(value) if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ConfigError(f"{what} {str(value)[:60]!r} holds a control character ({bad!r}); refused")
    return value


def make_dir(path: str | Path, what: str, mode: int = 0o700) -> Path:
    """Create `path` (and its parents) if missing; refuse a symlink or a non-directory there."""
    p = Path(check_text(str(path), what))
    if p.is_symlink():
        raise ConfigError(f"{what} {p} is a symlink; refused (give the real directory)")
    try:
        p.mkdir(parents=True, exist_ok=True, mode=mode)
    except FileExistsError:
        raise ConfigError(f"{what} {p} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{what} {p}: {exc.strerror}") from None
    if not stat.S_ISDIR(os.lstat(p).st_mode):
        raise ConfigError(f"{what} {p} is not a directory")
    return p


def write_file(path: str | Path, data: str | bytes, *, secret: bool = False, replace: bool = False,
               mode: int | None = None) -> Path:
    """Write `data` to `path` atomically without following a symlink; 0600 if `secret` (else 0644 or `mode`)."""
    p = Path(path)
    if not replace and (p.exists() or p.is_symlink()):
        raise ConfigError(f"{p} exists; refused to overwrite it")
    mode = 0o600 if secret else (0o644 if mode is None else mode)
    raw = data.encode() if isinstance(data, str) else data
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, mode)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot create it ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask may have narrowed a public file's mode
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)  # replaces a symlink at `p` itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p
