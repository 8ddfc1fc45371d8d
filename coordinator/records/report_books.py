"""The report's books section: what the devices paid for, by category, with what each number counts.

`section(run_dir, run)` is HTML: the labelled totals (`records.accounts`, the numbers every view shows), the
bytes by category, the learning's energy apart from radio and idle, per profile whether the energy was measured by
a meter or modelled and from which power figures (with their sources), and what the run's model updates would
have cost dense (float32 tensors each way, no codec).
"""

from __future__ import annotations

import html
import sqlite3
from pathlib import Path
from typing import Any

from fedfleet.coordinator.records.accounts import LABELS, accounts
from fedfleet.coordinator.records.ledger import LedgerView

MB = 1e6


def _rows(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f'<th class="l">{html.escape(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="l">{html.escape(str(c))}</td>' for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def dense_numel(run_dir: Path) -> int | None:
    """Entries of the model the agents exchange (the global state of the newest checkpoint), None without one."""
    path = run_dir / "checkpoints" / "latest.pt"
    if not path.is_file():
        return None
    try:
        import torch

        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        return int(sum(v.numel() for v in ckpt["state"].values()))
    except Exception:  # noqa: BLE001 - the comparison is left out, the report still renders
        return None


def _power(profile: str) -> list[str]:
    """The shipped profile's power figures with their sources (empty if it is not a shipped profile)."""
    try:
        from fedfleet.edge_agent.profiles import load_profile

        p = load_profile(profile)
    except Exception:  # noqa: BLE001 - an agent's own profile file is not at hand here
        return []
    return [f"{key} = {getattr(p, attr)} W ({p.sources.get(key, 'no source')})"
            for key, attr in (("power.idle_w", "idle_w"), ("power.cpu_active_w", "cpu_active_w"))] + [
            f"radio {p.radio_tx_j_per_mb} J/MB up, {p.radio_rx_j_per_mb} J/MB down ({p.sources.get('radio.tx_j_per_mb', '')})"]


def section(run_dir: str | Path, run: str) -> str:
    run_dir = Path(run_dir)
    try:
        with LedgerView(run_dir / "ledger.sqlite") as view:
            acc = accounts(view.query, run)
            has_meter = any(r[1] == "energy_meter" for r in view.query("PRAGMA table_info(agent_rounds)"))
            meter_col = "energy_meter" if has_meter else "NULL"  # a ledger written before the column existed
            meters = [tuple(r) for r in view.query(
                f"SELECT COALESCE(profile, '-'), COALESCE({meter_col}, 'not reported'), COUNT(*) FROM agent_rounds"
                " WHERE run = ? AND energy_compute_j IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2", (run,))]
            exchanged = view.query(
                "SELECT COALESCE(SUM(bytes_down > 0), 0), COALESCE(SUM(bytes_up > 0), 0) FROM agent_rounds WHERE run = ?",
                (run,))[0]
    except sqlite3.DatabaseError:
        return ""
    parts = ["<h2>What the devices paid for</h2>"]
    totals = [["All device traffic", f"{acc.all[0] / MB:,.3f}", f"{acc.all[1] / MB:,.3f}", LABELS["all"]],
              ["Model updates only", f"{acc.updates[0] / MB:,.3f}", f"{acc.updates[1] / MB:,.3f}", LABELS["updates"]]]
    if acc.socket is not None:
        totals.append(["Agents' sockets", f"{acc.socket[0] / MB:,.3f}", f"{acc.socket[1] / MB:,.3f}", LABELS["socket"]])
    parts.append(_rows(["Number", "MB up", "MB down", "What it counts"], totals))
    if any(sum(v) for v in acc.traffic.values()):
        total = sum(acc.all) or 1
        parts += ["<h3>All device traffic by category</h3>", _rows(
            ["Category", "MB up", "MB down", "Share"],
            [[c, f"{u / MB:,.3f}", f"{d / MB:,.3f}", f"{(u + d) / total:.1%}"] for c, (u, d) in acc.traffic.items()])]
    else:
        parts.append("<p>No agent reported its traffic by category (agents older than this ledger's books).</p>")
    if acc.energy is None:
        parts.append("<h3>Energy</h3><p>Not recorded: no agent had a meter.</p>")
    else:
        e = acc.energy
        parts += ["<h3>Energy: the learning apart from radio and idle</h3>", _rows(
            ["Part", "J", "Share"],
            [[name, f"{e[k]:,.1f}", f"{e[k] / (acc.joules or 1):.1%}"] for name, k in
             (("learning (compute)", "compute_j"), ("radio", "radio_j"), ("idle while in the job", "idle_j"))])]
        rows = []
        for profile, meter, n in meters:
            how = "modelled from the profile's power figures" if meter == "model" else (
                "not reported (an agent older than this ledger's books)" if meter == "not reported"
                else f"measured by the {meter} meter")
            figures = "; ".join(_power(profile)) if meter == "model" else "-"
            rows.append([profile, how, n, figures or "the agent's own profile file (not shipped)"])
        parts += ["<h3>Measured or modelled, and from which figures</h3>",
                  _rows(["Profile", "Energy is", "Agent-rounds", "Power figures used (source)"], rows)]
    numel = dense_numel(run_dir)
    if numel is not None:
        dense = 4 * numel * (int(exchanged[0]) + int(exchanged[1]))
        booked = sum(acc.updates)
        parts += ["<h3>The same run with a dense uplink and downlink</h3>", f"<p>{int(exchanged[0])} tasks and "
                  f"{int(exchanged[1])} results of a {numel:,}-entry model as float32 tensors: {dense / MB:,.3f} MB "
                  f"(payloads only, no headers), against {booked / MB:,.3f} MB of model updates booked "
                  f"({booked / dense:.2f} of dense).</p>" if dense else ""]
    return "\n".join(parts)
