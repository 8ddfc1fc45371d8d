"""Live fleet metrics in the Prometheus text exposition format (version 0.0.4), read from the run ledger.

`exposition(run_dir)` renders the current totals of the latest run; `serve(run_dir, port)` starts a small
HTTP server in a daemon thread answering `GET /metrics` (port 0 picks a free port). Reading is
read-only SQLite, so it can run beside the round engine that writes the ledger.
"""

from __future__ import annotations

import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fedfleet.coordinator.records.ledger import LedgerView
from fedfleet.coordinator.records.run_data import ACCURACY, OUTCOMES, ReportError, outcome, score_label

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(run_dir: str | Path, run: str | None = None) -> str:
    """Current totals of one run (the latest by default) as Prometheus text."""
    db_path = Path(run_dir) / "ledger.sqlite"
    if not db_path.is_file():
        raise ReportError(f"{db_path}: ledger not found; is {run_dir} a fedfleet run directory?")
    try:
        with LedgerView(db_path) as view:
            if run is None:
                run = view.latest_run()
                if run is None:
                    return "# no rounds recorded yet\n"
            up, down, cj, rj, ij, agents = view.totals(run)
            statuses = view.status_counts(run)
            last = view.last_scored(run)
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"{db_path}: not a readable ledger ({exc})") from exc
    counts = dict.fromkeys(OUTCOMES, 0)
    for status, n in statuses:
        counts[outcome(status)] += n
    r = f'run="{_label(run)}"'
    lines = [
        "# HELP fedfleet_round Last round with an evaluation.", "# TYPE fedfleet_round gauge",
        f"fedfleet_round{{{r}}} {last[0] if last else 0}",
    ]
    # the diffusion task's round score is the held-out x0-prediction MSE, not an accuracy
    gauge, what = (("accuracy", "Test accuracy of the global model") if score_label(Path(run_dir)) == ACCURACY
                   else ("x0_mse", "Held-out x0-prediction MSE of the global denoiser"))
    lines += [f"# HELP fedfleet_{gauge} {what} after the last evaluated round.", f"# TYPE fedfleet_{gauge} gauge"]
    if last and last[1] is not None:
        lines.append(f"fedfleet_{gauge}{{{r}}} {float(last[1])!r}")
    lines += [
        "# HELP fedfleet_agents Agents seen in the ledger.", "# TYPE fedfleet_agents gauge",
        f"fedfleet_agents{{{r}}} {agents}",
        "# HELP fedfleet_bytes_total Bytes on the wire counted at the MQTT layer.", "# TYPE fedfleet_bytes_total counter",
        f'fedfleet_bytes_total{{{r},direction="up"}} {int(up)}',
        f'fedfleet_bytes_total{{{r},direction="down"}} {int(down)}',
        "# HELP fedfleet_energy_joules_total Fleet energy by phase.", "# TYPE fedfleet_energy_joules_total counter",
        *(f'fedfleet_energy_joules_total{{{r},phase="{p}"}} {float(v)!r}'
          for p, v in (("compute", cj), ("radio", rj), ("idle", ij))),
        "# HELP fedfleet_agent_rounds_total Agent-rounds by outcome.", "# TYPE fedfleet_agent_rounds_total counter",
        *(f'fedfleet_agent_rounds_total{{{r},outcome="{k}"}} {n}' for k, n in counts.items()),
    ]
    return "\n".join(lines) + "\n"


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
