"""The run ledger: one SQLite file per run with a row per agent per round, plus per-round evaluations.

Tables:
- `agent_rounds`: run, round, phase, agent, status (`ok`, `late`, `dropped`, `rejected:<reason>`),
  bytes_up, bytes_down (counted at the MQTT layer: payload plus MQTT overhead), learn_s, samples, queries,
  energy_compute_j, energy_radio_j, energy_idle_j, profile, codec, detail, ts.
- `rounds`: run, round, accuracy, loss, wall_s, selected, ok, rejected, bytes_up, bytes_down, ts,
  accuracy_min, nodes. For methods with one model per node (MoNNA), accuracy and loss are the means over
  the `nodes` honest nodes and accuracy_min is the worst node's; otherwise nodes = 0 and accuracy_min NULL.
- `runs`: run, started, config (JSON).

Writes are serialised through one connection guarded by a lock, so the MQTT thread and the round engine
can both record.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run TEXT PRIMARY KEY, started REAL NOT NULL, config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_rounds (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run TEXT NOT NULL, round INTEGER NOT NULL, phase INTEGER NOT NULL DEFAULT 0, agent TEXT NOT NULL,
  status TEXT NOT NULL, bytes_up INTEGER NOT NULL DEFAULT 0, bytes_down INTEGER NOT NULL DEFAULT 0,
  learn_s REAL, samples INTEGER, queries INTEGER,
  energy_compute_j REAL, energy_radio_j REAL, energy_idle_j REAL,
  profile TEXT, codec TEXT, detail TEXT, ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS agent_rounds_run_round ON agent_rounds(run, round);
CREATE TABLE IF NOT EXISTS rounds (
  run TEXT NOT NULL, round INTEGER NOT NULL, accuracy REAL, loss REAL, wall_s REAL,
  selected INTEGER, ok INTEGER, rejected INTEGER, bytes_up INTEGER, bytes_down INTEGER, ts REAL NOT NULL,
  accuracy_min REAL, nodes INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (run, round)
);
"""
# columns added after the first release: a ledger written before them gains them on open
_ADDED_COLUMNS = {"rounds": (("accuracy_min", "REAL"), ("nodes", "INTEGER NOT NULL DEFAULT 0"))}

AGENT_FIELDS = (
    "status", "bytes_up", "bytes_down", "learn_s", "samples", "queries", "energy_compute_j",
    "energy_radio_j", "energy_idle_j", "profile", "codec", "detail",
)


class Ledger:
    """Append-only records of a run. Safe to call from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per row; a crash loses at most the last rows
        self._db.executescript(SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        self._lock = threading.Lock()

    def start_run(self, run: str, config: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO runs(run, started, config) VALUES (?, ?, ?)",
                (run, time.time(), json.dumps(config, default=str)),
            )

    def record(self, run: str, round: int, agent: str, status: str, *, phase: int = 0, **fields: Any) -> None:
        """One row for one agent in one round (and phase). Unknown field names raise TypeError."""
        unknown = set(fields) - set(AGENT_FIELDS)
        if unknown:
            raise TypeError(f"unknown ledger fields: {sorted(unknown)}")
        cols = ["run", "round", "phase", "agent", "status", "ts", *fields]
        vals = [run, round, phase, agent, status, time.time(), *fields.values()]
        sql = f"INSERT INTO agent_rounds({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        with self._lock, self._db:
            self._db.execute(sql, vals)

    def add_bytes(self, run: str, round: int, phase: int, agent: str, bytes_up: int) -> None:
        """Add bytes that arrived after an agent's row was written (a late result)."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE agent_rounds SET bytes_up = bytes_up + ? WHERE id = (SELECT max(id) FROM agent_rounds"
                " WHERE run = ? AND round = ? AND phase = ? AND agent = ?)",
                (bytes_up, run, round, phase, agent),
            )

    def add_energy(self, run: str, round: int, phase: int, agent: str, *, compute_j: float, radio_j: float,
                   idle_j: float) -> None:
        """Set an agent's energy for a round (agents report it after their upload, so it comes last)."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE agent_rounds SET energy_compute_j = ?, energy_radio_j = ?, energy_idle_j = ? WHERE id ="
                " (SELECT max(id) FROM agent_rounds WHERE run = ? AND round = ? AND phase = ? AND agent = ?)",
                (compute_j, radio_j, idle_j, run, round, phase, agent),
            )

    def record_round(self, run: str, round: int, **fields: Any) -> None:
        cols = ["run", "round", "ts", *fields]
        vals = [run, round, time.time(), *fields.values()]
        sql = f"INSERT OR REPLACE INTO rounds({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        with self._lock, self._db:
            self._db.execute(sql, vals)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = sqlite3.Row
            return cur.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
