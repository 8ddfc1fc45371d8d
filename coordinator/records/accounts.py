"""One definition of each number a view shows about a run's bytes, energy and refusals.

The terminal (progress line and final table), `summary.json`, the report, the metrics endpoint and the export all
read these from the ledger through `accounts(query, run)`, and label them with `LABELS`:
- `all`: all device traffic: every MQTT message each agent sent or received, by category (the `traffic` table:
  model package, state broadcast, task, result, status, telemetry and control packets), as the agents counted it;
- `updates`: model updates only: tasks, state broadcasts and results, as the coordinator booked them per agent
  (`agent_rounds.bytes_up` / `bytes_down`);
- `socket`: the agents' sockets, TCP payload (TLS included), as the kernel counted it (the `sockets` table);
- energy: compute (the learning), radio and idle joules the agents booked (`agent_rounds.energy_*`); None when
  no agent reported energy (shown as "not recorded", never 0);
- refusals: ledger rows whose status is `rejected:<reason>` (a row may stand for several refused messages of one
  agent and reason: its detail says how many).

`query(sql, params)` is `Ledger.query` or `LedgerView.query`; `round` limits the numbers to one round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedfleet.edge_agent.wire.traffic import CATEGORIES

LABELS = {
    "all": "all device traffic (every MQTT message the agents sent or received, control packets included)",
    "updates": "model updates only (tasks, state broadcasts and results)",
    "socket": "agents' sockets (TCP payload, TLS included)",
    "energy": "agents' energy (compute = the learning, radio, idle while in the job)",
    "refusals": "refusals (ledger rows rejected:<reason>)",
}
Query = Callable[[str, tuple[Any, ...]], list[Any]]


@dataclass
class Accounts:
    traffic: dict[str, tuple[int, int]] = field(default_factory=dict)  # category -> (up, down)
    updates: tuple[int, int] = (0, 0)
    socket: tuple[int, int] | None = None  # None: no agent reported socket counts
    energy: dict[str, float] | None = None  # compute_j, radio_j, idle_j; None: not recorded
    refusals: int = 0
    per_agent: dict[str, dict[str, int]] = field(default_factory=dict)  # agent -> {all, updates, socket}

    @property
    def all(self) -> tuple[int, int]:
        return sum(v[0] for v in self.traffic.values()), sum(v[1] for v in self.traffic.values())

    @property
    def joules(self) -> float | None:
        return None if self.energy is None else sum(self.energy.values())

    def to_json(self) -> dict[str, Any]:
        """The summary.json form (the export and metrics use the same keys)."""
        def pair(p: tuple[int, int] | None, label: str) -> dict[str, Any] | None:
            return None if p is None else {"up": p[0], "down": p[1], "total": p[0] + p[1], "counts": label}

        return {
            "all_device_traffic": {**(pair(self.all, LABELS["all"]) or {}),
                                   "by_category": {c: {"up": u, "down": d} for c, (u, d) in self.traffic.items()}},
            "model_updates": pair(self.updates, LABELS["updates"]),
            "socket": pair(self.socket, LABELS["socket"]),
            "energy_j": (None if self.energy is None
                         else {**self.energy, "total_j": self.joules, "counts": LABELS["energy"]}),
            "refusals": {"rows": self.refusals, "counts": LABELS["refusals"]},
        }


def _where(run: str, round: int | None) -> tuple[str, tuple[Any, ...]]:
    return ("run = ?", (run,)) if round is None else ("run = ? AND round = ?", (run, round))


def accounts(query: Query, run: str, round: int | None = None, *, per_agent: bool = False) -> Accounts:
    """The run's numbers (or one round's), read from the ledger; see the module docstring."""
    where, params = _where(run, round)
    tables = {r[0] for r in query("SELECT name FROM sqlite_master WHERE type='table'", ())}
    acc = Accounts()
    if "traffic" in tables:
        got = {r[0]: (int(r[1]), int(r[2])) for r in query(
            f"SELECT category, SUM(bytes_up), SUM(bytes_down) FROM traffic WHERE {where} GROUP BY category", params)}
        acc.traffic = {c: got.get(c, (0, 0)) for c in CATEGORIES}
    if "sockets" in tables:
        row = query(f"SELECT COUNT(*), SUM(bytes_up), SUM(bytes_down) FROM sockets WHERE {where}", params)[0]
        if row[0]:
            acc.socket = (int(row[1]), int(row[2]))
    row = query(
        "SELECT COALESCE(SUM(bytes_up), 0), COALESCE(SUM(bytes_down), 0), COUNT(energy_compute_j) + COUNT(energy_radio_j)"
        " + COUNT(energy_idle_j), COALESCE(SUM(energy_compute_j), 0), COALESCE(SUM(energy_radio_j), 0),"
        " COALESCE(SUM(energy_idle_j), 0), COALESCE(SUM(status LIKE 'rejected:%'), 0)"
        f" FROM agent_rounds WHERE {where}", params)[0]
    acc.updates = (int(row[0]), int(row[1]))
    if row[2]:
        acc.energy = {"compute_j": float(row[3]), "radio_j": float(row[4]), "idle_j": float(row[5])}
    acc.refusals = int(row[6])
    if per_agent:
        acc.per_agent = agent_bytes(query, run, tables)
    return acc


def agent_bytes(query: Query, run: str, tables: set[str] | None = None) -> dict[str, dict[str, int]]:
    """agent -> {"all", "updates", "socket"} bytes (up + down) over the run (socket absent where not reported)."""
    if tables is None:
        tables = {r[0] for r in query("SELECT name FROM sqlite_master WHERE type='table'", ())}
    out: dict[str, dict[str, int]] = {}
    for agent, up, down in query("SELECT agent, SUM(bytes_up), SUM(bytes_down) FROM agent_rounds WHERE run = ?"
                                 " GROUP BY agent", (run,)):
        out.setdefault(agent, {})["updates"] = int(up or 0) + int(down or 0)
    for table, key in (("traffic", "all"), ("sockets", "socket")):
        if table in tables:
            for agent, up, down in query(f"SELECT agent, SUM(bytes_up), SUM(bytes_down) FROM {table} WHERE run = ?"
                                         " GROUP BY agent", (run,)):
                out.setdefault(agent, {})[key] = int(up or 0) + int(down or 0)
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"
