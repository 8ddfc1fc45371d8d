"""Checkpoint helpers for resume tests: commit a strategy's checkpoint with a real RunStore, and damage one the way
a file altered before its commit would be (its digest rebooked in the ledger, so only the content checks remain)."""

from __future__ import annotations

import hashlib
import io
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfleet.coordinator.records.store import RunStore


def commit_checkpoint(run_dir: Path, strategy: Any, meta: dict[str, Any], round: int = 2) -> None:
    """Start run "r" in `run_dir` and commit `strategy` as its checkpoint of `round`."""
    store = RunStore(run_dir)
    try:
        store.start_run("r", meta)
        store.save_checkpoint("r", round, strategy, rng=np.random.default_rng(1).bit_generator.state, bytes_up=5,
                              bytes_down=7, summary={"accuracy": 0.5})
    finally:
        store.close()


def damage_checkpoint(run_dir: Path, change: Callable[[dict[str, Any]], Any], round: int = 2) -> None:
    """Apply `change` to the method state ("extra") of run "r"'s checkpoint of `round` and rebook its digest."""
    path = run_dir / "checkpoints" / f"round-{round:04d}.pt"
    ckpt = torch.load(path, weights_only=True)
    change(ckpt["extra"])
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path.write_bytes(buf.getvalue())
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        db.execute("UPDATE checkpoints SET sha256 = ? WHERE run = 'r' AND round = ?",
                   (hashlib.sha256(buf.getvalue()).hexdigest(), round))
