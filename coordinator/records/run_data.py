"""A run's records, read from its ledger for the report and the metrics endpoint: per-agent totals, the
per-round series, outcome classes, and the label of the run's score (accuracy, or the task's own number).

`load(run_dir, run=None)` reads `run_dir/ledger.sqlite` through `fedfleet.coordinator.records.ledger.LedgerView`
(read-only: a run may still be writing it) into a `RunData`; errors are one-line `ReportError`s.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfleet.coordinator.records.ledger import LedgerView
from fedfleet.edge_agent.errors import FedfleetError

MB = 1e6
MAX_BARS = 60  # agents drawn in the per-agent plot; the HTML table always lists all of them
MAX_PROBLEM_ROWS = 500
# interrupted: a round rerun after resume; surplus: tasked by over-selection, not needed for the cohort
OUTCOMES = ("ok", "late", "surplus", "dropped", "rejected", "interrupted")
# each name its own colour (no two alike, so a legend never pairs two series): outcomes, energy parts, directions
COLORS = {"ok": "#4c9a2a", "late": "#e0a526", "surplus": "#2ca6a4", "dropped": "#8c8c8c", "rejected": "#c0392b",
          "interrupted": "#9b59b6", "compute": "#3b6ea8", "radio": "#e07b39", "idle": "#c7c7c7", "up": "#17becf",
          "down": "#8c564b"}


class ReportError(FedfleetError):
    """The run directory or its ledger cannot be reported on. The message says what is missing."""


@dataclass
class AgentTotals:
    agent: str
    profile: str = "-"
    bytes_up: int = 0
    bytes_down: int = 0
    compute_j: float = 0.0
    radio_j: float = 0.0
    idle_j: float = 0.0
    learn_s: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)

    @property
    def joules(self) -> float:
        return self.compute_j + self.radio_j + self.idle_j


@dataclass(frozen=True)
class ScoreLabel:
    """What the ledger's per-round score column holds for a run's task, for plot and table labels."""

    name: str
    axis: str
    title: str
    lower_is_better: bool = False


ACCURACY = ScoreLabel("Accuracy", "Test accuracy", "Accuracy of the global model")
TASK_SCORES = {"moving-digits-diffusion": ScoreLabel(
    "x0 MSE", "Held-out x0-prediction MSE (lower is better)", "Denoising quality (x0 MSE) of the denoiser the run ships",
    lower_is_better=True)}


def score_label(run_dir: Path) -> ScoreLabel:
    """The score label of the run's task (`job.json`'s job.task); accuracy when there is none."""
    try:
        job = json.loads((run_dir / "job.json").read_text()).get("job", {})
    except (OSError, ValueError, AttributeError):
        return ACCURACY
    return TASK_SCORES.get(job.get("task") if isinstance(job, dict) else None, ACCURACY)


@dataclass
class RunData:
    run: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]]  # rows of the `rounds` table, ordered by round
    rows: list[dict[str, Any]]  # rows of `agent_rounds` for this run
    agents: dict[str, AgentTotals]
    has_energy: bool
    score: ScoreLabel = ACCURACY


def outcome(status: str) -> str:
    """Collapse a ledger status to ok / late / dropped / rejected (`rejected:<reason>`) / interrupted
    (`interrupted:<status>`: a row of a round the coordinator crashed in, rerun after resume)."""
    head = (status or "").split(":", 1)[0]
    return head if head in OUTCOMES else "rejected"


def energy(x: Any) -> float:
    """A ledger energy cell as joules (NULL: not recorded, 0)."""
    return float(x) if x is not None else 0.0


def load(run_dir: str | Path, run: str | None = None) -> RunData:
    """Read one run from `run_dir/ledger.sqlite`. Picks the latest run when `run` is None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory; pass the folder that holds ledger.sqlite")
    db_path = run_dir / "ledger.sqlite"
    if not db_path.is_file():
        raise ReportError(f"{db_path}: ledger not found; is {run_dir} a fedfleet run directory?")
    try:
        view = LedgerView(db_path)
        tables = view.tables()
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"{db_path}: not a readable SQLite ledger ({exc})") from exc
    try:
        missing = {"agent_rounds", "rounds"} - tables
        if missing:
            raise ReportError(f"{db_path}: ledger lacks tables {sorted(missing)}; was it written by fedfleet.coordinator.records.ledger?")
        runs = view.runs()
        if not runs:
            raise ReportError(f"{db_path}: the ledger has no rounds yet; run at least one round first")
        if run is None:
            run = runs[-1]
        elif run not in runs:
            raise ReportError(f"{db_path}: run {run!r} not in the ledger; runs present: {runs}")
        config: dict[str, Any] = {}
        text = view.config_text(run)
        if text is not None:
            try:
                config = json.loads(text)
            except (TypeError, ValueError):
                config = {"raw": text}
        rounds = view.rounds(run)
        rows = view.agent_rows(run)
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"{db_path}: not a readable SQLite ledger ({exc})") from exc
    finally:
        view.close()
    agents: dict[str, AgentTotals] = {}
    has_energy = False
    for r in rows:
        a = agents.setdefault(r["agent"], AgentTotals(r["agent"]))
        if r["profile"]:
            a.profile = r["profile"]
        a.bytes_up += int(r["bytes_up"] or 0)
        a.bytes_down += int(r["bytes_down"] or 0)
        a.compute_j += energy(r["energy_compute_j"])
        a.radio_j += energy(r["energy_radio_j"])
        a.idle_j += energy(r["energy_idle_j"])
        has_energy |= any(r[k] is not None for k in ("energy_compute_j", "energy_radio_j", "energy_idle_j"))
        if r["learn_s"] is not None:
            a.learn_s.append(float(r["learn_s"]))
        a.outcomes[outcome(r["status"])] += 1
    return RunData(run, config, rounds, rows, dict(sorted(agents.items())), has_energy, score_label(run_dir))


# --- per-round series -----------------------------------------------------------------------------------------


def round_series(data: RunData) -> dict[int, dict[str, float]]:
    """Per round: bytes (agent rows, falling back to the rounds table), joules, accuracy, outcome counts."""
    per: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in data.rows:
        s = per[int(r["round"])]
        s["bytes"] += int(r["bytes_up"] or 0) + int(r["bytes_down"] or 0)
        s["joules"] += energy(r["energy_compute_j"]) + energy(r["energy_radio_j"]) + energy(r["energy_idle_j"])
        s[outcome(r["status"])] += 1
    for rd in data.rounds:
        s = per[int(rd["round"])]
        if s["bytes"] == 0:
            s["bytes"] = int(rd.get("bytes_up") or 0) + int(rd.get("bytes_down") or 0)
        if rd.get("accuracy") is not None:
            s["accuracy"] = float(rd["accuracy"])
    return {k: dict(v) for k, v in sorted(per.items())}
