"""Live fleet metrics for Prometheus (`prometheus_client`), read from the run ledger at every scrape.

`exposition(run_dir)` renders the latest run's numbers as Prometheus text; `serve(run_dir, port)` starts a small
HTTP server in a daemon thread answering `GET /metrics` (port 0 picks a free port). Reading is read-only SQLite,
so it runs beside the round engine that writes the ledger. The numbers are `records.accounts`' (one definition,
the same as the terminal, summary.json, the report and the export), each metric's HELP says what it counts:
- `fedfleet_bytes_total{what=all|updates|socket, direction}`: all device traffic, model updates only, sockets;
- `fedfleet_traffic_bytes_total{category, direction}`: all device traffic by category;
- `fedfleet_energy_joules_total{phase=compute|radio|idle}` (absent when no energy was recorded);
- `fedfleet_refusals_total`, `fedfleet_agent_rounds_total{outcome}`, round, score and agents gauges;
- per agent (`fedfleet_agent_bytes_total{agent, what}`, `fedfleet_agent_energy_joules_total{agent, phase}`) while
  the run has at most `PER_AGENT_MAX` agents, else the same per firmware profile (`fedfleet_profile_*{profile}`),
  so a large fleet does not explode the series count.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fedfleet.coordinator.records.accounts import LABELS, accounts, agent_bytes
from fedfleet.coordinator.records.ledger import LedgerView
from fedfleet.coordinator.records.run_data import ACCURACY, OUTCOMES, ReportError, outcome, score_label

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PER_AGENT_MAX = 64  # above this many agents, per-profile aggregates instead of per-agent series

# every metric served, with what it counts (the docs site's metrics reference is generated from it)
METRICS = {
    "fedfleet_round": "Last round with an evaluation (gauge).",
    "fedfleet_accuracy": "Test accuracy of the global model after the last evaluated round (gauge; `fedfleet_x0_mse` "
                         "for the diffusion task).",
    "fedfleet_agents": "Agents seen in the ledger (gauge).",
    "fedfleet_bytes_total": "Bytes by what they count, `what` = all (" + LABELS["all"] + "), updates ("
                            + LABELS["updates"] + "), socket (" + LABELS["socket"] + "); `direction` = up, down.",
    "fedfleet_traffic_bytes_total": "All device traffic by `category` (model, state, task, result, status, telemetry, "
                                    "control) and `direction`.",
    "fedfleet_energy_joules_total": "Fleet energy by `phase` (compute = the learning, radio, idle while in the job); "
                                    "no samples when no energy was recorded.",
    "fedfleet_refusals_total": LABELS["refusals"] + ".",
    "fedfleet_agent_rounds_total": "Agent-rounds (ledger rows) by `outcome` (ok, late, dropped, rejected, interrupted).",
    "fedfleet_agent_bytes_total": f"Bytes per `agent` (up + down) by `what` (all, updates, socket), for runs of at most "
                                  f"{PER_AGENT_MAX} agents.",
    "fedfleet_agent_energy_joules_total": f"Energy per `agent` by `phase`, for runs of at most {PER_AGENT_MAX} agents.",
    "fedfleet_profile_bytes_total": f"Bytes per firmware `profile` (up + down) by `what`, for runs of more than "
                                    f"{PER_AGENT_MAX} agents.",
    "fedfleet_profile_energy_joules_total": f"Energy per firmware `profile` by `phase`, for runs of more than "
                                            f"{PER_AGENT_MAX} agents.",
}


class LedgerCollector:
    """A `prometheus_client` collector over one run directory's ledger (the latest run, or `run`)."""

    def __init__(self, run_dir: str | Path, run: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run = run

    def collect(self) -> Iterator[Metric]:
        db_path = self.run_dir / "ledger.sqlite"
        if not db_path.is_file():
            raise ReportError(f"{db_path}: ledger not found; is {self.run_dir} a fedfleet run directory?")
        try:
            with LedgerView(db_path) as view:
                run = self.run or view.latest_run()
                if run is None:
                    return
                acc = accounts(view.query, run)
                statuses = view.status_counts(run)
                last = view.last_scored(run)
                per_agent = agent_bytes(view.query, run)
                energy_rows = view.query(
                    "SELECT agent, MAX(profile), SUM(energy_compute_j), SUM(energy_radio_j), SUM(energy_idle_j),"
                    " COUNT(energy_compute_j) FROM agent_rounds WHERE run = ? GROUP BY agent", (run,))
        except sqlite3.DatabaseError as exc:
            raise ReportError(f"{db_path}: not a readable ledger ({exc})") from exc
        yield from self._metrics(run, acc, statuses, last, per_agent, energy_rows)

    def _metrics(self, run: str, acc: Any, statuses: list[tuple[str, int]], last: tuple[int, float] | None,
                 per_agent: dict[str, dict[str, int]], energy_rows: list[Any]) -> Iterator[Metric]:
        g = GaugeMetricFamily("fedfleet_round", "Last round with an evaluation.", labels=["run"])
        g.add_metric([run], last[0] if last else 0)
        yield g
        # the diffusion task's round score is the held-out x0-prediction MSE, not an accuracy
        gauge, what = (("accuracy", "Test accuracy of the global model") if score_label(self.run_dir) == ACCURACY
                       else ("x0_mse", "Held-out x0-prediction MSE of the denoiser the run ships"))
        g = GaugeMetricFamily(f"fedfleet_{gauge}", f"{what} after the last evaluated round.", labels=["run"])
        if last and last[1] is not None:
            g.add_metric([run], float(last[1]))
        yield g
        agents = sorted(a for a in per_agent if not a.startswith("("))
        g = GaugeMetricFamily("fedfleet_agents", "Agents seen in the ledger.", labels=["run"])
        g.add_metric([run], len(agents))
        yield g
        c = CounterMetricFamily("fedfleet_bytes", "Bytes by what they count: all = " + LABELS["all"] + "; updates = "
                                + LABELS["updates"] + "; socket = " + LABELS["socket"] + ".",
                                labels=["run", "what", "direction"])
        for key, pair in (("all", acc.all), ("updates", acc.updates), ("socket", acc.socket)):
            if pair is not None:
                c.add_metric([run, key, "up"], pair[0])
                c.add_metric([run, key, "down"], pair[1])
        yield c
        c = CounterMetricFamily("fedfleet_traffic_bytes", "All device traffic by category (model package, state "
                                "broadcast, task, result, status, telemetry, control packets).",
                                labels=["run", "category", "direction"])
        for cat, (up, down) in acc.traffic.items():
            c.add_metric([run, cat, "up"], up)
            c.add_metric([run, cat, "down"], down)
        yield c
        c = CounterMetricFamily("fedfleet_energy_joules", "Fleet energy by phase: " + LABELS["energy"]
                                + " (no samples: not recorded).", labels=["run", "phase"])
        if acc.energy is not None:
            for phase in ("compute", "radio", "idle"):
                c.add_metric([run, phase], acc.energy[f"{phase}_j"])
        yield c
        c = CounterMetricFamily("fedfleet_refusals", LABELS["refusals"] + ".", labels=["run"])
        c.add_metric([run], acc.refusals)
        yield c
        counts = dict.fromkeys(OUTCOMES, 0)
        for status, n in statuses:
            counts[outcome(status)] += n
        c = CounterMetricFamily("fedfleet_agent_rounds", "Agent-rounds (ledger rows) by outcome.", labels=["run", "outcome"])
        for k, n in counts.items():
            c.add_metric([run, k], n)
        yield c
        yield from self._per_group(run, agents, per_agent, energy_rows)

    def _per_group(self, run: str, agents: list[str], per_agent: dict[str, dict[str, int]],
                   energy_rows: list[Any]) -> Iterator[Metric]:
        profile = {r[0]: r[1] or "unknown" for r in energy_rows}
        by_agent = len(agents) <= PER_AGENT_MAX
        key, label = ("agent", "agent") if by_agent else ("profile", "profile")
        group = (lambda a: a) if by_agent else (lambda a: profile.get(a, "unknown"))
        nbytes: dict[tuple[str, str], int] = defaultdict(int)
        for a in agents:
            for what, n in per_agent[a].items():
                nbytes[(group(a), what)] += n
        joules: dict[tuple[str, str], float] = defaultdict(float)
        recorded = False
        for r in energy_rows:
            if r[0] in agents and r[5]:
                recorded = True
                for phase, v in zip(("compute", "radio", "idle"), r[2:5]):
                    joules[(group(r[0]), phase)] += float(v or 0.0)
        scope = "per agent" if by_agent else f"per firmware profile (more than {PER_AGENT_MAX} agents)"
        c = CounterMetricFamily(f"fedfleet_{key}_bytes", f"Bytes {scope}, up + down, by what they count (all, updates, "
                                "socket; see fedfleet_bytes).", labels=["run", label, "what"])
        for (g, what), n in sorted(nbytes.items()):
            c.add_metric([run, g, what], n)
        yield c
        c = CounterMetricFamily(f"fedfleet_{key}_energy_joules", f"Energy {scope} by phase.", labels=["run", label, "phase"])
        if recorded:
            for (g, phase), v in sorted(joules.items()):
                c.add_metric([run, g, phase], v)
        yield c


def exposition(run_dir: str | Path, run: str | None = None) -> str:
    """The run's numbers (the latest run by default) as Prometheus text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(run_dir, run))  # type: ignore[arg-type]
    return generate_latest(registry).decode() or "# no rounds recorded yet\n"


def serve(run_dir: str | Path, port: int = 9108, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve `/metrics` for `run_dir` in a daemon thread; call `.shutdown()` on the result to stop."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served")
                return
            try:
                body, code = exposition(run_dir).encode(), 200
            except ReportError as exc:
                body, code = f"# {exc}\n".encode(), 503
            self.send_response(code)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="fedfleet-metrics", daemon=True).start()
    return server
