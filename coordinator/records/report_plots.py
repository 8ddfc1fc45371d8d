"""The report's PNG plots of a run (`fedfleet.coordinator.records.report` embeds them in its page)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedfleet.coordinator.records.run_data import (  # noqa: E402
    COLORS,
    MAX_BARS,
    MB,
    OUTCOMES,
    AgentTotals,
    RunData,
    energy,
    outcome,
    round_series,
)

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
            "compute_j": sum(energy(r["energy_compute_j"]) for r in rows) / n,
            "radio_j": sum(energy(r["energy_radio_j"]) for r in rows) / n,
            "idle_j": sum(energy(r["energy_idle_j"]) for r in rows) / n,
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
