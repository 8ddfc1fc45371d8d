"""Run reports: a self-contained HTML page and PNG plots from a run's SQLite ledger.

`render(run_dir)` reads `run_dir/ledger.sqlite` (read-only; schema in `fedfleet.coordinator.records.ledger`) and writes
`run_dir/report/report.html` with the PNGs embedded as base64, plus the same PNGs next to it:
- `accuracy.png`: accuracy against round, cumulative megabytes and cumulative kilojoules (for the
  moving-digits diffusion task, whose round score is the held-out x0-prediction MSE, labelled as that:
  `ScoreLabel`, read from the task in `job.json`);
- `agents.png`: bytes and joules per agent;
- `profiles.png`: per-profile energy split and traffic per agent-round;
- `stragglers.png`: outcomes per round (ok, late, dropped, rejected) and learn time per profile;
- `continual.png` (continual jobs): the accuracy matrix as a heat map and FOT's basis fill
  (`fedfleet.coordinator.records.report_continual`).
`main(argv)` is the `fedfleet report RUN_DIR` command.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from fedfleet.coordinator.records.report_plots import (
    plot_accuracy,
    plot_agents,
    plot_profiles,
    plot_stragglers,
    profile_table,
)
from fedfleet.coordinator.records.run_data import (
    ACCURACY,
    MAX_PROBLEM_ROWS,
    MB,
    OUTCOMES,
    AgentTotals,
    ReportError,
    RunData,
    ScoreLabel,
    load,
    outcome,
    round_series,
    score_label,
)
from fedfleet.edge_agent.cli_run import ArgParser

__all__ = ["ACCURACY", "OUTCOMES", "AgentTotals", "ReportError", "RunData", "ScoreLabel", "load", "main", "outcome",
           "profile_table", "render", "round_series", "score_label"]

# --- HTML -----------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.kv td:first-child { text-align: left; font-weight: 600; }
.bad { color: #c0392b; } .late { color: #b7791f; }
"""


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _table(headers: list[str], rows: list[list[Any]], left: int = 1, cls: str = "") -> str:
    head = "".join(f'<th class="l">{html.escape(h)}</th>' if i < left else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(f'<td class="l">{html.escape(str(c))}</td>' if i < left else f"<td>{html.escape(str(c))}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _img(path: Path, alt: str) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _html(data: RunData, images: dict[str, Path]) -> str:
    series = round_series(data)
    accs = [s["accuracy"] for s in series.values() if "accuracy" in s]
    agents = list(data.agents.values())
    out_counts: Counter = Counter()
    for a in agents:
        out_counts.update(a.outcomes)
    tot_up = sum(a.bytes_up for a in agents)
    tot_down = sum(a.bytes_down for a in agents)
    energy = [sum(getattr(a, f"{p}_j") for a in agents) for p in ("compute", "radio", "idle")]
    summary = [
        ["Run", data.run], ["Rounds", len(series)], ["Agents", len(agents)],
        [f"Final {data.score.name.lower()}", _num(accs[-1], 4) if accs else "-"],
        [f"Best {data.score.name.lower()}",
         _num(min(accs) if data.score.lower_is_better else max(accs), 4) if accs else "-"],
        ["Traffic up / down (MB)", f"{tot_up / MB:,.3f} / {tot_down / MB:,.3f}"],
        ["Energy compute / radio / idle (J)",
         " / ".join(_num(e, 1) for e in energy) if data.has_energy else "not recorded"],
        ["Agent-rounds " + " / ".join(OUTCOMES), " / ".join(str(out_counts.get(k, 0)) for k in OUTCOMES)],
    ]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fedfleet report {html.escape(data.run)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>fedfleet run report: {html.escape(data.run)}</h1>",
             '<h2>Summary</h2><table class="kv"><tbody>',
             "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary),
             "</tbody></table>"]
    if data.config:
        cfg = html.escape(json.dumps(data.config, indent=2, sort_keys=True, default=str))
        parts.append(f"<details><summary>Run configuration</summary><pre>{cfg}</pre></details>")
    parts += [f"<h2>{html.escape(data.score.name)} against rounds, bytes and joules</h2>",
              _img(images["accuracy"], data.score.name.lower())]
    round_rows = []
    by_round = {int(r["round"]): r for r in data.rounds}
    for k, s in series.items():
        rd = by_round.get(k, {})
        round_rows.append([k, _num(s.get("accuracy"), 4), _num(rd.get("loss"), 4), _num(rd.get("wall_s"), 2),
                           int(s.get("ok", 0)), int(s.get("late", 0)), int(s.get("dropped", 0)),
                           int(s.get("rejected", 0)), _num(s.get("bytes", 0) / MB, 3), _num(s.get("joules", 0), 1)])
    parts.append(_table(["Round", data.score.name, "Loss", "Wall (s)", "ok", "late", "dropped", "rejected", "MB", "J"],
                        round_rows))
    parts += ["<h2>Per-agent bytes and joules</h2>", _img(images["agents"], "per-agent bytes and joules")]
    agent_rows = [[a.agent, a.profile, a.outcomes.get("ok", 0), a.outcomes.get("late", 0), a.outcomes.get("dropped", 0),
                   a.outcomes.get("rejected", 0), _num(a.bytes_up / MB, 3), _num(a.bytes_down / MB, 3),
                   _num(a.compute_j, 1), _num(a.radio_j, 1), _num(a.idle_j, 1),
                   _num(sum(a.learn_s) / len(a.learn_s), 3) if a.learn_s else "-"] for a in agents]
    parts.append(_table(["Agent", "Profile", "ok", "late", "dropped", "rejected", "MB up", "MB down", "J compute",
                         "J radio", "J idle", "Mean learn (s)"], agent_rows, left=2))
    parts += ["<h2>Per-profile breakdown</h2>", _img(images["profiles"], "per-profile breakdown")]
    parts.append(_table(["Profile", "Agents", "Agent-rounds", "MB / agent-round", "J compute", "J radio", "J idle",
                         "Mean learn (s)", "Not ok"],
                        [[p["profile"], p["agents"], p["agent_rounds"], _num(p["mb_per_round"], 3),
                          _num(p["compute_j"], 2), _num(p["radio_j"], 2), _num(p["idle_j"], 2),
                          _num(p["learn_s"], 3), p["not_ok"]] for p in profile_table(data)]))
    parts += ["<h2>Stragglers and dropouts</h2>", _img(images["stragglers"], "stragglers and dropouts")]
    problems = [r for r in data.rows if outcome(r["status"]) != "ok"]
    if problems:
        shown = problems[:MAX_PROBLEM_ROWS]
        parts.append(_table(["Round", "Agent", "Profile", "Status", "Detail"],
                            [[r["round"], r["agent"], r["profile"] or "-", r["status"], r["detail"] or ""]
                             for r in shown], left=5))
        if len(problems) > len(shown):
            parts.append(f"<p>{len(problems) - len(shown)} more rows not shown; query the ledger for all of them.</p>")
    else:
        parts.append("<p>Every selected agent answered in time and every update was accepted.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render(run_dir: str | Path, *, out_dir: str | Path | None = None, run: str | None = None) -> Path:
    """Write the PNGs and `report.html` (PNGs embedded) for one run; returns the HTML path."""
    data = load(run_dir, run)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"{out}: cannot create the report folder ({exc}); pass --out DIR") from exc
    images = {
        "accuracy": plot_accuracy(data, out / "accuracy.png"),
        "agents": plot_agents(data, out / "agents.png"),
        "profiles": plot_profiles(data, out / "profiles.png"),
        "stragglers": plot_stragglers(data, out / "stragglers.png"),
    }
    page = out / "report.html"
    from fedfleet.coordinator.records.report_continual import (
        section,  # a continual job's ACC, FGT and accuracy matrix
    )

    extra = section(Path(run_dir) / "ledger.sqlite", data.run, out)
    page.write_text(_html(data, images).replace("</body></html>", f"{extra}\n</body></html>"), encoding="utf-8")
    return page


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="fedfleet report", description="HTML and PNG report of a run's ledger")
    ap.add_argument("run_dir", help="run folder holding ledger.sqlite")
    ap.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    ap.add_argument("--run", default=None, help="run id when the ledger holds several (default: the latest)")
    args = ap.parse_args(argv)
    try:
        page = render(args.run_dir, out_dir=args.out, run=args.run)
    except ReportError as exc:
        print(f"fedfleet report: error: {exc}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
