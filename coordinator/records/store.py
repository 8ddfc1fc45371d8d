"""Persistence of one run: the ledger, atomic checkpoints, and resume after a coordinator crash.

A run directory holds one run:
- `job.json`: the run id and the job it was started with, written before anything starts;
- `ledger.sqlite`: the rows per agent per round and the per-round evaluations (`fedfleet.coordinator.records.ledger`);
- `checkpoints/round-NNNN.pt` (and a copy as `latest.pt`) after every completed round: the strategy's
  tensors and extra state, the engine's selection RNG, the byte totals and the round's evaluation. Each is
  written to a temporary file, fsynced and renamed, so a crash never leaves a torn one; they hold only
  tensors and plain containers and are read back with `torch.load(weights_only=True)` (no pickled code).

Resume (`fedfleet serve|demo --resume RUN_DIR`): `open_job` checks that the job is the run's own (same
method, roster, data, model, seed ...; only rounds, deadline_s and grace_s may change) and returns its run
id. The engine then calls `RunStore.resume_run`, which loads the newest checkpoint, restores the strategy
(`Strategy.load_extra_state`), and marks the rows of the interrupted round (any round after that checkpoint)
as `interrupted:<status>`: they stay in the ledger (bytes and energy were spent) but no longer count. The
interrupted round is then run again under the same run id; nothing of an earlier round is redone or
overwritten. A fresh start into a directory that already holds a run is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.records.checkpoints import check_checkpoint
from fedfleet.coordinator.records.ledger import Ledger
from fedfleet.coordinator.strategies import Strategy
from fedfleet.edge_agent.errors import ConfigError

CHECKPOINT_FORMAT = 1
JOB_FILE = "job.json"
# job fields a resumed run may change: they bound how long it runs, not what it computes
RESUMABLE_CHANGES = ("rounds", "deadline_s", "grace_s")
_ROUND_FILE = re.compile(r"round-(\d+)\.pt$")
log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A run id: the start time plus a random suffix, so two runs started in the same second differ."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def open_job(run_dir: str | Path, job: dict[str, Any], *, resume: bool, run: str | None = None) -> str:
    """Before anything starts: the run id for `job` in `run_dir`.

    Fresh (`resume=False`): `run` (or a new run id), written to `run_dir/job.json`; a directory that already holds a
    run is refused (its checkpoints would be overwritten). Resume: the run id in `job.json`, after checking
    that `job` is that run's job. Errors are one-line `ConfigError`s naming the directory and the fields.
    """
    run_dir = Path(run_dir)
    path = run_dir / JOB_FILE
    current = json.loads(json.dumps(job))  # the form it takes in job.json (tuples become lists)
    if not resume:
        if path.exists():
            run = _read_job(path).get("run")
            raise ConfigError(f"{run_dir} already holds run {run!r}: continue it with --resume {run_dir}, "
                              "or give another --run-dir")
        run = run or new_run_id()
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda fh: fh.write(json.dumps({"run": run, "job": current}, indent=2).encode()))
        return run
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    if not path.exists():
        raise ConfigError(f"--resume {run_dir}: not a fedfleet run directory (no {JOB_FILE})")
    saved = _read_job(path)
    old = saved.get("job") if isinstance(saved.get("job"), dict) else {}
    diffs = [f"{k} = {old.get(k)!r} in the run, {current.get(k)!r} now"
             for k in sorted(set(old) | set(current)) if k not in RESUMABLE_CHANGES and old.get(k) != current.get(k)]
    if diffs:
        raise ConfigError(f"--resume {run_dir}: not the same job ({'; '.join(diffs)}); resume with the run's own "
                          f"settings (only {', '.join(RESUMABLE_CHANGES)} may change)")
    run = saved.get("run")
    if not isinstance(run, str) or not run:
        raise ConfigError(f"--resume {run_dir}: {JOB_FILE} names no run id")
    return run


def _read_job(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable run file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a run file")
    return data


@dataclass
class Resumed:
    """Where a resumed run stands: its last completed round and the engine state saved with it."""

    round: int  # the last checkpointed round (0: none completed); the engine continues at round + 1
    rng: dict[str, Any] | None  # the engine's selection Generator state (numpy bit_generator.state)
    bytes_up: int
    bytes_down: int
    interrupted_rows: int  # ledger rows of the interrupted round, now marked interrupted:<status>
    downlink: dict[str, Any] | None = None  # the compressed downlink's reconstruction (DownlinkSync.saved)


class RunStore:
    """The files of one run directory: the ledger, the checkpoints, and reading them back on resume."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        try:
            self.ledger = Ledger(self.run_dir / "ledger.sqlite")
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.run_dir / 'ledger.sqlite'}: not a readable fedfleet ledger ({exc})") from None

    def close(self) -> None:
        self.ledger.close()

    # -------------------------------------------------------------- start
    def start_run(self, run: str, meta: dict[str, Any]) -> None:
        self.ledger.start_run(run, meta)

    def resume_run(self, run: str, meta: dict[str, Any], strategy: Strategy) -> Resumed:
        """Continue `run`: check it is the same method and roster, restore `strategy` from the newest
        checkpoint (checked against its digest in the ledger and field by field), and mark the interrupted
        round's rows. A run with no checkpoint restarts at round 1. Nothing already booked is deleted or
        rewritten: a ledger that holds rounds after the newest checkpoint is refused."""
        try:
            return self._resume(run, meta, strategy)
        except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:  # a damaged ledger
            raise ConfigError(f"--resume {self.run_dir}: the ledger cannot be read back "
                              f"({type(exc).__name__}: {exc})") from None

    def _resume(self, run: str, meta: dict[str, Any], strategy: Strategy) -> Resumed:
        saved = self.ledger.run_config(run)
        if saved is None:
            others = [r["run"] for r in self.ledger.query("SELECT run FROM runs")]
            if others or any(self.checkpoints.glob("round-*.pt")):
                raise ConfigError(f"--resume {self.run_dir}: {JOB_FILE} names run {run!r}, but the ledger and "
                                  f"checkpoints are of run {(others or ['?'])[0]!r}; {JOB_FILE} was changed")
            self.start_run(run, meta)  # killed before its first row: nothing to continue, nothing to mark
            return Resumed(0, None, 0, 0, 0, None)
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume {self.run_dir}: the ledger's config of run {run!r} is not a job")
        for key in ("strategy", "roster"):
            if saved.get(key) != json.loads(json.dumps(meta.get(key), default=str)):
                raise ConfigError(f"--resume {self.run_dir}: run {run!r} has {key} {saved.get(key)!r}, "
                                  f"this job {meta.get(key)!r}")
        ckpt = self.latest_checkpoint(run, strategy)
        done = 0
        rng = downlink = None
        up = down = 0
        if ckpt is not None:
            try:
                strategy.state = {k: v.detach().clone() for k, v in ckpt["strategy_state"].items()}
                strategy.load_extra_state(ckpt["extra"])
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a method that cannot resume says so in one line
                raise ConfigError(f"--resume {self.run_dir}: method {strategy.name!r} cannot resume from its "
                                  f"checkpoint ({type(exc).__name__}: {exc}); start a new run") from None
            done, rng = int(ckpt["round"]), ckpt.get("rng")
            if ckpt.get("downlink") is not None:
                downlink = {"version": int(ckpt["downlink"]["version"]),
                            "state": {k: v.numpy() for k, v in ckpt["downlink"]["state"].items()}}
            up, down = int(ckpt.get("bytes_up", 0)), int(ckpt.get("bytes_down", 0))
            summary = ckpt.get("summary") or {}
            if summary and not self.ledger.has_round(run, done):
                self.ledger.record_round(run, done, **summary)  # killed between its checkpoint and its row
        later = self.ledger.query("SELECT MAX(round) AS r FROM rounds WHERE run = ? AND round > ?", (run, done))
        if later and later[0]["r"] is not None:
            raise ConfigError(f"--resume {self.run_dir}: the ledger has round {later[0]['r']} evaluated, but the "
                              f"newest checkpoint is of round {done}; a checkpoint is missing (restore "
                              f"{self.checkpoints.name}/round-{int(later[0]['r']):04d}.pt)")
        marked = self.ledger.mark_interrupted(run, done)
        return Resumed(done, rng, up, down, marked, downlink)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self, run: str, round: int, strategy: Strategy, *, rng: dict[str, Any], bytes_up: int,
                        bytes_down: int, summary: dict[str, Any], downlink: dict[str, Any] | None = None) -> None:
        """After round `round` completed: `round-NNNN.pt`, then `latest.pt`, each atomically. `downlink` is
        the compressed downlink's reconstruction (`DownlinkSync.saved()`), when the run has one."""
        state = {
            "format": CHECKPOINT_FORMAT, "run": run, "round": round, "strategy": strategy.name,
            "state": strategy.global_state(),  # the model to evaluate
            "strategy_state": strategy.state,  # what the strategy holds as `state` (MoNNA: the initial model)
            "extra": strategy.extra_state(), "rng": rng, "bytes_up": int(bytes_up), "bytes_down": int(bytes_down),
            "summary": summary,
            "downlink": None if downlink is None else {
                "version": int(downlink["version"]),
                "state": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in downlink["state"].items()}},
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        # the digest is booked before the file lands: a crash in between leaves the previous round's checkpoint
        # the newest (and the rerun round books its own digest again)
        self.ledger.record_checkpoint(run, round, hashlib.sha256(data).hexdigest())
        for name in (f"round-{round:04d}.pt", "latest.pt"):
            _atomic_write(self.checkpoints / name, lambda fh: fh.write(data))

    def latest_checkpoint(self, run: str, strategy: Strategy) -> dict[str, Any] | None:
        """The newest checkpoint of `run` (highest round), its bytes checked against the digest the ledger
        booked when it was committed, loaded without pickle and checked field by field against `strategy`
        (`fedfleet.coordinator.records.checkpoints`); None if there is none."""
        rounds = sorted((int(m.group(1)), p) for p in self.checkpoints.glob("round-*.pt")
                        if (m := _ROUND_FILE.search(p.name)))
        if not rounds:
            return None
        number, path = rounds[-1]
        where = f"--resume {self.run_dir}: {path.name}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
        booked = self.ledger.checkpoint_digests(run)
        digest = hashlib.sha256(data).hexdigest()
        if number in booked and booked[number] != digest:
            raise ConfigError(f"{where} differs from the checkpoint committed for round {number} (its SHA-256 "
                              f"in the ledger is {booked[number][:16]}..., the file's {digest[:16]}...); "
                              "restore the original file")
        if number not in booked:
            if booked:
                raise ConfigError(f"{where} was never committed by run {run!r} (no digest in the ledger for "
                                  f"round {number}); remove it to resume from round {max(booked)}")
            log.warning("%s: the ledger books no checkpoint digests (a run from before they were booked); "
                        "resuming from %s unchecked against one", self.run_dir, path.name)
        try:
            ckpt = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported as such
            raise ConfigError(f"{where}: cannot read it ({type(exc).__name__}: {exc})".replace("\n", " ")) from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{where} is not a checkpoint this version can resume")
        check_checkpoint(ckpt, path, file_round=number, run=run, strategy=strategy)
        return ckpt

    def last_accuracy(self, run: str) -> float:
        rows = self.ledger.last_round(run)
        return float(rows[0]["accuracy"]) if rows else float("nan")
