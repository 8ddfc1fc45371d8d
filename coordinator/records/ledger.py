"""The run ledger: one SQLite file per run with a row per agent per round, plus per-round evaluations.

Tables:
- `agent_rounds`: run, round, phase, agent, status (`ok`, `late`, `dropped`, `rejected:<reason>`),
  bytes_up, bytes_down (counted at the MQTT layer: payload plus MQTT overhead), learn_s, samples, queries,
  energy_compute_j, energy_radio_j, energy_idle_j, profile, codec, detail, ts.
- `rounds`: run, round, accuracy, loss, wall_s, selected, ok, rejected, bytes_up, bytes_down, ts,
  accuracy_min, nodes. For methods with one model per node (MoNNA), accuracy and loss are the means over
  the `nodes` honest nodes and accuracy_min is the worst node's; otherwise nodes = 0 and accuracy_min NULL.
- `runs`: run, started, config (JSON).
- `resumes`: run, round (the first round of the resumed attempt), interrupted (rows marked), ts.

Rows of a round that was interrupted by a coordinator crash keep their numbers but get the status
`interrupted:<status>` when the run resumes (`mark_interrupted`); the round is then run again.
- `task_accuracy` (continual jobs): run, round, task (index t of the task being learned), task_name, task_end
  (1 in its last round), eval_task (index tau), eval_name, accuracy, loss. The rows with task_end = 1 are the
  accuracy matrix a[t][tau] (`accuracy_matrix`).
- `traffic`: run, round, agent, category, bytes_up, bytes_down, ts: every message a device sent or received, by
  category (model, state, task, result, status, telemetry, control), as the agent counted it since its previous
  report; booked on the round its report names (so traffic between two rounds goes to the round it precedes,
  and the start-up's package and CONNECT to the first round). Column docs: `records/columns.py`.
- `sockets`: run, round, agent, bytes_up, bytes_down, ts: the agent socket's own TCP payload bytes (TLS
  included) over the same spans.
- `layer_basis` (FOT): run, task, task_name, layer, k, d: the basis size k_l of d_l after each task.
- `checkpoints`: run, round, sha256, ts: the digest of each round's checkpoint file, booked as the round
  commits; resume refuses a checkpoint whose bytes differ or that was never booked
  (`fedfleet.coordinator.records.store`).

Writes are serialised through one connection guarded by a lock, so the MQTT thread and the round engine
can both record. Each write commits on its own, except inside `batch()`: the engine books a phase's rows
(one per agent) in one transaction, so a round costs one commit, not one per agent.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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
CREATE TABLE IF NOT EXISTS resumes (
  run TEXT NOT NULL, round INTEGER NOT NULL, interrupted INTEGER NOT NULL, ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS task_accuracy (
  run TEXT NOT NULL, round INTEGER NOT NULL, task INTEGER NOT NULL, task_name TEXT NOT NULL,
  task_end INTEGER NOT NULL, eval_task INTEGER NOT NULL, eval_name TEXT NOT NULL, accuracy REAL, loss REAL,
  PRIMARY KEY (run, round, eval_task)
);
CREATE TABLE IF NOT EXISTS traffic (
  run TEXT NOT NULL, round INTEGER NOT NULL, agent TEXT NOT NULL, category TEXT NOT NULL,
  bytes_up INTEGER NOT NULL, bytes_down INTEGER NOT NULL, ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS traffic_run_round ON traffic(run, round);
CREATE TABLE IF NOT EXISTS sockets (
  run TEXT NOT NULL, round INTEGER NOT NULL, agent TEXT NOT NULL, bytes_up INTEGER NOT NULL,
  bytes_down INTEGER NOT NULL, ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layer_basis (
  run TEXT NOT NULL, task INTEGER NOT NULL, task_name TEXT NOT NULL, layer TEXT NOT NULL, k INTEGER NOT NULL,
  d INTEGER NOT NULL, PRIMARY KEY (run, task, layer)
);
CREATE TABLE IF NOT EXISTS checkpoints (
  run TEXT NOT NULL, round INTEGER NOT NULL, sha256 TEXT NOT NULL, ts REAL NOT NULL, PRIMARY KEY (run, round)
);
"""
# columns added after the first release: a ledger written before them gains them on open
_ADDED_COLUMNS = {"rounds": (("accuracy_min", "REAL"), ("nodes", "INTEGER NOT NULL DEFAULT 0")),
                  # asynchronous mode (coordinator/engine/buffered.py): the model version a result was trained
                  # from and its staleness (versions published since); NULL in synchronous rounds
                  "agent_rounds": (("energy_meter", "TEXT"), ("version", "INTEGER"), ("staleness", "INTEGER"))}

AGENT_FIELDS = (
    "status", "bytes_up", "bytes_down", "learn_s", "samples", "queries", "energy_compute_j",
    "energy_radio_j", "energy_idle_j", "profile", "codec", "detail", "energy_meter", "version", "staleness",
)


def accuracy_matrix_of(rows: list[tuple[Any, ...]]) -> tuple[list[str], list[list[float | None]]]:
    """(task names, a) from (task, task name, eval task, accuracy) rows at task ends: a[t][tau] is the accuracy
    on task tau after the last round of task t (None for tau > t, or for a task whose last round has not run)."""
    names: dict[int, str] = {int(t): str(name) for t, name, _, _ in rows}
    n = max(names, default=-1) + 1
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    for t, _, tau, acc in rows:
        matrix[int(t)][int(tau)] = acc
    return [names.get(i, "?") for i in range(n)], matrix


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
        self._batching = 0  # open `batch()` blocks: writes inside them wait for its one commit

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Writes inside go in one transaction, committed when the (outermost) block ends. Rows are visible
        to `query` at once (same connection); other readers see them at the commit."""
        with self._lock:
            self._batching += 1
        try:
            yield
        finally:
            with self._lock:
                self._batching -= 1
                if not self._batching:
                    self._db.commit()

    def _write(self, sql: str, params: Any) -> None:
        """Run one write; commit it unless a batch is open (an error rolls back only outside a batch)."""
        with self._lock:
            if self._batching:
                self._db.execute(sql, params)
                return
            with self._db:
                self._db.execute(sql, params)

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
        self._write(sql, vals)

    def record_many(self, run: str, round: int, rows: list[tuple[str, str, dict[str, Any]]], *, phase: int = 0) -> None:
        """`record` for many rows (agent, status, fields) of one round and phase, in one statement per set of field
        names (the rows keep their order within each set). Unknown field names raise TypeError before any row is
        written."""
        groups: dict[tuple[str, ...], list[list[Any]]] = {}
        now = time.time()
        for agent, status, fields in rows:
            unknown = set(fields) - set(AGENT_FIELDS)
            if unknown:
                raise TypeError(f"unknown ledger fields: {sorted(unknown)}")
            groups.setdefault(tuple(fields), []).append([run, round, phase, agent, status, now, *fields.values()])
        for names, vals in groups.items():
            cols = ["run", "round", "phase", "agent", "status", "ts", *names]
            sql = f"INSERT INTO agent_rounds({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            with self._lock:
                ctx = nullcontext() if self._batching else self._db
                with ctx:
                    self._db.executemany(sql, vals)

    def add_bytes(self, run: str, round: int, phase: int, agent: str, bytes_up: int) -> None:
        """Add bytes that arrived after an agent's row was written (a late result)."""
        self._write(
            "UPDATE agent_rounds SET bytes_up = bytes_up + ? WHERE id = (SELECT max(id) FROM agent_rounds"
            " WHERE run = ? AND round = ? AND phase = ? AND agent = ?)",
            (bytes_up, run, round, phase, agent),
        )

    def add_energy(self, run: str, round: int, phase: int, agent: str, *, compute_j: float, radio_j: float,
                   idle_j: float, meter: str | None = None) -> None:
        """Set an agent's energy for a round (agents report it after their upload, so it comes last)."""
        self._write(
            "UPDATE agent_rounds SET energy_compute_j = ?, energy_radio_j = ?, energy_idle_j = ?, energy_meter = ? WHERE id ="
            " (SELECT max(id) FROM agent_rounds WHERE run = ? AND round = ? AND phase = ? AND agent = ?)",
            (compute_j, radio_j, idle_j, meter, run, round, phase, agent),
        )

    def record_traffic(self, run: str, round: int, agent: str, traffic: dict[str, tuple[int, int]],
                       wire: tuple[int, int] | None) -> None:
        """An agent's report: bytes by category (`traffic` rows) and its socket's bytes (a `sockets` row, unless
        None), both since its previous report, booked on `round`."""
        self.record_traffic_many(run, [(round, agent, traffic, wire)])

    def record_traffic_many(self, run: str, reports: list[tuple[int, str, dict[str, tuple[int, int]],
                                                                 tuple[int, int] | None]]) -> None:
        """`record_traffic` for many reports (round, agent, traffic, wire), in one statement per table."""
        now = time.time()
        rows = [(run, round, agent[:64], cat, int(up), int(down), now)
                for round, agent, traffic, _ in reports for cat, (up, down) in sorted(traffic.items())]
        sockets = [(run, round, agent[:64], int(wire[0]), int(wire[1]), now)
                   for round, agent, _, wire in reports if wire is not None]
        with self._lock:
            ctx = nullcontext() if self._batching else self._db
            with ctx:
                if rows:
                    self._db.executemany("INSERT INTO traffic VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                if sockets:
                    self._db.executemany("INSERT INTO sockets VALUES (?, ?, ?, ?, ?, ?)", sockets)

    def record_round(self, run: str, round: int, **fields: Any) -> None:
        cols = ["run", "round", "ts", *fields]
        vals = [run, round, time.time(), *fields.values()]
        sql = f"INSERT OR REPLACE INTO rounds({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        self._write(sql, vals)

    def run_config(self, run: str) -> dict[str, Any] | None:
        """The config a run was started with (None: no such run in this ledger)."""
        rows = self.query("SELECT config FROM runs WHERE run = ?", (run,))
        return json.loads(rows[0]["config"]) if rows else None

    def has_round(self, run: str, round: int) -> bool:
        """Whether the run's round `round` has its evaluation row."""
        return bool(self.query("SELECT 1 FROM rounds WHERE run = ? AND round = ?", (run, round)))

    def last_round(self, run: str) -> list[sqlite3.Row]:
        """The run's newest evaluation row (empty: none yet)."""
        return self.query("SELECT * FROM rounds WHERE run = ? ORDER BY round DESC LIMIT 1", (run,))

    def record_checkpoint(self, run: str, round: int, sha256: str) -> None:
        """The digest of round `round`'s checkpoint, as it commits (a rerun of an interrupted round, whose
        file never landed, books its own)."""
        with self._lock:
            # durable before the checkpoint file lands: with WAL and synchronous=NORMAL a power cut could drop
            # the row and leave a checkpoint resume would refuse as never committed
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                with self._db:
                    self._db.execute("INSERT OR REPLACE INTO checkpoints(run, round, sha256, ts) VALUES (?, ?, ?, ?)",
                                     (run, round, sha256, time.time()))
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")

    def checkpoint_digests(self, run: str) -> dict[int, str]:
        """round -> SHA-256 of its committed checkpoint."""
        return {int(r["round"]): str(r["sha256"])
                for r in self.query("SELECT round, sha256 FROM checkpoints WHERE run = ?", (run,))}

    def mark_interrupted(self, run: str, after_round: int) -> int:
        """Mark the rows of rounds after `after_round` (the last checkpointed one) as `interrupted:<status>`;
        record the resume. Returns how many agent rows were marked. Nothing is deleted (the caller has
        checked that no round after `after_round` was evaluated)."""
        with self._lock, self._db:
            marked = self._db.execute(
                "UPDATE agent_rounds SET status = 'interrupted:' || status WHERE run = ? AND round > ?"
                " AND status NOT LIKE 'interrupted:%'", (run, after_round)).rowcount
            self._db.execute("INSERT INTO resumes(run, round, interrupted, ts) VALUES (?, ?, ?, ?)",
                             (run, after_round + 1, marked, time.time()))
        return int(marked)

    def record_task_accuracy(self, run: str, round: int, task: int, task_name: str, task_end: bool,
                             evals: list[tuple[int, str, float, float]]) -> None:
        """A continual job's evaluation after one round: (eval_task, eval_name, accuracy, loss) per task seen."""
        rows = [(run, round, task, task_name, int(task_end), t, name, acc, loss) for t, name, acc, loss in evals]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO task_accuracy VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def accuracy_matrix(self, run: str) -> tuple[list[str], list[list[float | None]]]:
        """(task names, a[t][tau]) of a continual run: see `accuracy_matrix_of`."""
        rows = self.query("SELECT task, task_name, eval_task, accuracy FROM task_accuracy WHERE run = ? AND task_end = 1"
                          " ORDER BY task, eval_task", (run,))
        return accuracy_matrix_of([tuple(r) for r in rows])

    def record_basis(self, run: str, task: int, task_name: str, sizes: dict[str, tuple[int, int]]) -> None:
        """FOT's basis sizes after a task: layer -> (k, d)."""
        rows = [(run, task, task_name, layer, k, d) for layer, (k, d) in sizes.items()]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO layer_basis VALUES (?, ?, ?, ?, ?, ?)", rows)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = sqlite3.Row
            return cur.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class LedgerView:
    """Read-only queries of a ledger file, for the report, the metrics endpoint and the emulator's summary
    (a second process may read while the run writes). `sqlite3.DatabaseError` for a file that is not a
    readable ledger; use as a context manager or `close()`."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        self._db.row_factory = sqlite3.Row

    def __enter__(self) -> LedgerView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._db.execute(sql, params).fetchall()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Any read-only query (the shared numbers of `fedfleet.coordinator.records.accounts`)."""
        return self._rows(sql, params)

    def tables(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT name FROM sqlite_master WHERE type='table'")}

    def runs(self) -> list[str]:
        """Runs with agent rows or rounds, the most recently active last."""
        return [r["run"] for r in self._rows(
            "SELECT run, MAX(ts) AS last FROM (SELECT run, ts FROM agent_rounds UNION ALL SELECT run, ts FROM rounds)"
            " GROUP BY run ORDER BY last")]

    def latest_run(self) -> str | None:
        row = self._rows("SELECT run FROM agent_rounds ORDER BY ts DESC LIMIT 1")
        return row[0]["run"] if row else None

    def config_text(self, run: str) -> str | None:
        """The run's config as stored (JSON text), None without a `runs` row."""
        if "runs" not in self.tables():
            return None
        rows = self._rows("SELECT config FROM runs WHERE run=?", (run,))
        return rows[0]["config"] if rows else None

    def rounds(self, run: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows("SELECT * FROM rounds WHERE run=? ORDER BY round", (run,))]

    def agent_rows(self, run: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows("SELECT * FROM agent_rounds WHERE run=? ORDER BY round, phase, id",
                                            (run,))]

    def totals(self, run: str) -> tuple[int, int, float, float, float, int]:
        """(bytes up, bytes down, compute J, radio J, idle J, agents) over the run's agent rows."""
        row = self._rows(
            "SELECT COALESCE(SUM(bytes_up),0), COALESCE(SUM(bytes_down),0), COALESCE(SUM(energy_compute_j),0),"
            " COALESCE(SUM(energy_radio_j),0), COALESCE(SUM(energy_idle_j),0), COUNT(DISTINCT agent)"
            " FROM agent_rounds WHERE run=?", (run,))[0]
        return int(row[0]), int(row[1]), float(row[2]), float(row[3]), float(row[4]), int(row[5])

    def status_counts(self, run: str) -> list[tuple[str, int]]:
        return [(r[0], int(r[1])) for r in self._rows(
            "SELECT status, COUNT(*) FROM agent_rounds WHERE run=? GROUP BY status", (run,))]

    def last_scored(self, run: str) -> tuple[int, float] | None:
        """(round, score) of the run's last evaluated round."""
        rows = self._rows("SELECT round, accuracy FROM rounds WHERE run=? AND accuracy IS NOT NULL "
                          "ORDER BY round DESC LIMIT 1", (run,))
        return (int(rows[0][0]), float(rows[0][1])) if rows else None

    def task_ends(self, run: str) -> list[tuple[int, str, int, float | None]]:
        """A continual run's (task, task name, eval task, accuracy) at the end of each task (empty: none)."""
        if "task_accuracy" not in self.tables():
            return []
        return [tuple(r) for r in self._rows(  # type: ignore[misc]
            "SELECT task, task_name, eval_task, accuracy FROM task_accuracy WHERE run = ? AND task_end = 1"
            " ORDER BY task, eval_task", (run,))]

    def accuracy_matrix(self, run: str) -> tuple[list[str], list[list[float | None]]]:
        return accuracy_matrix_of(self.task_ends(run))

    def task_end_rounds(self, run: str) -> set[int]:
        """The rounds that ended a task of a continual run."""
        if "task_accuracy" not in self.tables():
            return set()
        return {int(r[0]) for r in self._rows(
            "SELECT DISTINCT round FROM task_accuracy WHERE run = ? AND task_end = 1", (run,))}

    def basis(self, run: str) -> list[tuple[int, str, str, int, int]]:
        """FOT's (task, task name, layer, k, d) rows (empty: none)."""
        if "layer_basis" not in self.tables():
            return []
        return [tuple(r) for r in self._rows(  # type: ignore[misc]
            "SELECT task, task_name, layer, k, d FROM layer_basis WHERE run = ? ORDER BY task, layer", (run,))]

    def agent_outcomes(self, run: str) -> list[tuple[str, str, int, int, float]]:
        """(agent, status, bytes up, bytes down, joules) per agent row of the run."""
        return [(r[0], r[1], int(r[2] or 0), int(r[3] or 0), float(r[4] or 0.0)) for r in self._rows(
            "SELECT agent, status, bytes_up, bytes_down, COALESCE(energy_compute_j, 0) + COALESCE(energy_radio_j, 0)"
            " + COALESCE(energy_idle_j, 0) FROM agent_rounds WHERE run = ?", (run,))]
