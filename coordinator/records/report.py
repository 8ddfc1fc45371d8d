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

import argparse
import base64
import html
import json
import sqlite3
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedfleet.coordinator.records.ledger import LedgerView
from fedfleet.edge_agent.errors import FedfleetError  # noqa: E402

MB = 1e6
MAX_BARS = 60  # agents drawn in the per-agent plot; the HTML table always lists all of them
MAX_PROBLEM_ROWS = 500
OUTCOMES = ("ok", "late", "dropped", "rejected", "interrupted")  # interrupted: a round rerun after resume
COLORS = {"ok": "#4c9a2a", "late": "#e0a526", "dropped": "#8c8c8c", "rejected": "#c0392b",
          "interrupted": "#9b59b6", "compute": "#3b6ea8", "radio": "#e07b39", "idle": "#b8b8b8", "up": "#3b6ea8", "down": "#7fb3e0"}


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
    "x0 MSE", "Held-out x0-prediction MSE (lower is better)", "Denoising quality (x0 MSE) of the global denoiser",
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


def _f(x: Any) -> float:
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
        a.compute_j += _f(r["energy_compute_j"])
        a.radio_j += _f(r["energy_radio_j"])
        a.idle_j += _f(r["energy_idle_j"])
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
        s["joules"] += _f(r["energy_compute_j"]) + _f(r["energy_radio_j"]) + _f(r["energy_idle_j"])
        s[outcome(r["status"])] += 1
    for rd in data.rounds:
        s = per[int(rd["round"])]
        if s["bytes"] == 0:
            s["bytes"] = int(rd.get("bytes_up") or 0) + int(rd.get("bytes_down") or 0)
        if rd.get("accuracy") is not None:
            s["accuracy"] = float(rd["accuracy"])
    return {k: dict(v) for k, v in sorted(per.items())}


# --- plots ----------------------------------------------------------------------------------------------------


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend_below(fig: plt.Figure, *axes: plt.Axes) -> None:
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), frameon=False)


def _empty(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_axis_off()  # not set_*ticks([]): axes may share a y axis with a populated neighbour


def plot_accuracy(data: RunData, path: Path) -> Path:
    series = round_series(data)
    rounds = list(series)
    cum_mb, cum_kj, total_b, total_j = [], [], 0.0, 0.0
    for k in rounds:
        total_b += series[k].get("bytes", 0.0)
        total_j += series[k].get("joules", 0.0)
        cum_mb.append(total_b / MB)
        cum_kj.append(total_j / 1e3)
    pts = [(k, mb, kj, series[k]["accuracy"]) for k, mb, kj in zip(rounds, cum_mb, cum_kj, strict=True)
           if "accuracy" in series[k]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True, layout="constrained")
    fig.suptitle(f"{data.score.title}, run {data.run}", fontsize=13)
    xs = ((0, "Round", "against rounds"), (1, "Cumulative traffic, up + down (MB)", "against bytes on the wire"),
          (2, "Cumulative fleet energy (kJ)", "against joules spent"))
    for ax, (i, xlabel, title) in zip(axes, xs, strict=True):
        ax.set_title(title)
        if not pts:
            _empty(ax, f"no {data.score.name.lower()} recorded")
            continue
        if i == 2 and not data.has_energy:
            _empty(ax, "no energy recorded\n(agents ran without a meter)")
            continue
        ax.plot([p[i] for p in pts], [p[3] for p in pts], marker="o", ms=3, color="#3b6ea8")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(data.score.axis)
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    if pts and not data.score.lower_is_better:
        axes[0].set_ylim(0, 1.02 if max(p[3] for p in pts) <= 1 else None)
    return _save(fig, path)


def _top_agents(data: RunData) -> tuple[list[AgentTotals], str]:
    agents = list(data.agents.values())
    if len(agents) <= MAX_BARS:
        return agents, ""
    top = sorted(agents, key=lambda a: a.bytes_up + a.bytes_down, reverse=True)[:MAX_BARS]
    return sorted(top, key=lambda a: a.agent), f" ({MAX_BARS} of {len(agents)} agents, most traffic)"


def plot_agents(data: RunData, path: Path) -> Path:
    agents, note = _top_agents(data)
    names = [a.agent for a in agents]
    height = max(3.0, 0.22 * len(agents) + 1.5)
    fig, (ax_b, ax_j) = plt.subplots(1, 2, figsize=(13, height), sharey=True, layout="constrained")
    fig.suptitle(f"Per-agent totals over the run{note}", fontsize=13)
    y = range(len(agents))
    up = [a.bytes_up / MB for a in agents]
    down = [a.bytes_down / MB for a in agents]
    ax_b.barh(y, up, color=COLORS["up"], label="uplink")
    ax_b.barh(y, down, left=up, color=COLORS["down"], label="downlink")
    ax_b.set_xlabel("Traffic (MB)")
    ax_b.set_title("Bytes on the wire")
    ax_b.set_yticks(list(y), names, fontsize=8 if len(agents) > 25 else 9)
    ax_b.set_ylim(len(agents) - 0.5, -0.5)  # first agent on top, no empty margin
    if data.has_energy:
        left = [0.0] * len(agents)
        for part in ("compute", "radio", "idle"):
            vals = [getattr(a, f"{part}_j") for a in agents]
            ax_j.barh(y, vals, left=left, color=COLORS[part], label=part)
            left = [lv + v for lv, v in zip(left, vals, strict=True)]
        ax_j.set_xlabel("Energy (J)")
    else:
        _empty(ax_j, "no energy recorded")
    ax_j.set_title("Energy by phase")
    for ax in (ax_b, ax_j):
        ax.grid(axis="x", alpha=0.3)
    _legend_below(fig, ax_b, ax_j)
    return _save(fig, path)


def profile_table(data: RunData) -> list[dict[str, Any]]:
    """Per profile: agents, agent-rounds, mean traffic and energy split per agent-round, mean learn time."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in data.rows:
        groups[r["profile"] or "-"].append(r)
    out = []
    for prof, rows in sorted(groups.items()):
        n = len(rows)
        learn = [float(r["learn_s"]) for r in rows if r["learn_s"] is not None]
        out.append({
            "profile": prof, "agents": len({r["agent"] for r in rows}), "agent_rounds": n,
            "mb_per_round": sum(int(r["bytes_up"] or 0) + int(r["bytes_down"] or 0) for r in rows) / MB / n,
            "compute_j": sum(_f(r["energy_compute_j"]) for r in rows) / n,
            "radio_j": sum(_f(r["energy_radio_j"]) for r in rows) / n,
            "idle_j": sum(_f(r["energy_idle_j"]) for r in rows) / n,
            "learn_s": sum(learn) / len(learn) if learn else None,
            "not_ok": sum(outcome(r["status"]) != "ok" for r in rows),
        })
    return out


def plot_profiles(data: RunData, path: Path) -> Path:
    table = profile_table(data)
    names = [f"{p['profile']}\n({p['agents']} agents)" for p in table]
    fig, (ax_j, ax_b) = plt.subplots(1, 2, figsize=(13, max(3.2, 0.55 * len(table) + 1.6)), sharey=True, layout="constrained")
    fig.suptitle("Per-profile breakdown, mean per agent per round", fontsize=13)
    y = list(range(len(table)))
    if data.has_energy:
        left = [0.0] * len(table)
        for part in ("compute", "radio", "idle"):
            vals = [p[f"{part}_j"] for p in table]
            ax_j.barh(y, vals, left=left, color=COLORS[part], label=part)
            left = [lv + v for lv, v in zip(left, vals, strict=True)]
        ax_j.set_xlabel("Energy per agent-round (J)")
    else:
        _empty(ax_j, "no energy recorded")
    ax_j.set_title("Energy by phase")
    ax_b.barh(y, [p["mb_per_round"] for p in table], color=COLORS["up"])
    ax_b.set_xlabel("Traffic per agent-round, up + down (MB)")
    ax_b.set_title("Bytes on the wire")
    ax_j.set_yticks(y, names, fontsize=9)
    ax_j.invert_yaxis()
    for ax in (ax_j, ax_b):
        ax.grid(axis="x", alpha=0.3)
    _legend_below(fig, ax_j)
    return _save(fig, path)


def plot_stragglers(data: RunData, path: Path) -> Path:
    series = round_series(data)
    rounds = list(series)
    fig, (ax_o, ax_l) = plt.subplots(1, 2, figsize=(14, 4.2), gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    fig.suptitle("Stragglers and dropouts", fontsize=13)
    bottom = [0.0] * len(rounds)
    for kind in OUTCOMES:
        vals = [series[k].get(kind, 0.0) for k in rounds]
        if any(vals):
            ax_o.bar(rounds, vals, bottom=bottom, color=COLORS[kind], label=kind, width=0.8)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax_o.set_xlabel("Round")
    ax_o.set_ylabel("Agents")
    ax_o.set_title("Outcome of each selected agent per round")
    ax_o.grid(axis="y", alpha=0.3)
    ax_o.yaxis.get_major_locator().set_params(integer=True)
    if len(rounds) <= 30:
        ax_o.set_xticks(rounds)
    by_profile: dict[str, list[float]] = defaultdict(list)
    for r in data.rows:
        if r["learn_s"] is not None:
            by_profile[r["profile"] or "-"].append(float(r["learn_s"]))
    if by_profile:
        labels = sorted(by_profile)
        samples = [by_profile[k] for k in labels]
        try:
            ax_l.boxplot(samples, orientation="horizontal", showfliers=True)
        except TypeError:  # matplotlib < 3.10
            ax_l.boxplot(samples, vert=False, showfliers=True)
        ax_l.set_yticks(range(1, len(labels) + 1), labels, fontsize=9)
        ax_l.invert_yaxis()
        ax_l.set_xlabel("Local learn time per round (s)")
        ax_l.grid(axis="x", alpha=0.3)
    else:
        _empty(ax_l, "no learn times recorded")
    ax_l.set_title("Learn time by profile")
    _legend_below(fig, ax_o)
    return _save(fig, path)


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
    ap = argparse.ArgumentParser(prog="fedfleet report", description="HTML and PNG report of a run's ledger")
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
