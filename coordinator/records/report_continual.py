"""The continual-job section of a run report: ACC, FGT, the accuracy matrix a[t][tau] as a heat map and
FOT's basis fill k_l/d_l after each task, from the ledger's `task_accuracy` and `layer_basis` tables.

`section(db_path, run, out_dir)` returns the HTML fragment (and writes `continual.png`), or "" for a run
that is not a continual job. `fedfleet.coordinator.records.report.render` appends it to the page.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedfleet.coordinator.records.ledger import LedgerView  # noqa: E402
from fedfleet.coordinator.tasks.continual import acc_fgt  # noqa: E402


def read(db_path: Path, run: str) -> dict[str, Any] | None:
    """Task names, the matrix (None where tau > t) and the basis rows of `run`; None if it has none."""
    with LedgerView(db_path) as view:
        if not view.task_ends(run):
            return None
        names, matrix = view.accuracy_matrix(run)
        basis = view.basis(run)
    return {"names": names, "matrix": matrix, "basis": basis}


def plot(info: dict[str, Any], path: Path) -> Path:
    has_basis = bool(info["basis"])
    fig, axes = plt.subplots(1, 2 if has_basis else 1, figsize=(11 if has_basis else 5.5, 4.3), squeeze=False)
    names = info["names"]
    m = np.array([[np.nan if v is None else 100 * v for v in row] for row in info["matrix"]])
    ax = axes[0][0]
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
    for (t, tau), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(tau, t, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after task")
    acc, fgt = acc_fgt(info["matrix"])
    ax.set_title(f"accuracy (%) a[t][tau]: ACC {100 * acc:.1f}, FGT {100 * fgt:.1f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if has_basis:
        ax = axes[0][1]
        layers: dict[str, list[tuple[int, float]]] = {}
        for t, _, layer, k, d in info["basis"]:
            layers.setdefault(layer, []).append((t + 1, k / d))
        for layer, pts in layers.items():
            ax.plot(*zip(*pts), marker="o", label=layer)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("after task")
        ax.set_ylabel("k_l / d_l")
        ax.set_title("FOT basis fill", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section(db_path: str | Path, run: str, out_dir: str | Path) -> str:
    info = read(Path(db_path), run)
    if info is None:
        return ""
    png = plot(info, Path(out_dir) / "continual.png")
    acc, fgt = acc_fgt(info["matrix"])
    names = info["names"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f'<tr><td class="l">{html.escape(names[t])}</td>'
        + "".join(f"<td>{'' if v is None else f'{100 * v:.1f}'}</td>" for v in row) + "</tr>"
        for t, row in enumerate(info["matrix"]))
    parts = ["<h2>Continual tasks</h2>",
             f"<p>ACC {100 * acc:.2f} points (mean final accuracy over the tasks), FGT {100 * fgt:.2f} points (mean "
             "drop from just after learning a task to the end). Rows: after task t; columns: task tau.</p>",
             f'<table><thead><tr><th class="l">after \\ on</th>{head}</tr></thead><tbody>{body}</tbody></table>',
             f'<img alt="accuracy matrix" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">']
    if info["basis"]:
        rows = "".join(f'<tr><td class="l">{html.escape(name)}</td><td class="l">{html.escape(layer)}</td>'
                       f"<td>{k}</td><td>{d}</td><td>{k / d:.3f}</td></tr>" for _, name, layer, k, d in info["basis"])
        parts.append('<table><thead><tr><th class="l">after task</th><th class="l">layer</th><th>k</th><th>d</th>'
                     f"<th>k/d</th></tr></thead><tbody>{rows}</tbody></table>")
    return "\n".join(parts)
