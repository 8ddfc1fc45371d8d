"""The emulated run's summary: per-agent and per-group totals from the ledger, the round numbers, and the
`--expect-*` checks that make an emulated fleet a CI gate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedfleet.tools.emulate.fleet_config import FleetConfig


def ledger_totals(run_dir: Path, run: str) -> dict[str, Any]:
    """Per agent and per group: bytes, joules and outcomes, from the ledger."""
    from fedfleet.coordinator.records.ledger import LedgerView

    with LedgerView(run_dir / "ledger.sqlite") as view:
        rows = view.agent_outcomes(run)
    agents: dict[str, dict[str, Any]] = {}
    for agent, status, up, down, joules in rows:
        a = agents.setdefault(agent, {"bytes_up": 0, "bytes_down": 0, "joules": 0.0, "outcomes": {}})
        a["bytes_up"] += int(up or 0)
        a["bytes_down"] += int(down or 0)
        a["joules"] += float(joules or 0.0)
        a["outcomes"][status] = a["outcomes"].get(status, 0) + 1
    return agents


def round_numbers(summaries: list[Any]) -> dict[str, Any]:
    return {
        "final_accuracy": summaries[-1].accuracy if summaries else float("nan"),
        "rounds": len(summaries),
        "bytes_up": sum(s.bytes_up for s in summaries),
        "bytes_down": sum(s.bytes_down for s in summaries),
        "accuracy_per_round": [round(s.accuracy, 4) for s in summaries],
        "round_wall_s": [round(s.wall_s, 3) for s in summaries],
        "late_per_round": [s.late for s in summaries],
        "rejected_per_round": [s.rejected for s in summaries],
    }


def per_group(fleet: FleetConfig, per_agent: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g in fleet.groups:
        ids = g.ids()
        rows = [per_agent.get(a, {}) for a in ids]
        st = [stats.get(a, {}) for a in ids]
        outcomes: dict[str, int] = {}
        for r in rows:
            for k, v in r.get("outcomes", {}).items():
                outcomes[k] = outcomes.get(k, 0) + v
        out[g.name] = {
            "profile": g.profile, "count": g.count, "byzantine": g.byzantine, "dropout": g.dropout,
            "bytes_up": sum(r.get("bytes_up", 0) for r in rows), "joules": sum(r.get("joules", 0.0) for r in rows),
            "outcomes": outcomes,
            "emulated_compute_s": sum(s.get("compute_s", 0.0) for s in st),
            "retransmitted_bytes": sum(s.get("retransmitted_bytes", 0) for s in st),
            "dropouts": sum(s.get("dropouts", 0) for s in st),
            "offline_events": sum(s.get("offline_events", 0) for s in st),
        }
    return out


def check_expectations(summary: dict[str, Any], *, accuracy: float | None = None, max_mb_up: float | None = None,
                       max_joules: float | None = None) -> list[str]:
    """The missed expectations, as messages (empty when all hold)."""
    missed = []
    if accuracy is not None and not summary.get("final_accuracy", float("nan")) >= accuracy:
        missed.append(f"final accuracy {summary.get('final_accuracy')} is below the expected {accuracy}")
    if max_mb_up is not None and not summary.get("bytes_up", math.inf) / 1e6 <= max_mb_up:
        missed.append(f"{summary.get('bytes_up', 0) / 1e6:.3f} MB uploaded, more than the expected {max_mb_up} MB")
    if max_joules is not None and not summary.get("joules", math.inf) <= max_joules:
        missed.append(f"{summary.get('joules')} J spent, more than the expected {max_joules} J")
    return missed
