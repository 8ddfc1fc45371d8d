"""What an agent keeps across restarts and reboots, in its state directory (systemd's StateDirectory).

- `state.json`: the tasks already answered (run, round, phase), so a task the broker redelivers to the
  persistent session after a restart is not trained and uploaded twice; counters (rounds done, tasks
  dropped); the digest of the model package in use.
- `package.bin`: the last model package that loaded, so a restarted agent can take the next task at
  once instead of waiting for the coordinator to send the package again. It is checked against the
  digest in `state.json` before use, and is only ever a package this agent accepted before.
- `feedback-<method>.npz`: FedZip's error-feedback residuals, without which the first upload after a
  restart would silently drop what earlier rounds held back.

Every file is written to a temporary name and renamed, so a power cut leaves the old or the new file,
never half of one. A missing or unreadable file means "nothing kept" (logged), never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_DONE = 512  # answered task keys kept (a few hundred rounds is far beyond any redelivery window)


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
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.done: list[tuple[str, int, int]] = []
        self.rounds_done = 0
        self.tasks_dropped = 0
        self.model_digest: str | None = None
        self._load()

    def _load(self) -> None:
        path = self.dir / "state.json"
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            self.done = [(str(r), int(n), int(p)) for r, n, p in data.get("done", [])][-MAX_DONE:]
            self.rounds_done = int(data.get("rounds_done", 0))
            self.tasks_dropped = int(data.get("tasks_dropped", 0))
            digest = data.get("model_digest")
            self.model_digest = digest if isinstance(digest, str) else None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("state %s is unreadable (%s); starting without it", path, exc)

    def save(self, done: set[tuple[str, int, int]] | list[tuple[str, int, int]], rounds_done: int,
             tasks_dropped: int) -> None:
        keys = list(done) if isinstance(done, list) else sorted(done, key=lambda k: (k[0], k[1], k[2]))
        self.done = keys[-MAX_DONE:]
        self.rounds_done, self.tasks_dropped = rounds_done, tasks_dropped
        body = {"done": [list(k) for k in self.done], "rounds_done": rounds_done, "tasks_dropped": tasks_dropped,
                "model_digest": self.model_digest}
        _atomic_write(self.dir / "state.json", json.dumps(body).encode())

    # -------------------------------------------------------------- the model package
    def save_package(self, digest: str, blob: bytes) -> None:
        _atomic_write(self.dir / "package.bin", blob)
        self.model_digest = digest
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
        try:
            with np.load(path, allow_pickle=False) as f:
                return {name: f[name].astype(np.float32) for name in f.files}
        except (OSError, ValueError) as exc:
            log.warning("error feedback %s is unreadable (%s); starting from zero", path, exc)
            return {}

    def summary(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "rounds_done": self.rounds_done, "tasks_dropped": self.tasks_dropped,
                "model": self.model_digest}
