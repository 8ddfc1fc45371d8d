"""What an agent keeps across restarts and reboots, in its state directory (systemd's StateDirectory).

- `state.json`: the tasks already answered (run, round, phase), so a task the broker redelivers to the
  persistent session after a restart is not trained and uploaded twice; counters (rounds done, tasks
  dropped); the digest of the model package in use, and the run and publication time of the package
  publication it came with (a package older than that is refused after a restart too).
- `package.bin`: the last model package that loaded, so a restarted agent can take the next task at
  once instead of waiting for the coordinator to send the package again. It is checked against the
  digest in `state.json` before use, and is only ever a package this agent accepted before.
- `feedback-<method>.npz`: FedZip's error-feedback residuals, without which the first upload after a
  restart would silently drop what earlier rounds held back.

Every file is written to a temporary name and renamed, so a power cut leaves the old or the new file,
never half of one. A missing or unreadable file means "nothing kept" (logged), never a crash. A `state.json`
that does not hold what this module writes (not JSON, not an object, a field of the wrong type or out of
range, e.g. `[]` or `{"rounds_done": 1e400}`) is set aside, renamed `state.json.corrupt-<unix time>`, and
the agent starts fresh; `set_aside` says so, and the agent puts it in its status (`warning`), so a damaged
file never becomes a crash loop under `Restart=always`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.npz import read_npz

log = logging.getLogger(__name__)

MAX_DONE = 512  # answered task keys kept (a few hundred rounds is far beyond any redelivery window)
MAX_COUNT = (1 << 53) - 1
MAX_FEEDBACK_BYTES = 512 << 20  # error-feedback residuals of one method (the size of its update)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _count(value: object, field: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{field} is {str(value)[:40]}, not a count")
    return value


def _parse(data: object) -> dict:
    """The fields of a state.json, checked; ValueError naming the first one that is not what `save` writes."""
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not an object")
    done = data.get("done", [])
    if not isinstance(done, list):
        raise ValueError("done is not a list")
    keys = []
    for k in done[-MAX_DONE:]:
        if (not isinstance(k, list) or len(k) != 3 or not isinstance(k[0], str) or len(k[0]) > 128
                or type(k[1]) is not int or type(k[2]) is not int or not -1 <= k[1] < 1 << 31 or not 0 <= k[2] < 64):
            raise ValueError(f"done holds {str(k)[:60]}, not a [run, round, phase]")
        keys.append((k[0], k[1], k[2]))
    digest = data.get("model_digest")
    if digest is not None and (not isinstance(digest, str) or not _HEX64.fullmatch(digest)):
        raise ValueError("model_digest is not a SHA-256 hex digest")
    run, sent = data.get("package_run"), data.get("package_sent")
    if run is not None and (not isinstance(run, str) or len(run) > 128):
        raise ValueError("package_run is not a run id")
    if sent is not None and (type(sent) not in (int, float) or not math.isfinite(sent) or not 0 <= sent < 1e11):
        raise ValueError("package_sent is not a time")
    return {"done": keys, "rounds_done": _count(data.get("rounds_done", 0), "rounds_done"),
            "tasks_dropped": _count(data.get("tasks_dropped", 0), "tasks_dropped"), "model_digest": digest,
            "package_run": run, "package_sent": None if sent is None else float(sent)}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class AgentState:
    """The state directory of one agent. Created (mode 0700) if absent."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"--state-dir {self.dir}: not a directory (a file is in the way)")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"--state-dir {self.dir}: cannot create it ({exc.strerror or exc})") from None
        self.done: list[tuple[str, int, int]] = []
        self.rounds_done = 0
        self.tasks_dropped = 0
        self.model_digest: str | None = None
        self.package_run: str | None = None  # the run and publication time of the package in use
        self.package_sent: float | None = None
        self.set_aside: str | None = None  # why state.json was set aside at start (None: it was fine or absent)
        self._load()

    def _load(self) -> None:
        path = self.dir / "state.json"
        if not path.exists():
            return
        try:
            fields = _parse(json.loads(path.read_bytes()))
        except (OSError, ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            n = 1
            while aside.exists():  # never over an earlier one
                aside, n = path.with_name(f"{path.name}.corrupt-{int(time.time())}-{n}"), n + 1
            try:
                os.replace(path, aside)
                where = f"set aside as {aside.name}"
            except OSError as move:
                where = f"could not be set aside ({move.strerror})"
            self.set_aside = f"{path.name} was unreadable ({str(exc)[:200]}); {where}; started fresh"
            log.warning("state %s: %s", self.dir, self.set_aside)
            return
        self.done = fields["done"]
        self.rounds_done, self.tasks_dropped = fields["rounds_done"], fields["tasks_dropped"]
        self.model_digest = fields["model_digest"]
        self.package_run, self.package_sent = fields["package_run"], fields["package_sent"]

    def save(self, done: set[tuple[str, int, int]] | list[tuple[str, int, int]], rounds_done: int,
             tasks_dropped: int) -> None:
        keys = list(done) if isinstance(done, list) else sorted(done, key=lambda k: (k[0], k[1], k[2]))
        self.done = keys[-MAX_DONE:]
        self.rounds_done, self.tasks_dropped = rounds_done, tasks_dropped
        body = {"done": [list(k) for k in self.done], "rounds_done": rounds_done, "tasks_dropped": tasks_dropped,
                "model_digest": self.model_digest, "package_run": self.package_run, "package_sent": self.package_sent}
        _atomic_write(self.dir / "state.json", json.dumps(body).encode())

    # -------------------------------------------------------------- the model package
    def save_package(self, digest: str, blob: bytes) -> None:
        _atomic_write(self.dir / "package.bin", blob)
        self.model_digest = digest
        self.save(self.done, self.rounds_done, self.tasks_dropped)

    def save_stamp(self, run: str | None, sent: float | None) -> None:
        """The run and publication time of the package in use (newer publications only move it forward)."""
        if (run, sent) != (self.package_run, self.package_sent):
            self.package_run, self.package_sent = run, sent
            self.save(self.done, self.rounds_done, self.tasks_dropped)

    def package(self) -> tuple[str, bytes] | None:
        """(digest, blob) of the kept package if it is there and matches its digest, else None."""
        path = self.dir / "package.bin"
        if self.model_digest is None or not path.exists():
            return None
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != self.model_digest:
            log.warning("kept package %s does not match its digest; ignoring it", path)
            return None
        return self.model_digest, blob

    # -------------------------------------------------------------- error feedback
    def _feedback_path(self, method: str) -> Path:
        return self.dir / f"feedback-{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}.npz"

    def save_feedback(self, method: str, residual: dict[str, np.ndarray]) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, **{name: np.asarray(r, np.float32) for name, r in residual.items()})
        _atomic_write(self._feedback_path(method), buf.getvalue())

    def feedback(self, method: str) -> dict[str, np.ndarray]:
        path = self._feedback_path(method)
        if not path.exists():
            return {}
        try:  # sizes checked before anything is allocated (fedfleet.edge_agent.npz)
            return {name: a.astype(np.float32) for name, a in read_npz(path, max_bytes=MAX_FEEDBACK_BYTES).items()}
        except (OSError, ValueError) as exc:
            log.warning("error feedback %s is unreadable (%s); starting from zero", path, exc)
            return {}

    def summary(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "rounds_done": self.rounds_done, "tasks_dropped": self.tasks_dropped,
                "model": self.model_digest}
